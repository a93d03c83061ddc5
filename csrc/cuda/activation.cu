// act(gate) * up over a packed [tokens, 2 * d] gate_up projection; the activation's result is rounded
// to the model dtype before the multiply, as eager torch does. act is SiLU or GELU's tanh
// approximation (torch's approximate="tanh").

#include "dtype.cuh"

#include <type_traits>

namespace pagedlm::cuda {
namespace {

constexpr int kThreads = 256;

template <Activation kAct>
__device__ __forceinline__ float activate(float x) {
  if constexpr (kAct == Activation::kSilu) {
    return x / (1.f + expf(-x));
  } else {
    constexpr float kSqrt2OverPi = 0.7978845608028654f;
    const float cube = x * x * x;  // torch's operation order
    return 0.5f * x * (1.f + tanhf(kSqrt2OverPi * (x + 0.044715f * cube)));
  }
}

template <Activation kAct, typename T>
__global__ void act_and_mul_kernel(T* out, const T* input, int d, int64_t out_stride, int64_t input_stride) {
  // Tokens on the grid's x dimension (up to 2^31 - 1; y and z hold 65,535).
  const T* gate = input + blockIdx.x * input_stride;
  const T* up = gate + d;
  T* y = out + blockIdx.x * out_stride;
  for (int i = blockIdx.y * kThreads + threadIdx.x; i < d; i += gridDim.y * kThreads) {
    y[i] = from_float<T>(round_to<T>(activate<kAct>(to_float(gate[i]))) * to_float(up[i]));
  }
}

}  // namespace

cudaError_t launch_act_and_mul(void* out, const void* input, int num_tokens, int d, int64_t out_stride,
                               int64_t input_stride, Activation act, DType dtype, cudaStream_t stream) {
  if (num_tokens == 0 || d == 0) return cudaSuccess;
  const dim3 grid(num_tokens, (d + kThreads - 1) / kThreads);
  return dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    auto kernel = act == Activation::kSilu ? act_and_mul_kernel<Activation::kSilu, T>
                                           : act_and_mul_kernel<Activation::kGeluTanh, T>;
    kernel<<<grid, kThreads, 0, stream>>>(static_cast<T*>(out), static_cast<const T*>(input), d, out_stride,
                                          input_stride);
    return cudaGetLastError();
  });
}

}  // namespace pagedlm::cuda
