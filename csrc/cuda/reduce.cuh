#pragma once

#include <cuda_runtime.h>

namespace pagedlm::cuda {

constexpr int kWarpSize = 32;

// Butterfly reductions: every lane ends with the result.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Reduction over a block of kWarps warps through `scratch` (kWarps floats of shared memory);
// every thread gets the result. Contains __syncthreads, so every thread must call it.
template <int kWarps, bool kMax>
__device__ __forceinline__ float block_reduce(float x, float* scratch) {
  x = kMax ? warp_max(x) : warp_sum(x);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < kWarps ? scratch[lane] : (kMax ? -INFINITY : 0.f);
  x = kMax ? warp_max(x) : warp_sum(x);
  __syncthreads();  // scratch is free for the next reduction
  return x;
}

}  // namespace pagedlm::cuda
