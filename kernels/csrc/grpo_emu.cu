// Host emulator of grpo_kernels.cu, for tests on machines without a GPU (test-only; built when
// RERULE_CUDA_HOST_EMU=ON). It runs the same grpo_row.cuh code on host pointers, thread by
// thread in the kernels' phase order, with the same launch policy (threads per block, shared-
// memory cache size) and the same warp-shuffle merge tree. What it cannot check: the device-only
// branches of grpo_row.cuh (__ldcs / __stcs / __expf), the barriers, and the launch itself. The
// per-row math of finish_row (expf / logf / log1pf, TwoSum) is the same source on both sides.
//
// Exports the library's API with the prefix rerule_emu_ instead of rerule_, so
// kernels/cuda_grpo.py drives it through the same ctypes structs.
#include <cstdio>
#include <vector>

#include "grpo_row.cuh"

namespace rerule {
namespace {

thread_local char g_message[256] = "";

// What the emulated device would offer for the row cache (an H100's opt-in shared memory,
// less the kernel's static shared memory and the runtime's reservation).
constexpr int64_t kEmuSmemAvail = 227 * 1024 - 1024 - 512;

int reject(const char* why) {
  std::snprintf(g_message, sizeof(g_message), "%s", why);
  return static_cast<int>(cudaErrorInvalidValue);
}

// The block_merge of grpo_kernels.cu: a butterfly in each warp, lane 0 of each warp to shared
// memory, a butterfly in warp 0. Returns thread 0's value.
template <bool ENT>
Partial block_merge_emu(std::vector<Partial> p) {
  const int nth = static_cast<int>(p.size());
  auto warp_round = [](Partial* lanes) {
    for (int off = 16; off > 0; off >>= 1) {
      Partial next[32];
      for (int l = 0; l < 32; ++l) next[l] = partial_merge<ENT>(lanes[l], lanes[l ^ off]);
      for (int l = 0; l < 32; ++l) lanes[l] = next[l];
    }
  };
  Partial red[32];
  for (int w = 0; w < nth / 32; ++w) {
    warp_round(&p[32 * w]);
    red[w] = p[32 * w];
  }
  Partial lanes[32];
  for (int l = 0; l < 32; ++l) lanes[l] = l < nth / 32 ? red[l] : partial_init();
  warp_round(lanes);
  return lanes[0];
}

template <typename T, bool ENT>
void fwd_emu(const RerGrpoArgs& a) {
  const int nth = choose_threads(a.V, a.dtype, a.threads);
  const int64_t cache_n = a.compute_grad ? choose_cache_chunks(a.V, a.dtype, a.cache_bytes, kEmuSmemAvail) : 0;
  std::vector<Pack<T>> cache(static_cast<size_t>(cache_n > 0 ? cache_n : 1));
  std::vector<Partial> parts(nth);
  const TokenParams tp = token_params(a);
  const bool grad = a.compute_grad != 0;
  for (int64_t row = 0; row < a.B * a.T; ++row) {
    const int64_t b = row / a.T, t = row - b * a.T;
    const T* px = static_cast<const T*>(a.logits) + b * a.stride_b + t * a.stride_t;
    T* pdx = grad ? static_cast<T*>(a.dlogits) + b * a.stride_db + t * a.stride_dt : nullptr;
    if (a.mask[row] == 0) {
      finish_masked_row(a, row);
      if (grad)
        for (int tid = 0; tid < nth; ++tid) zero_row<T>(pdx, row_layout<T>(pdx, a.V), tid, nth);
      continue;
    }
    const int64_t label = a.ids[row];
    const RowLayout L = row_layout<T>(px, a.V);
    for (int tid = 0; tid < nth; ++tid)
      parts[tid] = sweep1<T, ENT>(px, L, tid, nth, a.tau, label, cache.data(), cache_n, !grad);
    const Partial p = block_merge_emu<ENT>(parts);
    const GradScale gs = finish_row(a, tp, row, b, p, label, label_x(px, label, a.V, a.tau));
    if (grad) {
      for (int tid = 0; tid < nth; ++tid)
        sweep2<T>(px, pdx, L, same_alignment(px, pdx), tid, nth, a.tau, gs, cache.data(), cache_n);
      label_grad<T>(pdx, label, a.V, gs);
    }
  }
}

template <typename T>
void grad_emu(const RerGrpoGradArgs& a) {
  const int nth = choose_threads(a.V, a.dtype, a.threads);
  for (int64_t row = 0; row < a.B * a.T; ++row) {
    const int64_t b = row / a.T, t = row - b * a.T;
    const T* px = static_cast<const T*>(a.logits) + b * a.stride_b + t * a.stride_t;
    T* pdx = static_cast<T*>(a.dlogits) + b * a.stride_db + t * a.stride_dt;
    if (a.mask[row] == 0) {
      for (int tid = 0; tid < nth; ++tid) zero_row<T>(pdx, row_layout<T>(pdx, a.V), tid, nth);
      continue;
    }
    const GradScale gs = grad_scale(a.row_max[row], a.row_s[row], a.row_q[row], a.g[row] / a.tau);
    for (int tid = 0; tid < nth; ++tid)
      sweep2<T>(px, pdx, row_layout<T>(px, a.V), same_alignment(px, pdx), tid, nth, a.tau, gs, nullptr, 0);
    label_grad<T>(pdx, a.ids[row], a.V, gs);
  }
}

template <typename T>
void dispatch_fwd(const RerGrpoArgs& a) {
  if (a.return_entropy)
    fwd_emu<T, true>(a);
  else
    fwd_emu<T, false>(a);
}

}  // namespace
}  // namespace rerule

extern "C" {

RERULE_API int rerule_emu_grpo_fwd(const RerGrpoArgs* args, void* /*stream*/) {
  using namespace rerule;
  g_message[0] = '\0';
  if (!args) return reject("args must not be NULL");
  if (const char* why = check_fwd(*args)) return reject(why);
  switch (args->dtype) {
    case RERULE_DTYPE_F32: dispatch_fwd<float>(*args); break;
    case RERULE_DTYPE_F16: dispatch_fwd<__half>(*args); break;
    default: dispatch_fwd<__nv_bfloat16>(*args); break;
  }
  return 0;
}

RERULE_API int rerule_emu_grpo_grad(const RerGrpoGradArgs* args, void* /*stream*/) {
  using namespace rerule;
  g_message[0] = '\0';
  if (!args) return reject("args must not be NULL");
  if (const char* why = check_grad(*args)) return reject(why);
  switch (args->dtype) {
    case RERULE_DTYPE_F32: grad_emu<float>(*args); break;
    case RERULE_DTYPE_F16: grad_emu<__half>(*args); break;
    default: grad_emu<__nv_bfloat16>(*args); break;
  }
  return 0;
}

RERULE_API int rerule_emu_cuda_abi_version(void) { return RERULE_CUDA_ABI_VERSION; }
RERULE_API size_t rerule_emu_grpo_args_size(void) { return sizeof(RerGrpoArgs); }
RERULE_API size_t rerule_emu_grpo_grad_args_size(void) { return sizeof(RerGrpoGradArgs); }
RERULE_API const char* rerule_emu_cuda_error_string(int code) {
  return code == 0 ? "no error" : code == 1 ? "invalid argument" : "unexpected error code";
}
RERULE_API const char* rerule_emu_cuda_last_message(void) { return rerule::g_message; }

}  // extern "C"
