// silu(gate) * up over a packed [tokens, 2 * d] gate_up projection; silu's result is rounded to the
// model dtype before the multiply, as eager torch does.

#include "dtype.cuh"

namespace pagedlm::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void silu_and_mul_kernel(T* out, const T* input, int d, int64_t out_stride, int64_t input_stride) {
  const T* gate = input + blockIdx.y * input_stride;
  const T* up = gate + d;
  T* y = out + blockIdx.y * out_stride;
  for (int i = blockIdx.x * kThreads + threadIdx.x; i < d; i += gridDim.x * kThreads) {
    const float g = to_float(gate[i]);
    y[i] = from_float<T>(round_to<T>(g / (1.f + expf(-g))) * to_float(up[i]));
  }
}

}  // namespace

cudaError_t launch_silu_and_mul(void* out, const void* input, int num_tokens, int d, int64_t out_stride,
                                int64_t input_stride, DType dtype, cudaStream_t stream) {
  if (num_tokens == 0 || d == 0) return cudaSuccess;
  const dim3 grid((d + kThreads - 1) / kThreads, num_tokens);
  return dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    silu_and_mul_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<T*>(out), static_cast<const T*>(input), d,
                                                          out_stride, input_stride);
    return cudaGetLastError();
  });
}

}  // namespace pagedlm::cuda
