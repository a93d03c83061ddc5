// Decode attention: one query token per sequence. A thread block handles one (head, sequence,
// partition); long contexts use several partitions whose partial softmaxes a second kernel merges
// (vLLM's paged_attention_v2). Warps take tokens for Q.K; threads take dimensions for P.V.

#include "dtype.cuh"
#include "launchers.h"
#include "reduce.cuh"

namespace pagedlm::cuda {
namespace {

constexpr int kPartitionSize = 512;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;

// Workspace layout for P partitions: out [seqs, heads, P, head_size], then max and exp-sum
// [seqs, heads, P]; each partition's out is already divided by its own exp-sum.
struct Workspace {
  float* out;
  float* max;
  float* sum;
};

// Row of token t for kv_head, as an offset into the cache.
__device__ __forceinline__ int64_t row_offset(const AttentionParams& p, const int32_t* table, int kv_head, int t) {
  return ((static_cast<int64_t>(table[t / p.block_size]) * p.num_kv_heads + kv_head) * p.block_size +
          t % p.block_size) * p.head_size;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    paged_attention_kernel(AttentionParams p, Workspace ws, int partitions) {
  const int head = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
  const int seq_len = p.seq_lens[seq];
  const int begin = part * kPartitionSize;
  if (begin >= seq_len && part > 0) return;
  const int end = min(seq_len, begin + kPartitionSize);
  const int D = p.head_size, kv_head = head / (p.num_heads / p.num_kv_heads);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const T* key_cache = static_cast<const T*>(p.key_cache);
  const T* value_cache = static_cast<const T*>(p.value_cache);
  const int32_t* table = p.block_tables + seq * p.table_stride;

  __shared__ float q[kMaxHeadSize];
  __shared__ float logits[kPartitionSize];
  __shared__ float scratch[kWarps];
  const T* query = static_cast<const T*>(p.query) + seq * p.query_stride[0] + head * p.query_stride[1];
  for (int d = threadIdx.x; d < D; d += kThreads) q[d] = to_float(query[d]) * p.scale;
  __syncthreads();

  float max_logit = -INFINITY;
  for (int t = begin + warp; t < end; t += kWarps) {
    const T* k = key_cache + row_offset(p, table, kv_head, t);
    float s = 0.f;
    for (int d = lane; d < D; d += kWarpSize) s += q[d] * to_float(k[d]);
    s = warp_sum(s);
    if (lane == 0) logits[t - begin] = s;
    max_logit = fmaxf(max_logit, s);
  }
  max_logit = block_reduce<kWarps, true>(max_logit, scratch);

  float sum = 0.f;
  for (int i = threadIdx.x; i < end - begin; i += kThreads) {
    const float e = __expf(logits[i] - max_logit);
    logits[i] = e;
    sum += e;
  }
  sum = block_reduce<kWarps, false>(sum, scratch);  // also publishes logits to every thread
  // An empty context attends to nothing: write zeros rather than 0/0.
  const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;

  for (int d = threadIdx.x; d < D; d += kThreads) {
    float acc = 0.f;
    for (int t = begin; t < end; ++t) {
      acc += logits[t - begin] * to_float(value_cache[row_offset(p, table, kv_head, t) + d]);
    }
    acc *= inv_sum;
    if (partitions == 1) {
      T* out = static_cast<T*>(p.out) + seq * p.out_stride[0] + head * p.out_stride[1];
      out[d] = from_float<T>(acc);
    } else {
      ws.out[((static_cast<int64_t>(seq) * p.num_heads + head) * partitions + part) * D + d] = acc;
    }
  }
  if (partitions > 1 && threadIdx.x == 0) {
    const int64_t i = (static_cast<int64_t>(seq) * p.num_heads + head) * partitions + part;
    ws.max[i] = max_logit;
    ws.sum[i] = sum;
  }
}

// Merges the partitions of one (head, sequence): each is weighted by its exp-sum rescaled to the
// global max logit.
template <typename T>
__global__ void __launch_bounds__(kThreads) reduce_partitions_kernel(AttentionParams p, Workspace ws, int partitions) {
  const int head = blockIdx.x, seq = blockIdx.y, D = p.head_size;
  const int seq_len = p.seq_lens[seq];
  const int parts = max(1, (seq_len + kPartitionSize - 1) / kPartitionSize);
  const int64_t first = (static_cast<int64_t>(seq) * p.num_heads + head) * partitions;
  float global_max = -INFINITY;
  for (int i = 0; i < parts; ++i) global_max = fmaxf(global_max, ws.max[first + i]);
  float total = 0.f;
  for (int i = 0; i < parts; ++i) total += ws.sum[first + i] * __expf(ws.max[first + i] - global_max);
  T* out = static_cast<T*>(p.out) + seq * p.out_stride[0] + head * p.out_stride[1];
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float acc = 0.f;
    if (seq_len > 0) {
      for (int i = 0; i < parts; ++i)
        acc += ws.out[(first + i) * D + d] * ws.sum[first + i] * __expf(ws.max[first + i] - global_max);
      acc /= total;
    }
    out[d] = from_float<T>(acc);
  }
}

}  // namespace

int decode_partitions(int max_context) { return max(1, (max_context + kPartitionSize - 1) / kPartitionSize); }

int64_t decode_workspace_floats(int num_seqs, int num_heads, int head_size, int partitions) {
  return static_cast<int64_t>(num_seqs) * num_heads * partitions * (head_size + 2);
}

cudaError_t launch_paged_attention(const AttentionParams& p, DType dtype, int partitions, float* workspace,
                                   cudaStream_t stream) {
  if (p.num_seqs == 0) return cudaSuccess;
  const int64_t slots = static_cast<int64_t>(p.num_seqs) * p.num_heads * partitions;
  const Workspace ws{workspace, workspace + slots * p.head_size, workspace + slots * (p.head_size + 1)};
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    paged_attention_kernel<T><<<dim3(p.num_heads, p.num_seqs, partitions), kThreads, 0, stream>>>(p, ws, partitions);
    if (partitions > 1) {
      reduce_partitions_kernel<T><<<dim3(p.num_heads, p.num_seqs), kThreads, 0, stream>>>(p, ws, partitions);
    }
    return cudaGetLastError();
  });
}

}  // namespace pagedlm::cuda
