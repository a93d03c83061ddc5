// Causal varlen attention over the paged cache. One warp per (query token, head) runs an online
// softmax over the token's visible keys, 32 keys at a time: lane j holds the logit of key j of the
// chunk, and each lane accumulates head_size / 32 output dimensions in registers. The warps of a
// block are consecutive tokens of one head, so they share K/V rows through L1.

#include "dtype.cuh"
#include "launchers.h"
#include "reduce.cuh"

namespace pagedlm::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kDimsPerLane = kMaxHeadSize / kWarpSize;

// Index of the sequence owning query row `token`: the last b with cu_seqlens_q[b] <= token.
__device__ __forceinline__ int owner(const int32_t* cu_seqlens_q, int num_seqs, int token) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu_seqlens_q[mid] <= token) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// T: the queries' and outputs' element type; C: the cache's (T or fp8).
template <typename T, typename C>
__global__ void __launch_bounds__(kWarps * kWarpSize)
    prefill_attention_kernel(AttentionParams p, const int32_t* cu_seqlens_q, int num_tokens) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int token = blockIdx.x * kWarps + warp, head = blockIdx.y;
  if (token >= num_tokens || token >= cu_seqlens_q[p.num_seqs]) return;
  const int seq = owner(cu_seqlens_q, p.num_seqs, token);
  const int q_len = cu_seqlens_q[seq + 1] - cu_seqlens_q[seq];
  const int pos = p.seq_lens[seq] - q_len + (token - cu_seqlens_q[seq]);  // sees keys first_key(pos) ..= pos
  const int D = p.head_size, kv_head = head / (p.num_heads / p.num_kv_heads);
  const int32_t* table = p.block_tables + seq * p.table_stride;
  const C* key_cache = static_cast<const C*>(p.key_cache);
  const C* value_cache = static_cast<const C*>(p.value_cache);

  const T* query = static_cast<const T*>(p.query) + token * p.query_stride[0] + head * p.query_stride[1];
  float q[kDimsPerLane], acc[kDimsPerLane];
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) {
    const int d = lane + i * kWarpSize;
    q[i] = d < D ? to_float(query[d]) * p.scale : 0.f;
    acc[i] = 0.f;
  }

  float running_max = -INFINITY, running_sum = 0.f;
  for (int chunk = first_key(p, pos); chunk <= pos; chunk += kWarpSize) {
    const int n = min(kWarpSize, pos + 1 - chunk);
    float my_logit = -INFINITY;
    for (int j = 0; j < n; ++j) {
      const int t = chunk + j;
      const C* k = key_cache + ((static_cast<int64_t>(table[t / p.block_size]) * p.num_kv_heads + kv_head) *
                                    p.block_size + t % p.block_size) * D;
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) {
        const int d = lane + i * kWarpSize;
        if (d < D) s += q[i] * to_float(k[d]);
      }
      s = warp_sum(s);
      if (p.soft_cap > 0.f) s = p.soft_cap * tanhf(s / p.soft_cap);
      if (lane == j) my_logit = s;
    }
    const float new_max = fmaxf(running_max, warp_max(my_logit));
    const float correction = __expf(running_max - new_max);
    const float prob = lane < n ? __expf(my_logit - new_max) : 0.f;
    running_sum = running_sum * correction + warp_sum(prob);
    running_max = new_max;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[i] *= correction;
    for (int j = 0; j < n; ++j) {
      const int t = chunk + j;
      const C* v = value_cache + ((static_cast<int64_t>(table[t / p.block_size]) * p.num_kv_heads + kv_head) *
                                      p.block_size + t % p.block_size) * D;
      const float pj = __shfl_sync(0xffffffffu, prob, j);
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) {
        const int d = lane + i * kWarpSize;
        if (d < D) acc[i] += pj * to_float(v[d]);
      }
    }
  }

  T* out = static_cast<T*>(p.out) + token * p.out_stride[0] + head * p.out_stride[1];
  const float inv_sum = p.v_scale / running_sum;
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) {
    const int d = lane + i * kWarpSize;
    if (d < D) out[d] = from_float<T>(acc[i] * inv_sum);
  }
}

}  // namespace

cudaError_t launch_paged_prefill_attention(const AttentionParams& p, DType dtype, DType cache_dtype,
                                           const int32_t* cu_seqlens_q, int num_tokens, cudaStream_t stream) {
  if (num_tokens == 0 || p.num_seqs == 0) return cudaSuccess;
  const dim3 grid((num_tokens + kWarps - 1) / kWarps, p.num_heads);
  return dispatch_dtype_and_cache(dtype, cache_dtype, [&](auto t, auto c) {
    prefill_attention_kernel<decltype(t), decltype(c)><<<grid, kWarps * kWarpSize, 0, stream>>>(p, cu_seqlens_q, num_tokens);
    return cudaGetLastError();
  });
}

}  // namespace pagedlm::cuda
