#pragma once
// fp32 conversions by intrinsic only: torch builds .cu files with __CUDA_NO_HALF_CONVERSIONS__ and
// friends, plain nvcc without them.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launchers.h"

namespace pagedlm::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// x rounded to T and back, as eager torch rounds each intermediate to the tensor dtype.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// Calls f(T{}) with the CUDA element type of dtype.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat: return f(float{});
    case DType::kHalf: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace pagedlm::cuda
