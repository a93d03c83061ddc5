#pragma once
// The interface between bindings.cpp (torch tensors) and the kernels (raw pointers): plain types
// and CUDA runtime types only, so the .cu files build with nvcc alone. Strides are in elements.

#include <cuda_runtime.h>

#include <cstdint>

namespace pagedlm::cuda {

// Model dtypes, and the fp8 formats a KV cache may hold (OCP e4m3fn and e5m2).
enum class DType { kFloat, kHalf, kBFloat16, kFp8E4M3, kFp8E5M2 };

// Kernels keep up to kMaxHeadSize / 32 values per lane in registers.
constexpr int kMaxHeadSize = 256;
// Attention takes a context in partitions of this many keys, each one block of a launch's z dimension.
constexpr int kPartitionSize = 512;

struct AttentionParams {
  void* out;
  const void* query;
  const void* key_cache;
  const void* value_cache;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  int num_seqs;
  int num_heads;
  int num_kv_heads;
  int head_size;
  int block_size;
  int64_t query_stride[2];  // token, head
  int64_t out_stride[2];
  int64_t table_stride;
  float scale;    // the logits' scale times k_scale (an fp8 key entry times k_scale is the key)
  float v_scale;  // an fp8 value entry times v_scale is the value: a factor on each output
  int sliding_window;  // > 0: a query at position i sees keys (i - sliding_window, i]; 0: all up to i
  float soft_cap;      // > 0: logits become soft_cap * tanh(logits / soft_cap)
  // Bounds the kernels assert on the device (reading seq_lens and block tables on the host would
  // sync): a context holds at most table_width * block_size tokens, block ids are below num_blocks.
  int table_width;
  int num_blocks;
};

// The first key a query at position `pos` sees (host and device).
#ifdef __CUDACC__
__host__ __device__
#endif
inline int first_key(const AttentionParams& p, int pos) {
  return p.sliding_window > 0 ? (pos - p.sliding_window + 1 > 0 ? pos - p.sliding_window + 1 : 0) : 0;
}

// Attention (paged_attention.cu): decode takes one query row per sequence, prefill the query
// tokens of the sequences cu_seqlens_q delimits; both run one kernel, so a position's output has
// the same bits from either. A launch covering contexts of up to max_context tokens splits them
// into attention_partitions(max_context) partitions; above 1 it needs a workspace of
// attention_workspace_floats(rows, ...) floats, rows being num_seqs for decode and
// min(num_tokens, rows_per_launch) for prefill, which launches rows_per_launch rows at a time
// (prefill_rows_per_launch bounds its workspace).
int attention_partitions(int max_context);
int64_t attention_workspace_floats(int rows, int num_heads, int head_size, int partitions);
int prefill_rows_per_launch(int num_heads, int head_size, int partitions);

// dtype: the queries' and outputs'; cache_dtype: the KV cache's, dtype itself or an fp8 format.
cudaError_t launch_paged_attention(const AttentionParams& p, DType dtype, DType cache_dtype, int partitions,
                                   float* workspace, cudaStream_t stream);

cudaError_t launch_paged_prefill_attention(const AttentionParams& p, DType dtype, DType cache_dtype,
                                           const int32_t* cu_seqlens_q, int num_tokens, int partitions,
                                           float* workspace, int rows_per_launch, cudaStream_t stream);

// Writes key/value rows [num_tokens, num_kv_heads, head_size] of `dtype` into the caches at
// slot_mapping (-1: skipped; at most num_slots - 1, a device assert): copied when cache_dtype is
// dtype; for fp8, x * inv_k_scale (keys) or x * inv_v_scale (values), saturated at the format's
// largest finite value and rounded to nearest even.
cudaError_t launch_reshape_and_cache(const void* key, const void* value, void* key_cache, void* value_cache,
                                     const int64_t* slot_mapping, int64_t num_slots, int num_tokens,
                                     int num_kv_heads, int head_size,
                                     int block_size, const int64_t key_stride[2], const int64_t value_stride[2],
                                     DType dtype, DType cache_dtype, float inv_k_scale, float inv_v_scale,
                                     cudaStream_t stream);

// For each of num_caches caches (device array of base addresses) copies whole blocks of
// block_bytes (a multiple of 16) by the device array of (src, dst) pairs.
cudaError_t launch_copy_blocks(const int64_t* cache_addresses, int num_caches, const int64_t* pairs, int num_pairs,
                               int64_t block_bytes, cudaStream_t stream);

// Fused layer ops (see pagedlm/ops/__init__.py for their rounding contract); rows are
// [num_tokens, ...] with the given row strides and a contiguous last dimension.
// kLlama: weight * round(x / rms); kGemma: round(x / rms * (1 + weight)).
enum class NormStyle { kLlama, kGemma };

// A norm's rows in elements: token t, head h at t * token + h * head ([num_tokens, hidden]: head = 0).
struct RowStrides {
  int64_t token;
  int64_t head;
};

cudaError_t launch_rms_norm(void* out, const void* input, const void* weight, int num_tokens, int num_heads,
                            int hidden, RowStrides out_strides, RowStrides input_strides, float epsilon,
                            NormStyle style, DType dtype, cudaStream_t stream);

cudaError_t launch_fused_add_rms_norm(void* input, void* residual, const void* weight, int num_tokens, int hidden,
                                     int64_t input_stride, int64_t residual_stride, float epsilon, NormStyle style,
                                     DType dtype, cudaStream_t stream);

enum class Activation { kSilu, kGeluTanh };

cudaError_t launch_act_and_mul(void* out, const void* input, int num_tokens, int d, int64_t out_stride,
                               int64_t input_stride, Activation act, DType dtype, cudaStream_t stream);

struct RotaryParams {
  const int64_t* positions;
  void* query;
  void* key;
  const void* cos_sin_cache;  // [max_position, head_size]: cos half, then sin half (model dtype or fp32)
  int num_tokens;
  int num_heads;
  int num_kv_heads;
  int head_size;
  int max_position;
  int64_t query_stride[2];  // token, head
  int64_t key_stride[2];
};

cudaError_t launch_rotary_embedding(const RotaryParams& p, DType dtype, bool fp32_table, cudaStream_t stream);

// Per row of logits: the first index of the maximum and its log-probability (fp32 softmax), or the
// index alone where `logprobs` is null.
cudaError_t launch_argmax_logprob(const void* logits, int64_t* token_ids, float* logprobs, int num_rows, int vocab,
                                  int64_t row_stride, DType dtype, cudaStream_t stream);

}  // namespace pagedlm::cuda
