// Decode and prefill attention over the paged cache, in one kernel: a query row (decode: a
// sequence's one query; prefill: one query token) sees the keys up to its position, and its
// output is a function of that position's keys and values alone, the same bits whether the row
// comes from a decode step, a prefill chunk or a recompute, and whatever else is in the batch.
//
// A thread block handles one KV head of one query row over one partition of its context, for up to
// kMaxGroup of the query heads that share that KV head (GQA), so each K/V row is read from memory
// once per block rather than once per query head. Contexts past kPartitionSize keys use several
// partitions whose partial softmaxes a second kernel merges (vLLM's paged_attention_v2); whether a
// row's output is merged depends on its own context only. K and V rows are read as 16-byte vectors:
// for Q.K a group of lanes covers one key row and the block takes several keys at once; for P.V each
// lane owns one vector of the output and a slice of the tokens, and the slices are summed by warp
// shuffles.

#include "dtype.cuh"
#include "launchers.h"
#include "reduce.cuh"

#include <algorithm>
#include <cassert>

namespace pagedlm::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
// Query heads per block: their query vectors live in registers, kMaxGroup * 16 bytes' worth each.
constexpr int kMaxGroup = 4;
// Keys each thread loads before using any, to keep several loads in flight.
constexpr int kUnroll = 2;
constexpr int kVecBytes = 16;
// A prefill launch takes as many query rows as a workspace of this many floats (256 MiB) holds.
constexpr int64_t kPrefillWorkspaceFloats = int64_t{1} << 26;
constexpr int64_t kMaxGridY = 65535;

template <typename T>
struct alignas(kVecBytes) Vec {
  static constexpr int kSize = kVecBytes / sizeof(T);
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[Vec<T>::kSize]) {
  const Vec<T> raw = *reinterpret_cast<const Vec<T>*>(ptr);
#pragma unroll
  for (int i = 0; i < Vec<T>::kSize; ++i) out[i] = to_float(raw.v[i]);
}

// The query rows of a launch: decode (cu_seqlens_q null) has one per sequence; prefill has the
// query tokens of the sequences cu_seqlens_q delimits. Rows row0, row0 + 1, ... are blockIdx.y 0, 1, ...
struct QueryRows {
  const int32_t* cu_seqlens_q;
  int row0;
};

// A query row's sequence and context (keys up to and including its position: position + 1).
struct RowContext {
  int seq;
  int context;
};

// Index of the sequence owning query token `token`: the last b with cu_seqlens_q[b] <= token.
__device__ __forceinline__ int owner(const int32_t* cu_seqlens_q, int num_seqs, int token) {
  int lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu_seqlens_q[mid] <= token) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ int checked_seq_len(const AttentionParams& p, int seq) {
  const int seq_len = p.seq_lens[seq];
  assert(seq_len >= 0 && seq_len <= static_cast<int64_t>(p.table_width) * p.block_size);
  return seq_len;
}

// context < 0: a prefill row past the last query token, which is left unwritten.
__device__ __forceinline__ RowContext row_context(const AttentionParams& p, QueryRows rows, int row) {
  if (rows.cu_seqlens_q == nullptr) return {row, checked_seq_len(p, row)};
  if (row >= rows.cu_seqlens_q[p.num_seqs]) return {0, -1};
  const int seq = owner(rows.cu_seqlens_q, p.num_seqs, row);
  const int q_len = rows.cu_seqlens_q[seq + 1] - rows.cu_seqlens_q[seq];
  const int seq_len = checked_seq_len(p, seq);
  assert(rows.cu_seqlens_q[0] == 0 && q_len >= 1 && q_len <= seq_len);  // row lies in seq's span
  return {seq, seq_len - q_len + (row - rows.cu_seqlens_q[seq]) + 1};
}

// Partitions of a context: a function of the context alone, so the same position is merged (or
// written directly) the same way in every batch.
__device__ __forceinline__ int context_partitions(const AttentionParams& p, int context) {
  return max(1, (context - first_key(p, context - 1) + kPartitionSize - 1) / kPartitionSize);
}

__device__ __forceinline__ int next_pow2(int x) { return x <= 1 ? 1 : 1 << (32 - __clz(x - 1)); }

// Workspace layout for P partitions: out [rows, heads, P, head_size], then max and exp-sum
// [rows, heads, P], rows counted from the launch's first; each partition's out is already divided
// by its own exp-sum.
struct Workspace {
  float* out;
  float* max;
  float* sum;
};

// Row of token t for kv_head, as an offset into the cache.
__device__ __forceinline__ int64_t row_offset(const AttentionParams& p, const int32_t* table, int kv_head, int t) {
  const int block = table[t / p.block_size];
  assert(block >= 0 && block < p.num_blocks);
  return ((static_cast<int64_t>(block) * p.num_kv_heads + kv_head) * p.block_size +
          t % p.block_size) * p.head_size;
}

// T: the queries' and outputs' element type; C: the cache's (T or fp8).
template <typename T, typename C>
__global__ void __launch_bounds__(kThreads)
    paged_attention_kernel(AttentionParams p, QueryRows rows, Workspace ws, int partitions, int head_chunks) {
  constexpr int E = Vec<C>::kSize;
  // Vectors of a row one lane covers in Q.K (head_size <= kMaxHeadSize, 32 lanes per row at most).
  constexpr int kVecsPerLane = (kMaxHeadSize / E + kWarpSize - 1) / kWarpSize;
  const int group = p.num_heads / p.num_kv_heads;
  const int kv_head = blockIdx.x / head_chunks, chunk = blockIdx.x % head_chunks;
  const int head0 = kv_head * group + chunk * kMaxGroup;
  const int heads = min(kMaxGroup, group - chunk * kMaxGroup);
  const int local = blockIdx.y, row = rows.row0 + local, part = blockIdx.z;
  const RowContext rc = row_context(p, rows, row);
  if (rc.context < 0) return;
  const int seq_len = rc.context, parts = context_partitions(p, seq_len);
  const int begin = first_key(p, seq_len - 1) + part * kPartitionSize;  // a window reads only its blocks
  if (begin >= seq_len && part > 0) return;
  const int n = min(seq_len, begin + kPartitionSize) - begin;
  const int D = p.head_size, nvec = D / E, padded = next_pow2(nvec);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const C* key_cache = static_cast<const C*>(p.key_cache);
  const C* value_cache = static_cast<const C*>(p.value_cache);
  const int32_t* table = p.block_tables + rc.seq * p.table_stride;

  __shared__ float logits[kMaxGroup][kPartitionSize];
  __shared__ float head_max[kMaxGroup], head_sum[kMaxGroup];

  // Q.K: `lanes` consecutive lanes (a power of two) cover one key row; lane `sub` of them takes
  // vectors sub, sub + lanes, ... and keeps the matching query elements of every head in registers.
  const int lanes = min(padded, kWarpSize), sub = threadIdx.x % lanes, keys_per_step = kThreads / lanes;
  float q[kVecsPerLane][kMaxGroup][E];
#pragma unroll
  for (int j = 0; j < kVecsPerLane; ++j) {
    const int v = sub + j * lanes;
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      const T* query = static_cast<const T*>(p.query) + row * p.query_stride[0] + (head0 + h) * p.query_stride[1];
#pragma unroll
      for (int e = 0; e < E; ++e) q[j][h][e] = (v < nvec && h < heads) ? to_float(query[v * E + e]) * p.scale : 0.f;
    }
  }
  // The loop bound is uniform across the block, so every lane reaches the shuffles below.
  for (int step = 0; step < n; step += kUnroll * keys_per_step) {
    const int t0 = step + threadIdx.x / lanes;
    float acc[kUnroll][kMaxGroup] = {};
#pragma unroll
    for (int j = 0; j < kVecsPerLane; ++j) {
      const int v = sub + j * lanes;
      float k[kUnroll][E];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int t = t0 + u * keys_per_step;
        if (v < nvec && t < n) {
          load_vec(key_cache + row_offset(p, table, kv_head, begin + t) + v * E, k[u]);
        } else {
#pragma unroll
          for (int e = 0; e < E; ++e) k[u][e] = 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int h = 0; h < kMaxGroup; ++h)
#pragma unroll
          for (int e = 0; e < E; ++e) acc[u][h] += q[j][h][e] * k[u][e];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u * keys_per_step;
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) {
        float s = acc[u][h];
        for (int offset = lanes / 2; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
        if (p.soft_cap > 0.f) s = p.soft_cap * tanhf(s / p.soft_cap);
        if (sub == 0 && t < n && h < heads) logits[h][t] = s;
      }
    }
  }
  __syncthreads();

  // Softmax of each head's logits, one warp per head.
  for (int h = warp; h < heads; h += kWarps) {
    float m = -INFINITY;
    for (int i = lane; i < n; i += kWarpSize) m = fmaxf(m, logits[h][i]);
    m = warp_max(m);
    float sum = 0.f;
    for (int i = lane; i < n; i += kWarpSize) {
      const float e = __expf(logits[h][i] - m);
      logits[h][i] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      head_max[h] = m;
      head_sum[h] = sum;
    }
  }
  __syncthreads();

  // P.V: thread (v, slice) sums tokens slice, slice + slices, ... into output vector v; the
  // `slices` lanes sharing v are adjacent in one warp.
  const int slices = min(kWarpSize, kThreads / padded);
  const int slice = threadIdx.x % slices, v = threadIdx.x / slices;
  float acc[kMaxGroup][E] = {};
  if (v < nvec) {
#pragma unroll 4
    for (int t = slice; t < n; t += slices) {
      float val[E];
      load_vec(value_cache + row_offset(p, table, kv_head, begin + t) + v * E, val);
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) {
        const float w = h < heads ? logits[h][t] : 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[h][e] += w * val[e];
      }
    }
  }
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h)
#pragma unroll
    for (int e = 0; e < E; ++e)
      for (int offset = slices / 2; offset > 0; offset /= 2) acc[h][e] += __shfl_xor_sync(0xffffffffu, acc[h][e], offset);
  if (slice == 0 && v < nvec) {
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      if (h >= heads) continue;
      // An empty context attends to nothing: write zeros rather than 0/0.
      const float inv_sum = head_sum[h] > 0.f ? 1.f / head_sum[h] : 0.f;
      const int head = head0 + h;
      if (parts == 1) {
        T* out = static_cast<T*>(p.out) + row * p.out_stride[0] + head * p.out_stride[1] + v * E;
#pragma unroll
        for (int e = 0; e < E; ++e) out[e] = from_float<T>(acc[h][e] * inv_sum * p.v_scale);
      } else {
        float* out = ws.out + ((static_cast<int64_t>(local) * p.num_heads + head) * partitions + part) * D + v * E;
#pragma unroll
        for (int e = 0; e < E; ++e) out[e] = acc[h][e] * inv_sum;  // v_scale comes with the merge
      }
    }
  }
  if (parts > 1 && threadIdx.x < heads) {
    const int64_t i = (static_cast<int64_t>(local) * p.num_heads + head0 + threadIdx.x) * partitions + part;
    ws.max[i] = head_max[threadIdx.x];
    ws.sum[i] = head_sum[threadIdx.x];
  }
}

// Merges the partitions of one (head, query row) of more than one partition: each is weighted by its
// exp-sum rescaled to the global max logit.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    reduce_partitions_kernel(AttentionParams p, QueryRows rows, Workspace ws, int partitions) {
  const int head = blockIdx.x, local = blockIdx.y, row = rows.row0 + local, D = p.head_size;
  const int seq_len = row_context(p, rows, row).context;
  const int parts = context_partitions(p, seq_len);
  if (parts == 1) return;  // written by the first kernel (or, context < 0, not at all)
  const int64_t first = (static_cast<int64_t>(local) * p.num_heads + head) * partitions;
  float global_max = -INFINITY;
  for (int i = 0; i < parts; ++i) global_max = fmaxf(global_max, ws.max[first + i]);
  float total = 0.f;
  for (int i = 0; i < parts; ++i) total += ws.sum[first + i] * __expf(ws.max[first + i] - global_max);
  T* out = static_cast<T*>(p.out) + row * p.out_stride[0] + head * p.out_stride[1];
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float acc = 0.f;
    for (int i = 0; i < parts; ++i)
      acc += ws.out[(first + i) * D + d] * ws.sum[first + i] * __expf(ws.max[first + i] - global_max);
    out[d] = from_float<T>(acc / total * p.v_scale);
  }
}

}  // namespace

int attention_partitions(int max_context) { return max(1, (max_context + kPartitionSize - 1) / kPartitionSize); }

int64_t attention_workspace_floats(int rows, int num_heads, int head_size, int partitions) {
  return static_cast<int64_t>(rows) * num_heads * partitions * (head_size + 2);
}

int prefill_rows_per_launch(int num_heads, int head_size, int partitions) {
  const int64_t rows = kPrefillWorkspaceFloats / attention_workspace_floats(1, num_heads, head_size, partitions);
  return static_cast<int>(std::clamp<int64_t>(rows, 1, kMaxGridY));
}

namespace {

// Rows rows.row0 .. rows.row0 + num_rows - 1, with a workspace for num_rows rows when partitions > 1.
cudaError_t launch_rows(const AttentionParams& p, QueryRows rows, int num_rows, DType dtype, DType cache_dtype,
                        int partitions, float* workspace, cudaStream_t stream) {
  const int64_t slots = static_cast<int64_t>(num_rows) * p.num_heads * partitions;
  const Workspace ws{workspace, workspace + slots * p.head_size, workspace + slots * (p.head_size + 1)};
  return dispatch_dtype_and_cache(dtype, cache_dtype, [&](auto t, auto c) {
    using T = decltype(t);
    const int group = p.num_heads / p.num_kv_heads, head_chunks = (group + kMaxGroup - 1) / kMaxGroup;
    paged_attention_kernel<T, decltype(c)><<<dim3(p.num_kv_heads * head_chunks, num_rows, partitions), kThreads, 0,
                                             stream>>>(p, rows, ws, partitions, head_chunks);
    if (partitions > 1) {
      reduce_partitions_kernel<T><<<dim3(p.num_heads, num_rows), kThreads, 0, stream>>>(p, rows, ws, partitions);
    }
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t launch_paged_attention(const AttentionParams& p, DType dtype, DType cache_dtype, int partitions,
                                   float* workspace, cudaStream_t stream) {
  if (p.num_seqs == 0) return cudaSuccess;
  return launch_rows(p, {nullptr, 0}, p.num_seqs, dtype, cache_dtype, partitions, workspace, stream);
}

cudaError_t launch_paged_prefill_attention(const AttentionParams& p, DType dtype, DType cache_dtype,
                                           const int32_t* cu_seqlens_q, int num_tokens, int partitions,
                                           float* workspace, int rows_per_launch, cudaStream_t stream) {
  if (p.num_seqs == 0) return cudaSuccess;
  for (int row0 = 0; row0 < num_tokens; row0 += rows_per_launch) {
    const cudaError_t err = launch_rows(p, {cu_seqlens_q, row0}, std::min(rows_per_launch, num_tokens - row0), dtype,
                                        cache_dtype, partitions, workspace, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace pagedlm::cuda
