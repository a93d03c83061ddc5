#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace pagedlm::cpu {

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                       at::Tensor& value_cache, const at::Tensor& slot_mapping, double k_scale, double v_scale);

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                     double scale, int64_t sliding_window, double logits_soft_cap, double k_scale, double v_scale);

// Whether bf16 attention runs on bf16_tiles.h in this build (an AVX512-BF16 build).
bool bf16_attention_tiles();

void paged_prefill_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& block_tables,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, double scale,
                             int64_t sliding_window, double logits_soft_cap, double k_scale, double v_scale);

void copy_blocks(at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& block_mapping);

void gather_rows(at::Tensor& out, const at::Tensor& input, const at::Tensor& index);

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon);

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon);

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, const at::Tensor& cos_sin_cache);

void gemma_rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon);

void gemma_fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon);

void olmo_rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon);

void olmo_rms_norm_add(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon);

void silu_and_mul(at::Tensor& out, const at::Tensor& input);

void gelu_tanh_and_mul(at::Tensor& out, const at::Tensor& input);

void scale(at::Tensor& x, double factor, bool divide);

void soft_cap(at::Tensor& x, double cap);

void position_scale(at::Tensor& x, const at::Tensor& positions, const at::Tensor& scales);

void argmax_logprob(const at::Tensor& logits, at::Tensor& token_ids, at::Tensor& logprobs);
void argmax(const at::Tensor& logits, at::Tensor& token_ids);
void apply_token_bitmask(at::Tensor& logits, const at::Tensor& rows, const at::Tensor& bitmask);

void top_logprobs(const at::Tensor& logits, const at::Tensor& token_ids, at::Tensor& logprobs, at::Tensor& ranks,
                  at::Tensor& top_logprobs, at::Tensor& top_ids);

void sample(const at::Tensor& logits, const at::Tensor& temperatures, const at::Tensor& top_ks,
            const at::Tensor& top_ps, const at::Tensor& min_ps, const at::Tensor& uniforms, at::Tensor& token_ids,
            const std::optional<at::Tensor>& logprobs);

void bf16_blocked_linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, at::IntArrayRef k_chunk_ends);

void bf16_blocked_linear_act_and_mul(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, at::IntArrayRef k_chunk_ends,
                                     c10::string_view activation);
void bf16_blocked_linear_argmax(at::Tensor& token_ids, const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef k_chunk_ends);

void bf16_amx_linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias);

void bf16_amx_linear_act_and_mul(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, c10::string_view activation);

void bf16_amx_linear_argmax(at::Tensor& token_ids, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t out_features);

void bf16_fma_linear_argmax(at::Tensor& token_ids, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t out_features);

void fp32_fma_linear_argmax(at::Tensor& token_ids, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, int64_t out_features);

void bf16_fma_linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias);

void bf16_fma_linear_act_and_mul(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, c10::string_view activation);

void fp32_fma_linear(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias);

void fp32_fma_linear_act_and_mul(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, c10::string_view activation);

}  // namespace pagedlm::cpu
