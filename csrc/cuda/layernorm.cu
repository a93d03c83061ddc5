// RMSNorm, alone and fused with the residual add, one block per row, with Hugging Face's
// rounding: fp32 statistics, the residual sum rounded to the model dtype, then Llama's normalised
// row rounded to the model dtype before the weight multiplies it, or Gemma's row times
// (1 + weight) in fp32, rounded once.

#include "dtype.cuh"
#include "reduce.cuh"

#include <type_traits>

namespace pagedlm::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;

// rsqrtf, as torch.rsqrt on CUDA; every thread gets the result.
template <typename T>
__device__ float inv_rms(const T* x, int hidden, float epsilon) {
  __shared__ float scratch[kWarps];
  float acc = 0.f;
  for (int i = threadIdx.x; i < hidden; i += kThreads) {
    const float v = to_float(x[i]);
    acc += v * v;
  }
  return rsqrtf(block_reduce<kWarps, false>(acc, scratch) / static_cast<float>(hidden) + epsilon);
}

template <NormStyle kStyle, typename T>
__device__ void scale_row(T* out, const T* x, const T* weight, int hidden, float inv) {
  for (int i = threadIdx.x; i < hidden; i += kThreads) {
    if constexpr (kStyle == NormStyle::kGemma) {
      out[i] = from_float<T>(to_float(x[i]) * inv * (1.f + to_float(weight[i])));
    } else {
      out[i] = from_float<T>(to_float(weight[i]) * round_to<T>(to_float(x[i]) * inv));
    }
  }
}

// One block per row: token blockIdx.x, head blockIdx.y.
template <NormStyle kStyle, typename T>
__global__ void rms_norm_kernel(T* out, const T* input, const T* weight, int hidden, RowStrides out_strides,
                                RowStrides input_strides, float epsilon) {
  const T* x = input + blockIdx.x * input_strides.token + blockIdx.y * input_strides.head;
  scale_row<kStyle>(out + blockIdx.x * out_strides.token + blockIdx.y * out_strides.head, x, weight, hidden,
                    inv_rms(x, hidden, epsilon));
}

// Each thread rereads only the residual elements it wrote itself before the barrier inside inv_rms.
template <NormStyle kStyle, typename T>
__global__ void fused_add_rms_norm_kernel(T* input, T* residual, const T* weight, int hidden, int64_t input_stride,
                                          int64_t residual_stride, float epsilon) {
  T* x = input + blockIdx.x * input_stride;
  T* r = residual + blockIdx.x * residual_stride;
  for (int i = threadIdx.x; i < hidden; i += kThreads) r[i] = from_float<T>(to_float(x[i]) + to_float(r[i]));
  scale_row<kStyle>(x, r, weight, hidden, inv_rms(r, hidden, epsilon));
}

// f(std::integral_constant<NormStyle, style>{}).
template <typename F>
cudaError_t dispatch_style(NormStyle style, const F& f) {
  if (style == NormStyle::kGemma) return f(std::integral_constant<NormStyle, NormStyle::kGemma>{});
  return f(std::integral_constant<NormStyle, NormStyle::kLlama>{});
}

}  // namespace

cudaError_t launch_rms_norm(void* out, const void* input, const void* weight, int num_tokens, int num_heads,
                            int hidden, RowStrides out_strides, RowStrides input_strides, float epsilon,
                            NormStyle style, DType dtype, cudaStream_t stream) {
  if (num_tokens == 0 || num_heads == 0) return cudaSuccess;
  return dispatch_style(style, [&](auto kStyle) {
    return dispatch_dtype(dtype, [&](auto zero) {
      using T = decltype(zero);
      rms_norm_kernel<kStyle(), T><<<dim3(num_tokens, num_heads), kThreads, 0, stream>>>(
          static_cast<T*>(out), static_cast<const T*>(input), static_cast<const T*>(weight), hidden, out_strides,
          input_strides, epsilon);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_fused_add_rms_norm(void* input, void* residual, const void* weight, int num_tokens, int hidden,
                                     int64_t input_stride, int64_t residual_stride, float epsilon, NormStyle style,
                                     DType dtype, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  return dispatch_style(style, [&](auto kStyle) {
    return dispatch_dtype(dtype, [&](auto zero) {
      using T = decltype(zero);
      fused_add_rms_norm_kernel<kStyle(), T><<<num_tokens, kThreads, 0, stream>>>(
          static_cast<T*>(input), static_cast<T*>(residual), static_cast<const T*>(weight), hidden, input_stride,
          residual_stride, epsilon);
      return cudaGetLastError();
    });
  });
}

}  // namespace pagedlm::cuda
