// CUDA kernels of the fused GRPO loss over logits and their extern "C" entry points.
//
// One block per (b, t) row (a grid-stride loop over rows), the row algorithm of grpo_row.cuh:
// 16-byte vector loads, per-thread online softmax, a warp-shuffle + shared-memory merge, and,
// for the fused forward with gradient, a shared-memory copy of as much of the row as fits so
// that the gradient sweep reads it from there instead of from L2/DRAM.
#include <climits>
#include <cstdio>

#include "grpo_row.cuh"

namespace rerule {
namespace {

thread_local char g_message[256] = "";

int reject(const char* why) {
  std::snprintf(g_message, sizeof(g_message), "%s", why);
  return static_cast<int>(cudaErrorInvalidValue);
}

template <bool ENT>
__device__ __forceinline__ Partial warp_merge(Partial p) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Partial o;
    o.m = __shfl_xor_sync(0xffffffffu, p.m, off);
    o.q = __shfl_xor_sync(0xffffffffu, p.q, off);
    o.t = ENT ? __shfl_xor_sync(0xffffffffu, p.t, off) : 0.f;
    p = partial_merge<ENT>(p, o);
  }
  return p;
}

// The block's merged partial, valid in thread 0. blockDim.x is a multiple of 32.
template <bool ENT>
__device__ __forceinline__ Partial block_merge(Partial p, Partial* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  p = warp_merge<ENT>(p);
  if (lane == 0) red[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < nwarps ? red[lane] : partial_init();
    p = warp_merge<ENT>(p);
  }
  return p;
}

struct FwdParams {
  RerGrpoArgs a;
  TokenParams tp;
  int64_t n_rows;
  int64_t cache_n;  // 16-byte chunks of the row cached in dynamic shared memory (0 without a gradient)
};

template <typename T, bool ENT>
__global__ void __launch_bounds__(1024) grpo_fwd_kernel(const FwdParams P) {
  extern __shared__ uint4 smem_cache[];
  __shared__ Partial red[32];
  __shared__ GradScale bcast;
  Pack<T>* cache = reinterpret_cast<Pack<T>*>(smem_cache);
  const RerGrpoArgs& a = P.a;
  const int tid = threadIdx.x, nth = blockDim.x;
  const bool grad = a.compute_grad != 0;
  for (int64_t row = blockIdx.x; row < P.n_rows; row += gridDim.x) {
    const int64_t b = row / a.T, t = row - b * a.T;
    const T* px = static_cast<const T*>(a.logits) + b * a.stride_b + t * a.stride_t;
    T* pdx = grad ? static_cast<T*>(a.dlogits) + b * a.stride_db + t * a.stride_dt : nullptr;
    if (a.mask[row] == 0) {
      if (tid == 0) finish_masked_row(a, row);
      if (grad) zero_row<T>(pdx, row_layout<T>(pdx, a.V), tid, nth);
      continue;  // uniform across the block: no shared memory was touched
    }
    const int64_t label = a.ids[row];
    const RowLayout L = row_layout<T>(px, a.V);
    Partial p = sweep1<T, ENT>(px, L, tid, nth, a.tau, label, cache, P.cache_n, !grad);
    p = block_merge<ENT>(p, red);
    // x[label] is read before the barrier below: with dlogits == logits, sweep 2 overwrites it
    if (tid == 0) bcast = finish_row(a, P.tp, row, b, p, label, label_x(px, label, a.V, a.tau));
    if (grad) {
      __syncthreads();
      const GradScale gs = bcast;
      sweep2<T>(px, pdx, L, same_alignment(px, pdx), tid, nth, a.tau, gs, cache, P.cache_n);
    }
    // red / bcast are rewritten by the next row; every thread's sweep 2 is done
    __syncthreads();
    if (grad && tid == 0) label_grad<T>(pdx, label, a.V, bcast);
  }
}

template <typename T>
__global__ void __launch_bounds__(1024) grpo_grad_kernel(const RerGrpoGradArgs a, const int64_t n_rows) {
  const int tid = threadIdx.x, nth = blockDim.x;
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const int64_t b = row / a.T, t = row - b * a.T;
    const T* px = static_cast<const T*>(a.logits) + b * a.stride_b + t * a.stride_t;
    T* pdx = static_cast<T*>(a.dlogits) + b * a.stride_db + t * a.stride_dt;
    if (a.mask[row] == 0) {
      zero_row<T>(pdx, row_layout<T>(pdx, a.V), tid, nth);
      continue;
    }
    const GradScale gs = grad_scale(a.row_max[row], a.row_s[row], a.row_q[row], a.g[row] / a.tau);
    sweep2<T>(px, pdx, row_layout<T>(px, a.V), same_alignment(px, pdx), tid, nth, a.tau, gs, nullptr, 0);
    __syncthreads();
    if (tid == 0) label_grad<T>(pdx, a.ids[row], a.V, gs);
  }
}

// Runs on the pointers' device and puts the caller's current device back afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    err_ = cudaGetDevice(&prev_);
    if (err_ == cudaSuccess && prev_ != device) err_ = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int now = prev_;
    if (cudaGetDevice(&now) == cudaSuccess && now != prev_) cudaSetDevice(prev_);
  }
  cudaError_t status() const { return err_; }

 private:
  int prev_ = 0;
  cudaError_t err_;
};

unsigned grid_for(int64_t n_rows) { return static_cast<unsigned>(n_rows < INT_MAX ? n_rows : INT_MAX); }

template <typename T, bool ENT>
cudaError_t launch_fwd(const RerGrpoArgs& a, cudaStream_t stream) {
  auto kernel = grpo_fwd_kernel<T, ENT>;
  FwdParams P{a, token_params(a), a.B * a.T, 0};
  const int threads = choose_threads(a.V, a.dtype, a.threads);
  size_t smem = 0;
  if (a.compute_grad && a.cache_bytes != 0) {
    int optin = 0;
    cudaFuncAttributes attr;
    cudaError_t e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, a.device);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, kernel);
    if (e != cudaSuccess) return e;
    // keep 1 KB for the runtime's own per-block reservation
    const int64_t avail = static_cast<int64_t>(optin) - static_cast<int64_t>(attr.sharedSizeBytes) - 1024;
    P.cache_n = choose_cache_chunks(a.V, a.dtype, a.cache_bytes, avail);
    smem = static_cast<size_t>(P.cache_n) * 16;
    if (smem > 48 * 1024) {
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
  }
  kernel<<<grid_for(P.n_rows), threads, smem, stream>>>(P);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_fwd(const RerGrpoArgs& a, cudaStream_t stream) {
  return a.return_entropy ? launch_fwd<T, true>(a, stream) : launch_fwd<T, false>(a, stream);
}

template <typename T>
cudaError_t launch_grad(const RerGrpoGradArgs& a, cudaStream_t stream) {
  const int64_t n_rows = a.B * a.T;
  grpo_grad_kernel<T><<<grid_for(n_rows), choose_threads(a.V, a.dtype, a.threads), 0, stream>>>(a, n_rows);
  return cudaGetLastError();
}

}  // namespace
}  // namespace rerule

extern "C" {

RERULE_API int rerule_grpo_fwd(const RerGrpoArgs* args, void* stream) {
  using namespace rerule;
  g_message[0] = '\0';
  if (!args) return reject("args must not be NULL");
  if (const char* why = check_fwd(*args)) return reject(why);
  if (args->B * args->T == 0) return 0;
  DeviceGuard guard(args->device);
  if (guard.status() != cudaSuccess) return static_cast<int>(guard.status());
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t e;
  switch (args->dtype) {
    case RERULE_DTYPE_F32: e = dispatch_fwd<float>(*args, s); break;
    case RERULE_DTYPE_F16: e = dispatch_fwd<__half>(*args, s); break;
    default: e = dispatch_fwd<__nv_bfloat16>(*args, s); break;
  }
  return static_cast<int>(e);
}

RERULE_API int rerule_grpo_grad(const RerGrpoGradArgs* args, void* stream) {
  using namespace rerule;
  g_message[0] = '\0';
  if (!args) return reject("args must not be NULL");
  if (const char* why = check_grad(*args)) return reject(why);
  if (args->B * args->T == 0) return 0;
  DeviceGuard guard(args->device);
  if (guard.status() != cudaSuccess) return static_cast<int>(guard.status());
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t e;
  switch (args->dtype) {
    case RERULE_DTYPE_F32: e = launch_grad<float>(*args, s); break;
    case RERULE_DTYPE_F16: e = launch_grad<__half>(*args, s); break;
    default: e = launch_grad<__nv_bfloat16>(*args, s); break;
  }
  return static_cast<int>(e);
}

RERULE_API int rerule_cuda_abi_version(void) { return RERULE_CUDA_ABI_VERSION; }
RERULE_API size_t rerule_grpo_args_size(void) { return sizeof(RerGrpoArgs); }
RERULE_API size_t rerule_grpo_grad_args_size(void) { return sizeof(RerGrpoGradArgs); }
RERULE_API const char* rerule_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
RERULE_API const char* rerule_cuda_last_message(void) { return rerule::g_message; }

}  // extern "C"
