// Rotate-half rotary embedding in place, one block per token. Rounding follows HF's eager
// `x * cos + rotate_half(x) * sin`: each product, then the sum, rounded to the model dtype (with a
// float32 table, as OLMo 2/3 keep cos and sin, all in fp32 and rounded once); the _rn intrinsics
// keep nvcc from contracting them into an fma, which would round once.

#include <cassert>
#include <type_traits>

#include "dtype.cuh"

namespace pagedlm::cuda {
namespace {

constexpr int kThreads = 128;

// A product rounded to T where the table is in T.
template <typename T, typename Table>
__device__ float product(float a, float b) {
  const float v = __fmul_rn(a, b);
  if constexpr (std::is_same_v<Table, float>) return v;
  else return round_to<T>(v);
}

template <typename T, typename Table>
__device__ void rotate_pair(T* x, const Table* cos, const Table* sin, int i, int half) {
  const float a = to_float(x[i]), b = to_float(x[i + half]);
  const float c = to_float(cos[i]), s = to_float(sin[i]);
  x[i] = from_float<T>(__fsub_rn(product<T, Table>(a, c), product<T, Table>(b, s)));
  x[i + half] = from_float<T>(__fadd_rn(product<T, Table>(b, c), product<T, Table>(a, s)));
}

template <typename T, typename Table>
__global__ void rotary_embedding_kernel(RotaryParams p) {
  const int64_t token = blockIdx.x;
  const int64_t pos = p.positions[token];
  assert(pos >= 0 && pos < p.max_position);
  const int half = p.head_size / 2;
  const Table* cos = static_cast<const Table*>(p.cos_sin_cache) + pos * p.head_size;
  const Table* sin = cos + half;
  T* q = static_cast<T*>(p.query) + token * p.query_stride[0];
  T* k = static_cast<T*>(p.key) + token * p.key_stride[0];
  for (int j = threadIdx.x; j < (p.num_heads + p.num_kv_heads) * half; j += kThreads) {
    const int head = j / half, i = j % half;
    T* row = head < p.num_heads ? q + head * p.query_stride[1] : k + (head - p.num_heads) * p.key_stride[1];
    rotate_pair(row, cos, sin, i, half);
  }
}

}  // namespace

cudaError_t launch_rotary_embedding(const RotaryParams& p, DType dtype, bool fp32_table, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    if (fp32_table) {
      rotary_embedding_kernel<T, float><<<p.num_tokens, kThreads, 0, stream>>>(p);
    } else {
      rotary_embedding_kernel<T, T><<<p.num_tokens, kThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace pagedlm::cuda
