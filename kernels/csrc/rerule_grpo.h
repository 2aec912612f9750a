/*
 * rerule CUDA backend: the fused GRPO loss over logits, behind a plain C interface.
 *
 * The library needs no torch headers: the caller passes raw device pointers, sizes, element
 * strides, a dtype code and a stream. kernels/cuda_grpo.py mirrors these structs with ctypes
 * (tests/test_cuda_backend.py holds every field offset to what a C compiler makes of this file).
 *
 * Spec: kernels/reference.py; the same algorithm as kernels/triton_grpo.py. Per row (b, t) of
 * logits [B, T, V] with element strides (stride_b, stride_t, 1), with x = logits / tau in fp32:
 *   lse = logsumexp(x), logp = x[label] - lse, entropy = -sum softmax(x) log softmax(x)
 * with logp as an fp32 pair logp + logp_lo (~1e-7 absolute at |x| ~ 1e4, where a rounded fp32 logp is
 * ~5e-4 off: the per-token terms take logp - old, old - behavior and ref - logp with the pair)
 * and, for token-level losses, loss_tok and dlogits = rw * dloss/dlogp * (onehot - softmax) / tau
 * in the logits dtype. Rows with mask 0 get zeros everywhere (and a zero gradient row).
 *
 * Every entry point returns 0 on success or a cudaError_t code (cudaErrorInvalidValue = 1 for a
 * rejected argument; rerule_cuda_last_message() then says which).
 */
#ifndef RERULE_GRPO_H
#define RERULE_GRPO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define RERULE_API __declspec(dllexport)
#else
#define RERULE_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a struct below or a function signature changes (2: bias_correction_kl, which
 * left sizeof(RerGrpoArgs) unchanged, so only the version tells the layouts apart; 3: tau instead of
 * 1 / tau, is_weight_kl, the row max / log-sum outputs and the gradient kernel's row_max / row_log_s
 * inputs in place of lse; 4: logp_lo, and the row sums row_s / row_q in place of row_log_s, in and out). */
#define RERULE_CUDA_ABI_VERSION 4

/* dtype codes of the logits (and of dlogits, which always has the logits dtype). */
#define RERULE_DTYPE_F32 0
#define RERULE_DTYPE_F16 1
#define RERULE_DTYPE_BF16 2

/* Arguments of rerule_grpo_fwd. Pointers are device pointers; [N] arrays (N = B * T) are
 * contiguous and indexed by row n = b * T + t. */
typedef struct RerGrpoArgs {
  const void* logits;      /* [B, T, V], strides (stride_b, stride_t, 1) in elements */
  void* dlogits;           /* [B, T, V], strides (stride_db, stride_dt, 1); compute_grad only; may equal logits */
  const int64_t* ids;      /* [N] labels in [0, V) (an id outside gives NaN, never an out-of-bounds read) */
  const int32_t* mask;     /* [N] 0 = padding */
  const float* adv;        /* [B] advantages (fused_loss only) */
  const float* rw;         /* [N] reduction weights, loss = sum(rw * loss_tok) (fused_loss only) */
  const float* old_logp;   /* [N] or NULL: NULL means old = logp (ratio 1) */
  const float* beh_logp;   /* [N] or NULL: NULL means w = 1 */
  const float* ref_logp;   /* [N] or NULL: NULL means no KL term */
  float* logp;             /* [N] out */
  float* logp_lo;          /* [N] out or NULL: the low part of logp (0 where logp is -log1p(q / e_label)) */
  float* lse;              /* [N] out: logsumexp(logits / tau) */
  float* row_max;          /* [N] out or NULL: max of logits / tau (0 for an all -inf row) */
  float* row_s;            /* [N] out or NULL: s = sum exp(logits / tau - row_max) (1 for a masked row) */
  float* row_q;            /* [N] out or NULL: the same sum without the label's term (1 - p_label = q / s) */
  float* entropy;          /* [N] out, return_entropy only */
  float* loss_tok;         /* [N] out, fused_loss only */
  int64_t B, T, V;
  int64_t stride_b, stride_t;
  int64_t stride_db, stride_dt;
  int64_t cache_bytes;     /* shared-memory row cache for the gradient sweep: -1 auto, 0 off, > 0 a cap */
  float tau;               /* temperature: logits are divided by it (a true division, as eager torch) */
  float clip_lo, clip_hi;  /* 1 - epsilon_low, 1 + epsilon_high */
  float delta;             /* used when has_delta */
  float dual_clip;         /* used when has_dual */
  float beta;              /* k3 KL coefficient (used when ref_logp != NULL) */
  float is_cap;            /* w = min(exp(old - beh), is_cap) */
  int32_t dtype;           /* RERULE_DTYPE_* */
  int32_t has_delta, has_dual;
  int32_t bias_correction_kl; /* k3 KL term (and its gradient) times exp(logp - old), unclipped */
  int32_t is_weight_kl;    /* the behavior weight w also multiplies the KL term */
  int32_t fused_loss;      /* compute loss_tok (token-level GRPO terms) */
  int32_t compute_grad;    /* write dlogits (needs fused_loss) */
  int32_t return_entropy;
  int32_t threads;         /* threads per block: 0 = auto, else a multiple of 32 in [32, 1024] */
  int32_t device;          /* CUDA device ordinal of every pointer (ignored by the host emulator) */
} RerGrpoArgs;

/* Arguments of rerule_grpo_grad: dlogits = g * (onehot(ids) - softmax(logits / tau)) / tau,
 * zero rows where mask is 0. */
typedef struct RerGrpoGradArgs {
  const void* logits;      /* [B, T, V], strides (stride_b, stride_t, 1) */
  void* dlogits;           /* [B, T, V], strides (stride_db, stride_dt, 1); may equal logits */
  const int64_t* ids;      /* [N] */
  const int32_t* mask;     /* [N] */
  const float* row_max;    /* [N] from rerule_grpo_fwd: p = exp(x / tau - row_max) / row_s, relative to the */
  const float* row_s;      /* [N]    kept max, never through a rounded lse (exact at |x| ~ 1e4), and */
  const float* row_q;      /* [N]    1 - p_label = row_q / row_s */
  const float* g;          /* [N] d loss / d logp */
  int64_t B, T, V;
  int64_t stride_b, stride_t;
  int64_t stride_db, stride_dt;
  float tau;
  int32_t dtype;
  int32_t threads;
  int32_t device;
} RerGrpoGradArgs;

/* `stream` is a cudaStream_t (NULL = the legacy default stream). */
RERULE_API int rerule_grpo_fwd(const RerGrpoArgs* args, void* stream);
RERULE_API int rerule_grpo_grad(const RerGrpoGradArgs* args, void* stream);

RERULE_API int rerule_cuda_abi_version(void);
RERULE_API size_t rerule_grpo_args_size(void);
RERULE_API size_t rerule_grpo_grad_args_size(void);
/* cudaGetErrorString of a returned code. */
RERULE_API const char* rerule_cuda_error_string(int code);
/* What the last rejected call of this thread got wrong ("" if none). */
RERULE_API const char* rerule_cuda_last_message(void);

#ifdef __cplusplus
}
#endif

#endif /* RERULE_GRPO_H */
