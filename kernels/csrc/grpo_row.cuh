// The per-row algorithm of the fused GRPO loss, written once for the device kernels
// (grpo_kernels.cu) and the host emulator (grpo_emu.cu) that replays them thread by thread on
// the CPU in tests. Everything here is __host__ __device__ except the launch policy at the end.
//
// A block owns a row of V logits. The row is split into an unaligned head (< 16 bytes), a body
// of 16-byte chunks and a tail; chunk j belongs to thread j % nthreads in both sweeps, so a
// thread only ever reads back the shared-memory cache slots it wrote itself.
//   sweep 1: per-thread online (max m, and over the entries other than the label: sum exp q,
//            sum exp * (x - m) t), merged across threads; the first cache_n chunks are kept in
//            shared memory for sweep 2.
//   finish:  thread 0 adds the label's term (s = q + exp(x_label - m)), turns that into lse / logp
//            (with its low part logp_lo) / entropy and the per-token GRPO terms, and the gradient
//            scale coef = rw * dloss/dlogp / tau.
//   sweep 2: dlogits = coef * q / s at the label, -coef * exp(x - m) / s elsewhere, from shared
//            memory where cached.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "rerule_grpo.h"

#define RER_HD __host__ __device__ __forceinline__

namespace rerule {

// 16 bytes of logits (W elements) as four 32-bit words: the unit of every body load and store.
// Kept as words, not T[W], so that 16-bit types unpack with 32-bit register ops (an array of
// 16-bit values made the compiler spill in the hot loop).
template <typename T>
struct alignas(16) Pack {
  static constexpr int W = 16 / sizeof(T);
  uint32_t w[4];
};

RER_HD float bits_f(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

RER_HD uint32_t f_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

RER_HD float to_f(float x) { return x; }
RER_HD float to_f(__half x) { return __half2float(x); }
RER_HD float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
RER_HD T from_f(float x);
template <>
RER_HD float from_f<float>(float x) { return x; }
template <>
RER_HD __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
RER_HD __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// y[k] = float(element k) / tau (a true division, as eager torch); element 2i is the low half of word i.
RER_HD void unpack(const Pack<float>& p, float (&y)[4], float tau) {
#pragma unroll
  for (int i = 0; i < 4; ++i) y[i] = bits_f(p.w[i]) / tau;
}
RER_HD void unpack(const Pack<__nv_bfloat16>& p, float (&y)[8], float tau) {
  // bf16 is the top half of an fp32: exact, as __bfloat162float
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    y[2 * i] = bits_f(p.w[i] << 16) / tau;
    y[2 * i + 1] = bits_f(p.w[i] & 0xffff0000u) / tau;
  }
}
RER_HD void unpack(const Pack<__half>& p, float (&y)[8], float tau) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(static_cast<void*>(&h), &p.w[i], 4);
    const float2 f = __half22float2(h);
    y[2 * i] = f.x / tau;
    y[2 * i + 1] = f.y / tau;
  }
}

// Round d to T (round to nearest even, as Triton's .to()) into a pack.
RER_HD void pack(const float (&d)[4], Pack<float>& p) {
#pragma unroll
  for (int i = 0; i < 4; ++i) p.w[i] = f_bits(d[i]);
}
RER_HD void pack(const float (&d)[8], Pack<__nv_bfloat16>& p) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(d[2 * i], d[2 * i + 1]);
    memcpy(&p.w[i], static_cast<const void*>(&h), 4);
  }
}
RER_HD void pack(const float (&d)[8], Pack<__half>& p) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2 h = __floats2half2_rn(d[2 * i], d[2 * i + 1]);
    memcpy(&p.w[i], static_cast<const void*>(&h), 4);
  }
}

RER_HD float neg_inf() { return -INFINITY; }

// exp in the sweeps: MUFU.EX2 on the device (as Triton's tl.exp), libm on the host.
RER_HD float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  return std::exp(x);
#endif
}

// `last_use`: the value is not read again from global memory (evict-first in L2), so it does
// not push out the uncached part of the row that sweep 2 re-reads.
template <typename T>
RER_HD Pack<T> load_pack(const T* p, bool last_use) {
  Pack<T> r;
#ifdef __CUDA_ARCH__
  const uint4* q = reinterpret_cast<const uint4*>(p);
  const uint4 u = last_use ? __ldcs(q) : *q;
  r.w[0] = u.x, r.w[1] = u.y, r.w[2] = u.z, r.w[3] = u.w;
#else
  (void)last_use;
  memcpy(r.w, static_cast<const void*>(p), 16);
#endif
  return r;
}

// dlogits are not read again by this kernel: stream them past L2.
template <typename T>
RER_HD void store_pack(T* p, const Pack<T>& v) {
#ifdef __CUDA_ARCH__
  __stcs(reinterpret_cast<uint4*>(p), make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]));
#else
  memcpy(static_cast<void*>(p), v.w, 16);
#endif
}

struct RowLayout {
  int64_t head;  // scalar elements before the first 16-byte boundary
  int64_t nvec;  // 16-byte chunks
  int64_t tail;  // scalar elements after the last chunk
};

template <typename T>
RER_HD RowLayout row_layout(const void* p, int64_t V) {
  constexpr int W = Pack<T>::W;
  const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % W);
  int64_t head = mis ? W - mis : 0;
  if (head > V) head = V;
  const int64_t nvec = (V - head) / W;
  return RowLayout{head, nvec, V - head - nvec * W};
}

// Same offset within 16 bytes: the body chunks of x and dx line up and both can be vector ops.
RER_HD bool same_alignment(const void* a, const void* b) {
  return ((reinterpret_cast<uintptr_t>(a) ^ reinterpret_cast<uintptr_t>(b)) & 15u) == 0;
}

// Online softmax state of a set of x = logits / tau: m = the max over the set, and over its entries
// other than the label q = sum exp(x - m), t = sum exp(x - m) * (x - m) (relative to m, so the
// entropy does not cancel at |x| ~ 1e4). The label's term is added once, by finish_row: then
// 1 - p_label = q / s keeps its digits when the label holds nearly all the mass, where s - e_label
// would cancel. While m = -inf everything is shifted by 0 instead, so exp never sees -inf - -inf.
struct Partial {
  float m, q, t;
};

RER_HD Partial partial_init() { return Partial{neg_inf(), 0.f, 0.f}; }

// `skip`: the index of the label in y, or -1.
template <int N, bool ENT>
RER_HD void partial_add(Partial& P, const float (&y)[N], int skip) {
  float cm = y[0];
#pragma unroll
  for (int k = 1; k < N; ++k) cm = fmaxf(cm, y[k]);
  // Rescale only when the max grows: after the first chunks of a row this branch is rare.
  if (cm > P.m) {
    const float sc = fast_exp(P.m - cm);
    if (ENT) P.t = sc * (P.t + (P.m == neg_inf() ? 0.f : P.q * (P.m - cm)));
    P.q *= sc;
    P.m = cm;
  }
  const float ms = P.m == neg_inf() ? 0.f : P.m;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float d = y[k] - ms;
    const float e = fast_exp(d);
    const bool lab = k == skip;
    P.q += lab ? 0.f : e;
    if (ENT) P.t += (y[k] > neg_inf() && !lab) ? e * d : 0.f;
  }
}

template <bool ENT>
RER_HD Partial partial_merge(const Partial& a, const Partial& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == neg_inf()) return Partial{m, a.q + b.q, a.t + b.t};
  const float sa = fast_exp(a.m - m), sb = fast_exp(b.m - m);
  Partial r;
  r.m = m;
  r.q = a.q * sa + b.q * sb;
  r.t = 0.f;
  if (ENT) {
    const float ta = a.m == neg_inf() ? 0.f : sa * (a.t + a.q * (a.m - m));
    const float tb = b.m == neg_inf() ? 0.f : sb * (b.t + b.q * (b.m - m));
    r.t = ta + tb;
  }
  return r;
}

// The index of the label within the W elements from e0 on, or -1: one 64-bit compare per chunk, not
// one per element.
template <int W>
RER_HD int label_in_chunk(int64_t label, int64_t e0) {
  const int64_t rel = label - e0;
  return (rel >= 0 && rel < W) ? static_cast<int>(rel) : -1;
}

// Sweep 1 of one thread over its share of the row px[0, V).
template <typename T, bool ENT>
RER_HD Partial sweep1(const T* px, const RowLayout& L, int tid, int nth, float tau, int64_t label, Pack<T>* cache,
                      int64_t cache_n, bool stream_all) {
  constexpr int W = Pack<T>::W;
  constexpr int U = 4;  // independent 16-byte loads in flight per thread
  Partial P = partial_init();
  if (tid < L.head) {
    const float y[1] = {to_f(px[tid]) / tau};
    partial_add<1, ENT>(P, y, tid == label ? 0 : -1);
  }
  const T* body = px + L.head;
  for (int64_t j0 = tid; j0 < L.nvec; j0 += static_cast<int64_t>(U) * nth) {
    Pack<T> pk[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = j0 + static_cast<int64_t>(u) * nth;
      if (j < L.nvec) pk[u] = load_pack(body + j * W, stream_all || j < cache_n);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = j0 + static_cast<int64_t>(u) * nth;
      if (j < L.nvec) {
        if (j < cache_n) cache[j] = pk[u];
        float y[W];
        unpack(pk[u], y, tau);
        partial_add<W, ENT>(P, y, label_in_chunk<W>(label, L.head + j * W));
      }
    }
  }
  if (tid < L.tail) {
    const int64_t e = L.head + L.nvec * W + tid;
    const float y[1] = {to_f(px[e]) / tau};
    partial_add<1, ENT>(P, y, e == label ? 0 : -1);
  }
  return P;
}

// d = coef * (onehot - p), written as Triton writes it: c * q on the label (1 - p = q / s from the
// other terms, which keeps its digits when p ~ 1), -c * exp(y - shift) elsewhere, with c = coef / s,
// y = x / tau and shift = the row max: y - max is exact where it matters, while an fp32 lse is
// rounded to the ulp of the max (5e-4 at |x| ~ 1e4), which would show in every p of the row.
struct GradScale {
  float shift;  // the row max (0 while it is -inf)
  float c;      // coef / s
  float cq;     // coef * q / s: the label's entry
};

RER_HD GradScale grad_scale(float shift, float s, float q, float coef) {
  const float c = coef / s;
  return GradScale{shift, c, c * q};
}

// Every entry but the label's (label_grad rewrites that one).
RER_HD float grad_elem(float y, const GradScale& g) { return -g.c * fast_exp(y - g.shift); }

// Sweep 2 of one thread: its chunks last-to-first, so the uncached end of the row, the part
// loaded most recently in sweep 1, is re-read while it is most likely still in L2.
template <typename T>
RER_HD void sweep2(const T* px, T* pdx, const RowLayout& L, bool vec_store, int tid, int nth, float tau,
                   const GradScale& g, const Pack<T>* cache, int64_t cache_n) {
  constexpr int W = Pack<T>::W;
  constexpr int U = 4;
  if (tid < L.tail) {
    const int64_t e = L.head + L.nvec * W + tid;
    pdx[e] = from_f<T>(grad_elem(to_f(px[e]) / tau, g));
  }
  if (tid < L.nvec) {
    const T* body = px + L.head;
    T* dbody = pdx + L.head;
    const int64_t K = (L.nvec - 1 - tid) / nth + 1;  // chunks of this thread
    for (int64_t k0 = K - 1; k0 >= 0; k0 -= U) {
      Pack<T> pk[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = tid + (k0 - u) * nth;
        if (k0 - u >= 0) pk[u] = j < cache_n ? cache[j] : load_pack(body + j * W, true);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (k0 - u < 0) continue;
        const int64_t j = tid + (k0 - u) * nth;
        const int64_t e0 = L.head + j * W;
        float d[W];
        unpack(pk[u], d, tau);
#pragma unroll
        for (int k = 0; k < W; ++k) d[k] = grad_elem(d[k], g);
        if (vec_store) {
          Pack<T> out;
          pack(d, out);
          store_pack(dbody + j * W, out);
        } else {
#pragma unroll
          for (int k = 0; k < W; ++k) pdx[e0 + k] = from_f<T>(d[k]);
        }
      }
    }
  }
  if (tid < L.head) pdx[tid] = from_f<T>(grad_elem(to_f(px[tid]) / tau, g));
}

// The label's entry, coef * q / s, over what sweep 2 wrote there: one thread, after a barrier that
// follows every thread's sweep 2. Any test for the label inside sweep 2's loop costs registers (the
// 16-bit gradient kernels spilled on sm_90 with one).
template <typename T>
RER_HD void label_grad(T* pdx, int64_t label, int64_t V, const GradScale& g) {
  if (label >= 0 && label < V) pdx[label] = from_f<T>(g.cq);
}

// One thread's share of a zero gradient row (masked rows); L is the layout of pdx itself.
template <typename T>
RER_HD void zero_row(T* pdx, const RowLayout& L, int tid, int nth) {
  constexpr int W = Pack<T>::W;
  const Pack<T> z{{0u, 0u, 0u, 0u}};  // +0 in every dtype
  if (tid < L.head) pdx[tid] = from_f<T>(0.f);
  for (int64_t j = tid; j < L.nvec; j += nth) store_pack(pdx + L.head + j * W, z);
  if (tid < L.tail) pdx[L.head + L.nvec * W + tid] = from_f<T>(0.f);
}

struct TokenParams {
  float lo, hi, delta, dual_c, beta, is_cap;
  bool has_delta, has_dual;
  bool kl_is;  // bias-corrected KL: the k3 term times the unclipped ratio r (Triton's KL_IS)
  bool w_kl;   // is_weight_kl: the behavior weight w multiplies the KL term too (Triton's W_KL)
};

struct TokenTerms {
  float loss;  // loss_tok
  float dl;    // d loss_tok / d logp
};

struct K3 {
  float kl;   // exp(d) - d - 1
  float em1;  // expm1(d) = -(d kl / d logp)
};

// The k3 KL at d = ref - logp without cancellation (grpo_math.k3_terms, triton_token._k3): below |d| = 0.5
// from the series of exp(d) - 1 - d (1/k!, k = 2..10), where exp(d) - d - 1 and 1 - exp(d) would lose
// their digits to the rounding of exp(d); else from exp(d) - 1.
RER_HD K3 k3_terms(float d) {
  const bool small = fabsf(d) < 0.5f;
  const float ds = small ? d : 0.f;
  float c = 2.755731922398589e-07f;
  c = c * ds + 2.7557319223985893e-06f;
  c = c * ds + 2.48015873015873e-05f;
  c = c * ds + 0.0001984126984126984f;
  c = c * ds + 0.001388888888888889f;
  c = c * ds + 0.008333333333333333f;
  c = c * ds + 0.041666666666666664f;
  c = c * ds + 0.16666666666666666f;
  c = c * ds + 0.5f;
  const float kl_small = ds * ds * c;
  const float em1 = small ? ds + kl_small : expf(d) - 1.f;
  return K3{small ? kl_small : em1 - d, em1};
}

// The per-token GRPO terms, line for line triton_token._token_terms
// (torch's min / max / clamp tie conventions; see kernels/grpo_math.py for the derivation), from the
// log differences d_old = logp - old, d_beh = old - behavior and d_ref = ref - logp, each taken with
// the pair logp + logp_lo (grpo_math._log_diffs).
RER_HD TokenTerms token_terms(float d_old, float adv, bool has_beh, float d_beh, bool has_ref, float d_ref,
                              const TokenParams& p) {
  const float r = expf(d_old);
  const float cl = fminf(fmaxf(r, p.lo), p.hi);
  float g_ratio = adv * r;
  float rd = r;
  if (p.has_delta) {
    rd = fminf(r, p.delta);
    g_ratio = r <= p.delta ? g_ratio : 0.f;
  }
  const float g_clip = (r >= p.lo && r <= p.hi) ? adv * r : 0.f;
  const float a = rd * adv;
  const float b = cl * adv;
  float sur = fminf(a, b);
  float ds = a < b ? g_ratio : (a > b ? g_clip : 0.5f * (g_ratio + g_clip));
  if (p.has_dual) {
    const float floor_ = p.dual_c * adv;
    const bool neg = adv < 0.f;
    ds = (neg && sur < floor_) ? 0.f : ((neg && sur == floor_) ? 0.5f * ds : ds);
    sur = neg ? fmaxf(sur, floor_) : sur;
  }
  const float w = has_beh ? fminf(expf(d_beh), p.is_cap) : 1.f;
  TokenTerms out{-w * sur, -w * ds};
  if (has_ref) {
    const K3 k = k3_terms(d_ref);
    const float bw = p.w_kl ? p.beta * w : p.beta;
    if (p.kl_is) {
      out.loss += bw * r * k.kl;
      out.dl -= bw * r * d_ref;
    } else {
      out.loss += bw * k.kl;
      out.dl -= bw * k.em1;
    }
  }
  return out;
}

inline TokenParams token_params(const RerGrpoArgs& a) {
  return TokenParams{a.clip_lo, a.clip_hi, a.delta, a.dual_clip, a.beta, a.is_cap,
                     a.has_delta != 0, a.has_dual != 0, a.bias_correction_kl != 0, a.is_weight_kl != 0};
}

// The rounding error of s = fl(a + b): a + b = s + err exactly (Knuth's TwoSum, any magnitudes). Only
// additions: nothing for the compiler to contract into an FMA.
RER_HD float two_sum_err(float a, float b, float s) {
  const float bb = s - a;
  return (a - (s - bb)) + (b - bb);
}

struct LabelLogp {
  float hi, lo;  // log p_label = hi + lo to ~1e-7 absolute
};

// torch_grpo.label_logp: hi = y_label + (y_err - log s), one rounding of x_label - max - log s (y_err is
// the rounding error of y_label = x_label - max), and lo = the rounding error of that addition. At
// |x| ~ 1e4 a correctly rounded fp32 logp is still ~5e-4 off; the O(B*T) terms take differences such
// as logp - old, where that error is all that is left, so they use the pair. Where the label holds
// nearly all the mass, log s rounds s = 1 + tiny and loses the digits: there -log1p(q / e_label), lo = 0.
RER_HD LabelLogp label_logp(float y_label, float y_err, float e_label, float q, float log_s) {
  const float z = q / e_label;
  if (z < 1e-3f) return LabelLogp{-log1pf(z), 0.f};
  const float t = y_err - log_s;
  const float hi = y_label + t;
  const float lo = two_sum_err(y_label, t, hi);
  return LabelLogp{hi, std::isfinite(lo) ? lo : 0.f};
}

// Thread 0's work on an unmasked row once the partials are merged: writes logp / logp_lo / lse / the
// row stats / entropy / loss_tok and returns the gradient's scale. The label's term uses the accurate
// expf (once per row) where the sweeps use fast_exp.
RER_HD GradScale finish_row(const RerGrpoArgs& a, const TokenParams& tp, int64_t row, int64_t b, const Partial& P,
                            int64_t label, float x_label) {
  const float shift = P.m == neg_inf() ? 0.f : P.m;
  const float y_label = x_label - shift;
  const float y_err_raw = two_sum_err(x_label, -shift, y_label);
  const float y_err = y_err_raw == y_err_raw ? y_err_raw : 0.f;  // inf - inf: no correction
  // an id outside the row (x_label NaN) adds nothing to s: lse stays finite, logp is NaN
  const float e_label = (label >= 0 && label < a.V) ? expf(y_label) : 0.f;
  const float s = P.q + e_label;
  const float log_s = logf(s);
  const LabelLogp lp = label_logp(y_label, y_err, e_label, P.q, log_s);
  a.logp[row] = lp.hi;
  a.lse[row] = shift + log_s;
  if (a.logp_lo) a.logp_lo[row] = lp.lo;
  if (a.row_max) a.row_max[row] = shift;
  if (a.row_s) a.row_s[row] = s;
  if (a.row_q) a.row_q[row] = P.q;
  if (a.return_entropy) a.entropy[row] = log_s - (P.t + (e_label > 0.f ? e_label * y_label : 0.f)) / s;
  if (!a.fused_loss) return GradScale{shift, 0.f, 0.f};
  const float logp = lp.hi;
  // no old: old is the same pair as logp, the log ratio exactly 0
  const bool has_old = a.old_logp != nullptr, has_beh = a.beh_logp != nullptr, has_ref = a.ref_logp != nullptr;
  const float old = has_old ? a.old_logp[row] : logp;
  const float d_old = has_old ? (logp - old) + lp.lo : 0.f;
  const float d_beh = !has_beh ? 0.f : has_old ? old - a.beh_logp[row] : (logp - a.beh_logp[row]) + lp.lo;
  const float d_ref = has_ref ? (a.ref_logp[row] - logp) - lp.lo : 0.f;
  const TokenTerms tt = token_terms(d_old, a.adv[b], has_beh, d_beh, has_ref, d_ref, tp);
  a.loss_tok[row] = tt.loss;
  return grad_scale(shift, s, P.q, a.rw[row] * tt.dl / a.tau);
}

// Masked rows: zeros, and s = 1 so that nothing downstream divides by 0.
RER_HD void finish_masked_row(const RerGrpoArgs& a, int64_t row) {
  a.logp[row] = 0.f;
  a.lse[row] = 0.f;
  if (a.logp_lo) a.logp_lo[row] = 0.f;
  if (a.row_max) a.row_max[row] = 0.f;
  if (a.row_s) a.row_s[row] = 1.f;
  if (a.row_q) a.row_q[row] = 0.f;
  if (a.return_entropy) a.entropy[row] = 0.f;
  if (a.fused_loss) a.loss_tok[row] = 0.f;
}

// The label's x, or NaN for an id outside [0, V) (never an out-of-bounds read).
template <typename T>
RER_HD float label_x(const T* px, int64_t label, int64_t V, float tau) {
  return (label >= 0 && label < V) ? to_f(px[label]) / tau : NAN;
}

// ---- host-side policy and checks (shared by the library and the emulator) ----

inline int elem_size(int32_t dtype) { return dtype == RERULE_DTYPE_F32 ? 4 : 2; }

// About four 16-byte loads per thread per row, 64..1024 threads.
inline int choose_threads(int64_t V, int32_t dtype, int32_t requested) {
  if (requested > 0) return requested;
  const int64_t W = 16 / elem_size(dtype);
  const int64_t want = ((V + W - 1) / W + 3) / 4;
  int t = 64;
  while (t < want && t < 1024) t *= 2;
  return t;
}

// 16-byte chunks of a row kept in shared memory for sweep 2: all of the row when it fits.
// A body has at most V / W chunks whatever the row's alignment.
inline int64_t choose_cache_chunks(int64_t V, int32_t dtype, int64_t cache_bytes, int64_t smem_avail) {
  if (cache_bytes == 0 || smem_avail <= 0) return 0;
  const int64_t bytes = cache_bytes < 0 ? smem_avail : (cache_bytes < smem_avail ? cache_bytes : smem_avail);
  const int64_t most = V / (16 / elem_size(dtype));
  const int64_t n = bytes / 16;
  return n < most ? n : most;
}

// Rows of dlogits must not overlap (two blocks would race on them): torch's non-overlap rule.
inline bool rows_disjoint(int64_t B, int64_t T, int64_t V, int64_t sb, int64_t st) {
  int64_t s1 = st, n1 = T, s2 = sb, n2 = B;
  if (n1 <= 1) { s1 = sb; n1 = B; s2 = 0; n2 = 1; }
  if (n2 > 1 && s2 < s1) { int64_t ts = s1, tn = n1; s1 = s2; n1 = n2; s2 = ts; n2 = tn; }
  if (n1 > 1 && s1 < V) return false;
  if (n2 > 1 && s2 < s1 * n1) return false;
  return true;
}

inline const char* check_rows(int32_t dtype, int64_t B, int64_t T, int64_t V, const void* logits, int64_t sb,
                              int64_t st, float tau, int32_t threads, const int64_t* ids, const int32_t* mask) {
  if (dtype != RERULE_DTYPE_F32 && dtype != RERULE_DTYPE_F16 && dtype != RERULE_DTYPE_BF16)
    return "dtype must be RERULE_DTYPE_F32 (0), _F16 (1) or _BF16 (2)";
  if (B < 0 || T < 0) return "B and T must be >= 0";
  if (V < 1 || V > (int64_t(1) << 40)) return "V must be in [1, 2^40]";
  if (B > 0 && T > INT64_MAX / B) return "B * T overflows int64";
  if (sb < 0 || st < 0) return "logits strides must be >= 0";
  if (!(tau > 0.f) || std::isinf(tau)) return "tau must be finite and > 0";
  if (threads != 0 && (threads < 32 || threads > 1024 || threads % 32 != 0))
    return "threads must be 0 (auto) or a multiple of 32 in [32, 1024]";
  if (B * T == 0) return nullptr;
  if (!logits || !ids || !mask) return "logits, ids and mask must not be NULL";
  if (reinterpret_cast<uintptr_t>(logits) % elem_size(dtype)) return "logits must be aligned to its element size";
  return nullptr;
}

inline const char* check_dx(int32_t dtype, int64_t B, int64_t T, int64_t V, const void* dx, int64_t sdb, int64_t sdt) {
  if (!dx) return "dlogits must not be NULL when a gradient is written";
  if (reinterpret_cast<uintptr_t>(dx) % elem_size(dtype)) return "dlogits must be aligned to its element size";
  if (sdb < 0 || sdt < 0 || !rows_disjoint(B, T, V, sdb, sdt))
    return "dlogits rows overlap (bad stride_db / stride_dt)";
  return nullptr;
}

inline const char* check_fwd(const RerGrpoArgs& a) {
  if (const char* e = check_rows(a.dtype, a.B, a.T, a.V, a.logits, a.stride_b, a.stride_t, a.tau, a.threads,
                                 a.ids, a.mask))
    return e;
  if (a.compute_grad && !a.fused_loss) return "compute_grad needs fused_loss";
  if (a.B * a.T == 0) return nullptr;
  if (!a.logp || !a.lse) return "logp and lse must not be NULL";
  if (a.return_entropy && !a.entropy) return "return_entropy needs entropy";
  if (a.fused_loss && (!a.adv || !a.rw || !a.loss_tok)) return "fused_loss needs adv, rw and loss_tok";
  if (a.compute_grad) return check_dx(a.dtype, a.B, a.T, a.V, a.dlogits, a.stride_db, a.stride_dt);
  return nullptr;
}

inline const char* check_grad(const RerGrpoGradArgs& a) {
  if (const char* e = check_rows(a.dtype, a.B, a.T, a.V, a.logits, a.stride_b, a.stride_t, a.tau, a.threads,
                                 a.ids, a.mask))
    return e;
  if (a.B * a.T == 0) return nullptr;
  if (!a.row_max || !a.row_s || !a.row_q || !a.g) return "row_max, row_s, row_q and g must not be NULL";
  return check_dx(a.dtype, a.B, a.T, a.V, a.dlogits, a.stride_db, a.stride_dt);
}

}  // namespace rerule
