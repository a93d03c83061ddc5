// Rotate-half rotary embedding in place, one block per token. Rounding follows HF's eager
// `x * cos + rotate_half(x) * sin`: each product, then the sum, rounded to the model dtype; the
// _rn intrinsics keep nvcc from contracting them into an fma, which would round once.

#include <cassert>

#include "dtype.cuh"

namespace pagedlm::cuda {
namespace {

constexpr int kThreads = 128;

template <typename T>
__device__ void rotate_pair(T* x, const T* cos, const T* sin, int i, int half) {
  const float a = to_float(x[i]), b = to_float(x[i + half]);
  const float c = to_float(cos[i]), s = to_float(sin[i]);
  x[i] = from_float<T>(__fsub_rn(round_to<T>(__fmul_rn(a, c)), round_to<T>(__fmul_rn(b, s))));
  x[i + half] = from_float<T>(__fadd_rn(round_to<T>(__fmul_rn(b, c)), round_to<T>(__fmul_rn(a, s))));
}

template <typename T>
__global__ void rotary_embedding_kernel(RotaryParams p) {
  const int64_t token = blockIdx.x;
  const int64_t pos = p.positions[token];
  assert(pos >= 0 && pos < p.max_position);
  const int half = p.head_size / 2;
  const T* cos = static_cast<const T*>(p.cos_sin_cache) + pos * p.head_size;
  const T* sin = cos + half;
  T* q = static_cast<T*>(p.query) + token * p.query_stride[0];
  T* k = static_cast<T*>(p.key) + token * p.key_stride[0];
  for (int j = threadIdx.x; j < (p.num_heads + p.num_kv_heads) * half; j += kThreads) {
    const int head = j / half, i = j % half;
    T* row = head < p.num_heads ? q + head * p.query_stride[1] : k + (head - p.num_heads) * p.key_stride[1];
    rotate_pair(row, cos, sin, i, half);
  }
}

}  // namespace

cudaError_t launch_rotary_embedding(const RotaryParams& p, DType dtype, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    rotary_embedding_kernel<T><<<p.num_tokens, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace pagedlm::cuda
