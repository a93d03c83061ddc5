#pragma once
// Argument checks shared by the CPU and CUDA bindings: the KV-cache layout contract of
// pagedlm/ops/__init__.py, enforced once at the op boundary so kernels can trust their inputs.

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>

namespace pagedlm {

inline bool is_fp8(at::ScalarType t) { return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2; }

// A KV cache holds entries of `dtype` (the queries' or the written keys'), or fp8 entries whose
// values are entry * k_scale (keys) and entry * v_scale (values); other caches take no scales.
inline void check_cache_dtype(const at::Tensor& cache, at::ScalarType dtype, double k_scale, double v_scale) {
  TORCH_CHECK(cache.scalar_type() == dtype || is_fp8(cache.scalar_type()), "the KV cache dtype must be ", dtype,
              " (the model's) or float8_e4m3fn or float8_e5m2, got ", cache.scalar_type());
  // In float32, the kernels' precision, with a finite reciprocal (what writing divides by).
  auto valid = [](double scale) {
    const float s = static_cast<float>(scale);
    return s > 0.f && std::isfinite(s) && std::isfinite(1.f / s);
  };
  TORCH_CHECK(valid(k_scale) && valid(v_scale),
              "k_scale and v_scale must be positive and finite in float32, with finite reciprocals; got ", k_scale,
              " and ", v_scale);
  TORCH_CHECK(is_fp8(cache.scalar_type()) || (k_scale == 1 && v_scale == 1),
              "k_scale and v_scale apply to fp8 KV caches only; a ", cache.scalar_type(),
              " cache needs 1.0, got ", k_scale, " and ", v_scale);
}

inline void check_cache_pair(const at::Tensor& key_cache, const at::Tensor& value_cache) {
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.size(1) > 0 && key_cache.size(2) > 0 && key_cache.size(3) > 0,
              "key_cache must be [num_blocks, num_kv_heads, block_size, head_size], each but num_blocks >= 1");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes(), "key_cache and value_cache shapes differ");
  TORCH_CHECK(key_cache.scalar_type() == value_cache.scalar_type(), "key_cache and value_cache dtypes differ");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(key_cache.device() == value_cache.device(), "key_cache and value_cache are on different devices");
}

// Query-like tensors ([tokens, heads, head_size]) may be views into a fused QKV buffer, so only the
// last dimension has to be contiguous.
inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be [num_tokens, num_heads, head_size]");
  TORCH_CHECK(t.stride(2) == 1, name, " must be contiguous in its last dimension");
}

inline void check_index(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions");
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32");
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

inline void check_attention(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale, double k_scale, double v_scale,
                            int64_t sliding_window, double logits_soft_cap) {
  TORCH_CHECK(sliding_window >= 0, "sliding_window must be >= 0 (0: no window), got ", sliding_window);
  TORCH_CHECK(std::isfinite(logits_soft_cap) && logits_soft_cap >= 0,
              "logits_soft_cap must be finite and >= 0 (0: no cap), got ", logits_soft_cap);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "scale must be finite and > 0, got ", scale);
  check_cache_pair(key_cache, value_cache);
  check_rows(query, "query");
  check_rows(out, "out");
  check_index(block_tables, 2, "block_tables");
  check_index(seq_lens, 1, "seq_lens");
  TORCH_CHECK(out.sizes() == query.sizes(), "out and query shapes differ");
  TORCH_CHECK(out.scalar_type() == query.scalar_type(), "query and out dtypes differ");
  check_cache_dtype(key_cache, query.scalar_type(), k_scale, v_scale);
  TORCH_CHECK(query.size(2) == key_cache.size(3), "query head_size differs from the cache's");
  TORCH_CHECK(query.size(1) % key_cache.size(1) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(block_tables.size(0) == seq_lens.size(0), "block_tables and seq_lens disagree on num_seqs");
  for (const at::Tensor* t : {&out, &query, &value_cache, &block_tables, &seq_lens}) {
    TORCH_CHECK(t->device() == key_cache.device(), "all attention tensors must be on one device");
  }
}

inline void check_cache_write(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                              const at::Tensor& value_cache, const at::Tensor& slot_mapping, double k_scale,
                              double v_scale) {
  check_cache_pair(key_cache, value_cache);
  check_rows(key, "key");
  check_rows(value, "value");
  TORCH_CHECK(key.sizes() == value.sizes(), "key and value shapes differ");
  TORCH_CHECK(key.size(1) == key_cache.size(1) && key.size(2) == key_cache.size(3),
              "key is not [num_tokens, num_kv_heads, head_size] of the cache");
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "key and value dtypes differ");
  check_cache_dtype(key_cache, key.scalar_type(), k_scale, v_scale);
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0) &&
                  (slot_mapping.scalar_type() == at::kLong || slot_mapping.scalar_type() == at::kInt),
              "slot_mapping must be int64 (or int32) [num_tokens]");
  for (const at::Tensor* t : {&key, &value, &slot_mapping}) {
    TORCH_CHECK(t->device() == key_cache.device(), "reshape_and_cache tensors must be on one device");
  }
}

// A linear op's optional bias, checked ([N], floating point, on the CPU) and as contiguous fp32;
// undefined without one.
inline at::Tensor linear_bias_fp32(const std::optional<at::Tensor>& bias, int64_t N, const char* op) {
  if (!bias.has_value()) return {};
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->device().is_cpu() && at::isFloatingType(bias->scalar_type()),
              op, ": bias must be a floating-point CPU tensor [", N, "]");
  return bias->to(at::kFloat).contiguous();
}

// The (src, dst) rows of block_mapping as a contiguous host tensor, bounds-checked.
inline at::Tensor host_block_pairs(const at::Tensor& block_mapping, int64_t num_blocks) {
  TORCH_CHECK(block_mapping.dim() == 2 && block_mapping.size(1) == 2, "block_mapping must be [n, 2]");
  TORCH_CHECK(block_mapping.scalar_type() == at::kLong, "block_mapping must be int64");
  at::Tensor pairs = block_mapping.cpu().contiguous();
  const int64_t* p = pairs.data_ptr<int64_t>();
  for (int64_t i = 0; i < pairs.size(0); ++i) {
    TORCH_CHECK(p[2 * i] >= 0 && p[2 * i] < num_blocks && p[2 * i + 1] >= 0 && p[2 * i + 1] < num_blocks,
                "block_mapping row ", i, " is out of range");
  }
  return pairs;
}

// [num_tokens, hidden] rows (a row stride is allowed) normalised by a [hidden] weight.
// with_heads: also [num_tokens, num_heads, head_size] (rms_norm of q or k per head, views into a
// fused projection).
inline void check_norm_rows(const at::Tensor& t, const at::Tensor& weight, const char* name, bool with_heads) {
  TORCH_CHECK((t.dim() == 2 || (with_heads && t.dim() == 3)) && t.stride(-1) == 1, name,
              with_heads ? " must be [num_tokens, hidden] or [num_tokens, num_heads, head_size], contiguous in its "
                           "last dimension"
                         : " must be [num_tokens, hidden], contiguous in its last dimension");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == t.size(-1),
              "weight must be a contiguous [hidden] vector matching ", name);
  TORCH_CHECK(t.scalar_type() == weight.scalar_type(), name, " and weight dtypes differ");
  TORCH_CHECK(t.device() == weight.device(), name, " and weight are on different devices");
}

// The two row tensors of rms_norm (out, input; with_heads) or fused_add_rms_norm (input, residual).
inline void check_norm(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                       const at::Tensor& weight, bool with_heads = false) {
  check_norm_rows(a, weight, a_name, with_heads);
  check_norm_rows(b, weight, b_name, with_heads);
  TORCH_CHECK(a.sizes() == b.sizes(), a_name, " and ", b_name, " shapes differ");
}

// The rows of a tensor check_norm_rows passed: [num_tokens, hidden] or [num_tokens, num_heads,
// head_size]; strides in elements.
struct NormRows {
  int64_t tokens, heads, token_stride, head_stride;
  explicit NormRows(const at::Tensor& t)
      : tokens(t.size(0)),
        heads(t.dim() == 3 ? t.size(1) : 1),
        token_stride(t.stride(0)),
        head_stride(t.dim() == 3 ? t.stride(1) : 0) {}
  int64_t offset(int64_t row) const { return row / heads * token_stride + row % heads * head_stride; }
};

inline void check_act_and_mul(const at::Tensor& out, const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 2 && input.size(1) % 2 == 0, "input must be [num_tokens, 2 * d]");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == input.size(0) && out.size(1) * 2 == input.size(1),
              "out must be [num_tokens, d] for input [num_tokens, 2 * d]");
  TORCH_CHECK(input.stride(1) == 1 && out.stride(1) == 1, "input and out must be contiguous in their last dimension");
  TORCH_CHECK(input.scalar_type() == out.scalar_type(), "input and out dtypes differ");
  TORCH_CHECK(input.device() == out.device(), "input and out are on different devices");
}

// out [n, d] = the rows of input [rows, d] that an int64 [n] index names, each checked to be in range.
inline void check_gather_rows(const at::Tensor& out, const at::Tensor& input, const at::Tensor& index) {
  TORCH_CHECK(input.dim() == 2 && input.stride(1) == 1, "input must be [num_rows, d], contiguous in its last dimension");
  TORCH_CHECK(index.dim() == 1 && index.is_contiguous() && index.scalar_type() == at::kLong,
              "index must be a contiguous int64 [n]");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == index.size(0) && out.size(1) == input.size(1) && out.stride(1) == 1,
              "out must be [n, d] for index [n] and input [num_rows, d], contiguous in its last dimension");
  TORCH_CHECK(out.scalar_type() == input.scalar_type(), "input and out dtypes differ");
  TORCH_CHECK(out.device() == input.device() && index.device() == input.device(),
              "gather_rows tensors must be on one device");
}

// query [num_tokens, num_heads, head_size] and key [num_tokens, num_kv_heads, head_size] rotate in
// place by a [max_position, head_size] table whose rows are cos (first half) then sin.
inline void check_rotary(const at::Tensor& positions, const at::Tensor& query, const at::Tensor& key,
                         const at::Tensor& cos_sin_cache) {
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.is_contiguous() && cos_sin_cache.size(1) % 2 == 0,
              "cos_sin_cache must be a contiguous [max_position, rotary_dim] table (cos half, then sin half)");
  check_rows(query, "query");
  check_rows(key, "key");
  TORCH_CHECK(query.size(2) == cos_sin_cache.size(1) && key.size(2) == cos_sin_cache.size(1),
              "query and key head_size must equal cos_sin_cache's rotary dim");
  TORCH_CHECK(query.scalar_type() == key.scalar_type() &&
                  (cos_sin_cache.scalar_type() == query.scalar_type() || cos_sin_cache.scalar_type() == at::kFloat),
              "query and key must share a dtype, and cos_sin_cache must have it too or be float32");
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong, "positions must be int64 [num_tokens]");
  TORCH_CHECK(query.size(0) == positions.size(0) && key.size(0) == positions.size(0),
              "query, key and positions disagree on num_tokens");
  for (const at::Tensor* t : {&positions, &query, &key}) {
    TORCH_CHECK(t->device() == cos_sin_cache.device(), "rotary_embedding tensors must be on one device");
  }
}

// One contiguous value of `dtype` per row of logits.
inline void check_per_row(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& logits) {
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && t.scalar_type() == dtype && t.size(0) == logits.size(0), name,
              " must be a contiguous ", dtype, " [num_rows]");
  TORCH_CHECK(t.device() == logits.device(), name, " and logits are on different devices");
}

inline void check_argmax(const at::Tensor& logits, const at::Tensor& token_ids) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [num_rows, vocab], contiguous in its last dimension");
  TORCH_CHECK(logits.size(1) > 0, "logits must have a non-empty vocabulary");
  check_per_row(token_ids, "token_ids", at::kLong, logits);
}

inline void check_argmax_logprob(const at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& logprobs) {
  check_argmax(logits, token_ids);
  check_per_row(logprobs, "logprobs", at::kFloat, logits);
}

// logits [rows, vocab]; token_ids int64 [rows] (each checked in range by the kernel); per row the
// token's log-probability (fp32) and rank (int64); top_logprobs fp32 and top_ids int64 [rows, k].
inline void check_top_logprobs(const at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& logprobs,
                               const at::Tensor& ranks, const at::Tensor& top_logprobs, const at::Tensor& top_ids) {
  check_argmax_logprob(logits, token_ids, logprobs);
  check_per_row(ranks, "ranks", at::kLong, logits);
  TORCH_CHECK(top_logprobs.dim() == 2 && top_logprobs.is_contiguous() && top_logprobs.scalar_type() == at::kFloat &&
                  top_logprobs.size(0) == logits.size(0) && top_logprobs.size(1) <= logits.size(1),
              "top_logprobs must be a contiguous float32 [num_rows, k] with k <= vocab (", logits.size(1), ")");
  TORCH_CHECK(top_ids.dim() == 2 && top_ids.is_contiguous() && top_ids.scalar_type() == at::kLong &&
                  top_ids.sizes() == top_logprobs.sizes(),
              "top_ids must be a contiguous int64 tensor shaped as top_logprobs");
  TORCH_CHECK(top_logprobs.device() == logits.device() && top_ids.device() == logits.device(),
              "top_logprobs, top_ids and logits are on different devices");
}

// logits [rows, vocab] (any float dtype); rows int64 [n] (each checked in range by the kernel); bitmask
// int32 [n, words] with words * 32 >= vocab.
inline void check_apply_token_bitmask(const at::Tensor& logits, const at::Tensor& rows, const at::Tensor& bitmask) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be [num_rows, vocab], contiguous in its last dimension");
  TORCH_CHECK(rows.dim() == 1 && rows.is_contiguous() && rows.scalar_type() == at::kLong, "rows must be a contiguous int64 [n]");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.is_contiguous() && bitmask.scalar_type() == at::kInt &&
                  bitmask.size(0) == rows.size(0) && bitmask.size(1) * 32 >= logits.size(1),
              "bitmask must be a contiguous int32 [n, at least ceil(vocab / 32)] with n = len(rows)");
  TORCH_CHECK(rows.device() == logits.device() && bitmask.device() == logits.device(),
              "rows, bitmask and logits are on different devices");
}

inline void check_sample(const at::Tensor& logits, const at::Tensor& temperatures, const at::Tensor& top_ks,
                         const at::Tensor& top_ps, const at::Tensor& min_ps, const at::Tensor& uniforms,
                         const at::Tensor& token_ids, const std::optional<at::Tensor>& logprobs) {
  check_argmax(logits, token_ids);
  if (logprobs) check_per_row(*logprobs, "logprobs", at::kFloat, logits);
  check_per_row(temperatures, "temperatures", at::kFloat, logits);
  check_per_row(top_ks, "top_ks", at::kLong, logits);
  check_per_row(top_ps, "top_ps", at::kFloat, logits);
  check_per_row(min_ps, "min_ps", at::kFloat, logits);
  check_per_row(uniforms, "uniforms", at::kFloat, logits);
}

}  // namespace pagedlm
