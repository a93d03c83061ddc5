// Greedy sampling in one read of the logits, one block per row: the first index of the maximum,
// and its log-probability logit - logsumexp = -log(sum(exp(x - max))) unless `logprobs` is null
// (the argmax op).

#include <cstdint>

#include "dtype.cuh"
#include "reduce.cuh"

namespace pagedlm::cuda {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * kWarpSize;

struct ArgMax {
  float value;
  int index;
};

// torch.argmax's order: the larger value wins, NaN above every number; on a tie the smaller index,
// so the result is the first maximum (the first NaN in a row holding one).
__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
  const bool a_nan = isnan(a.value), b_nan = isnan(b.value);
  const bool tie = a_nan == b_nan && (a_nan || b.value == a.value);
  return ((b_nan && !a_nan) || (!a_nan && b.value > a.value) || (tie && b.index < a.index)) ? b : a;
}

__device__ __forceinline__ ArgMax warp_argmax(ArgMax x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x = better(x, {__shfl_xor_sync(0xffffffffu, x.value, offset), __shfl_xor_sync(0xffffffffu, x.index, offset)});
  }
  return x;
}

template <typename T>
__global__ void argmax_logprob_kernel(const T* logits, int64_t* token_ids, float* logprobs, int vocab,
                                      int64_t row_stride) {
  __shared__ ArgMax partial[kWarps];
  __shared__ float scratch[kWarps];
  const T* row = logits + blockIdx.x * row_stride;
  ArgMax best{-INFINITY, vocab};
  for (int i = threadIdx.x; i < vocab; i += kThreads) best = better(best, {to_float(row[i]), i});
  best = warp_argmax(best);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) partial[warp] = best;
  __syncthreads();
  best = warp_argmax(lane < kWarps ? partial[lane] : ArgMax{-INFINITY, vocab});
  if (logprobs == nullptr) {  // the same for the whole block
    if (threadIdx.x == 0) token_ids[blockIdx.x] = best.index;
    return;
  }
  float sum = 0.f;
  for (int i = threadIdx.x; i < vocab; i += kThreads) sum += expf(to_float(row[i]) - best.value);
  sum = block_reduce<kWarps, false>(sum, scratch);
  if (threadIdx.x == 0) {
    token_ids[blockIdx.x] = best.index;  // every entry beats the initial {-inf, vocab}, -inf on its index
    logprobs[blockIdx.x] = -logf(sum);
  }
}

}  // namespace

cudaError_t launch_argmax_logprob(const void* logits, int64_t* token_ids, float* logprobs, int num_rows, int vocab,
                                  int64_t row_stride, DType dtype, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    argmax_logprob_kernel<T><<<num_rows, kThreads, 0, stream>>>(static_cast<const T*>(logits), token_ids, logprobs,
                                                                 vocab, row_stride);
    return cudaGetLastError();
  });
}

}  // namespace pagedlm::cuda
