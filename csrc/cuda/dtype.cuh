#pragma once
// fp32 conversions by intrinsic only: torch builds .cu files with __CUDA_NO_HALF_CONVERSIONS__ and
// friends, plain nvcc without them.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "launchers.h"

namespace pagedlm::cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
// fp8 widens to fp16 exactly.
__device__ __forceinline__ float to_float(__nv_fp8_e4m3 x) {
  return __half2float(__ushort_as_half(__nv_cvt_fp8_to_halfraw(x.__x, __NV_E4M3).x));
}
__device__ __forceinline__ float to_float(__nv_fp8_e5m2 x) {
  return __half2float(__ushort_as_half(__nv_cvt_fp8_to_halfraw(x.__x, __NV_E5M2).x));
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
// fp8 cache entries: saturated at the largest finite value, rounded to nearest even, NaN kept.
template <>
__device__ __forceinline__ __nv_fp8_e4m3 from_float<__nv_fp8_e4m3>(float x) {
  __nv_fp8_e4m3 r;
  r.__x = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
  return r;
}
template <>
__device__ __forceinline__ __nv_fp8_e5m2 from_float<__nv_fp8_e5m2>(float x) {
  __nv_fp8_e5m2 r;
  r.__x = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E5M2);
  return r;
}

// x rounded to T and back, as eager torch rounds each intermediate to the tensor dtype.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float(from_float<T>(x));
}

// Calls f(T{}) with the CUDA element type of dtype, a model dtype.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat: return f(float{});
    case DType::kHalf: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

// Calls f(T{}, C{}): T the element type of dtype, C the KV cache's (T itself or an fp8 type).
template <typename F>
cudaError_t dispatch_dtype_and_cache(DType dtype, DType cache_dtype, const F& f) {
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    switch (cache_dtype) {
      case DType::kFp8E4M3: return f(T{}, __nv_fp8_e4m3{});
      case DType::kFp8E5M2: return f(T{}, __nv_fp8_e5m2{});
      default: return cache_dtype == dtype ? f(T{}, T{}) : cudaErrorInvalidValue;
    }
  });
}

}  // namespace pagedlm::cuda
