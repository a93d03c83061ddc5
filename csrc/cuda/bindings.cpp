// CUDA kernels of the pagedlm ops: checks the tensors, turns them into pointers, sizes and strides,
// and launches on the current stream of the tensors' device.

#include "../checks.h"
#include "launchers.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <vector>

namespace pagedlm::cuda {
namespace {

// A model tensor's dtype (activations, queries, logits): float32, float16 or bfloat16.
DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "pagedlm CUDA kernels take float32, float16 or bfloat16 tensors (fp8 only as a KV cache), "
                  "not ", t.scalar_type());
  }
}

// A KV cache's dtype: the model's, or an fp8 format.
DType cache_dtype_of(const at::Tensor& cache) {
  switch (cache.scalar_type()) {
    case at::kFloat8_e4m3fn: return DType::kFp8E4M3;
    case at::kFloat8_e5m2: return DType::kFp8E5M2;
    default: return dtype_of(cache);
  }
}

AttentionParams attention_params(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                                 const at::Tensor& value_cache, const at::Tensor& block_tables,
                                 const at::Tensor& seq_lens, double scale, double k_scale, double v_scale,
                                 int64_t sliding_window, double soft_cap) {
  check_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale, k_scale, v_scale,
                  sliding_window, soft_cap);
  TORCH_CHECK(query.is_cuda(), "expected CUDA tensors");
  TORCH_CHECK(query.size(2) <= kMaxHeadSize, "head_size above ", kMaxHeadSize, " is not supported");
  TORCH_CHECK(query.size(2) * key_cache.element_size() % 16 == 0,
              "the CUDA kernels read K/V rows as 16-byte vectors: head_size * the cache's element size must be a "
              "multiple of 16");
  return {out.data_ptr(),
          query.data_ptr(),
          key_cache.data_ptr(),
          value_cache.data_ptr(),
          block_tables.data_ptr<int32_t>(),
          seq_lens.data_ptr<int32_t>(),
          static_cast<int>(seq_lens.size(0)),
          static_cast<int>(query.size(1)),
          static_cast<int>(key_cache.size(1)),
          static_cast<int>(query.size(2)),
          static_cast<int>(key_cache.size(2)),
          {query.stride(0), query.stride(1)},
          {out.stride(0), out.stride(1)},
          block_tables.stride(0),
          static_cast<float>(scale * k_scale),
          static_cast<float>(v_scale),
          static_cast<int>(std::min<int64_t>(sliding_window, INT32_MAX)),
          static_cast<float>(soft_cap),
          static_cast<int>(block_tables.size(1)),
          static_cast<int>(key_cache.size(0))};
}

// Partitions for the contexts a block table bounds (its width), so grids are sized without reading
// seq_lens; the grid's z dimension holds at most 65,535.
int partitions_for(const at::Tensor& block_tables, const AttentionParams& p) {
  TORCH_CHECK(p.num_heads > 0 && p.num_kv_heads > 0, "attention needs at least one query and one KV head");
  const int64_t max_context = block_tables.size(1) * static_cast<int64_t>(p.block_size);
  TORCH_CHECK(max_context <= int64_t{65535} * kPartitionSize, "the CUDA attention kernels take contexts (block "
              "table width x block_size) up to ", int64_t{65535} * kPartitionSize, " tokens, got ", max_context);
  return attention_partitions(static_cast<int>(max_context));
}

// Undefined where one partition needs none.
at::Tensor attention_workspace(const at::Tensor& query, const AttentionParams& p, int rows, int partitions) {
  if (partitions == 1) return {};
  return at::empty({attention_workspace_floats(rows, p.num_heads, p.head_size, partitions)},
                   query.options().dtype(at::kFloat));
}

void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                     const at::Tensor& value_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                     double scale, int64_t sliding_window, double logits_soft_cap, double k_scale,
                     double v_scale) {
  const AttentionParams p = attention_params(out, query, key_cache, value_cache, block_tables, seq_lens, scale,
                                             k_scale, v_scale, sliding_window, logits_soft_cap);
  TORCH_CHECK(query.size(0) == seq_lens.size(0), "paged_attention takes one query row per sequence");
  const c10::cuda::CUDAGuard guard(query.device());
  TORCH_CHECK(p.num_seqs <= 65535, "the CUDA decode kernel takes up to 65535 sequences a call, got ", p.num_seqs);
  const int partitions = partitions_for(block_tables, p);
  const at::Tensor workspace = attention_workspace(query, p, p.num_seqs, partitions);
  C10_CUDA_CHECK(launch_paged_attention(p, dtype_of(query), cache_dtype_of(key_cache), partitions,
                                        workspace.defined() ? workspace.data_ptr<float>() : nullptr,
                                        c10::cuda::getCurrentCUDAStream()));
}

void paged_prefill_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& block_tables,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, double scale,
                             int64_t sliding_window, double logits_soft_cap, double k_scale, double v_scale) {
  const AttentionParams p = attention_params(out, query, key_cache, value_cache, block_tables, seq_lens, scale,
                                             k_scale, v_scale, sliding_window, logits_soft_cap);
  check_index(cu_seqlens_q, 1, "cu_seqlens_q");
  TORCH_CHECK(cu_seqlens_q.size(0) == seq_lens.size(0) + 1, "cu_seqlens_q must have num_seqs + 1 entries");
  TORCH_CHECK(cu_seqlens_q.device() == query.device(), "cu_seqlens_q must be on the query's device");
  const c10::cuda::CUDAGuard guard(query.device());
  const int num_tokens = static_cast<int>(query.size(0));
  const int partitions = partitions_for(block_tables, p);
  const int rows_per_launch = prefill_rows_per_launch(p.num_heads, p.head_size, partitions);
  const at::Tensor workspace = attention_workspace(query, p, std::min(num_tokens, rows_per_launch), partitions);
  C10_CUDA_CHECK(launch_paged_prefill_attention(p, dtype_of(query), cache_dtype_of(key_cache),
                                                cu_seqlens_q.data_ptr<int32_t>(), num_tokens, partitions,
                                                workspace.defined() ? workspace.data_ptr<float>() : nullptr,
                                                rows_per_launch, c10::cuda::getCurrentCUDAStream()));
}

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                       const at::Tensor& slot_mapping, double k_scale, double v_scale) {
  check_cache_write(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale);
  const c10::cuda::CUDAGuard guard(key.device());
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t key_stride[2] = {key.stride(0), key.stride(1)};
  const int64_t value_stride[2] = {value.stride(0), value.stride(1)};
  C10_CUDA_CHECK(launch_reshape_and_cache(
      key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), slots.data_ptr<int64_t>(),
      key_cache.size(0) * key_cache.size(2), static_cast<int>(key.size(0)), static_cast<int>(key.size(1)),
      static_cast<int>(key.size(2)),
      static_cast<int>(key_cache.size(2)), key_stride, value_stride, dtype_of(key), cache_dtype_of(key_cache),
      1.f / static_cast<float>(k_scale), 1.f / static_cast<float>(v_scale), c10::cuda::getCurrentCUDAStream()));
}

void copy_blocks(at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& block_mapping) {
  TORCH_CHECK(key_caches.size() == value_caches.size(), "need as many key caches as value caches");
  if (key_caches.empty()) return;
  const at::Tensor& first = key_caches[0];
  TORCH_CHECK(first.is_cuda(), "expected CUDA caches");
  const at::Tensor pairs = host_block_pairs(block_mapping, first.size(0));
  // One upload of [cache base addresses..., (src, dst) pairs...] for the whole call.
  std::vector<int64_t> table;
  for (size_t layer = 0; layer < key_caches.size(); ++layer) {
    check_cache_pair(key_caches[layer], value_caches[layer]);
    TORCH_CHECK(key_caches[layer].sizes() == first.sizes() && key_caches[layer].dtype() == first.dtype() &&
                    key_caches[layer].device() == first.device(),
                "all layers' caches must match in shape, dtype and device");
    table.push_back(reinterpret_cast<int64_t>(key_caches[layer].data_ptr()));
    table.push_back(reinterpret_cast<int64_t>(value_caches[layer].data_ptr()));
  }
  const int64_t num_caches = table.size();
  table.insert(table.end(), pairs.data_ptr<int64_t>(), pairs.data_ptr<int64_t>() + pairs.numel());
  const int64_t block_bytes = first.stride(0) * first.element_size();
  TORCH_CHECK(block_bytes % 16 == 0, "a cache block must be a multiple of 16 bytes");
  const c10::cuda::CUDAGuard guard(first.device());
  const at::Tensor device_table =
      at::from_blob(table.data(), {static_cast<int64_t>(table.size())}, at::kLong).to(first.device());
  const int64_t* addresses = device_table.data_ptr<int64_t>();
  C10_CUDA_CHECK(launch_copy_blocks(addresses, static_cast<int>(num_caches), addresses + num_caches,
                                    static_cast<int>(pairs.size(0)), block_bytes,
                                    c10::cuda::getCurrentCUDAStream()));
}

void rms_norm_rows(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon,
                   NormStyle style) {
  check_norm(out, "out", input, "input", weight, /*with_heads=*/true);
  const c10::cuda::CUDAGuard guard(input.device());
  const NormRows in_rows(input), out_rows(out);
  C10_CUDA_CHECK(launch_rms_norm(out.data_ptr(), input.data_ptr(), weight.data_ptr(), static_cast<int>(in_rows.tokens),
                                 static_cast<int>(in_rows.heads), static_cast<int>(input.size(-1)),
                                 {out_rows.token_stride, out_rows.head_stride},
                                 {in_rows.token_stride, in_rows.head_stride}, static_cast<float>(epsilon), style,
                                 dtype_of(input), c10::cuda::getCurrentCUDAStream()));
}

void fused_add_rms_norm_rows(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon,
                             NormStyle style) {
  check_norm(input, "input", residual, "residual", weight);
  const c10::cuda::CUDAGuard guard(input.device());
  C10_CUDA_CHECK(launch_fused_add_rms_norm(input.data_ptr(), residual.data_ptr(), weight.data_ptr(),
                                           static_cast<int>(input.size(0)), static_cast<int>(input.size(1)),
                                           input.stride(0), residual.stride(0), static_cast<float>(epsilon), style,
                                           dtype_of(input), c10::cuda::getCurrentCUDAStream()));
}

void rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  rms_norm_rows(out, input, weight, epsilon, NormStyle::kLlama);
}

void fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon) {
  fused_add_rms_norm_rows(input, residual, weight, epsilon, NormStyle::kLlama);
}

void gemma_rms_norm(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  rms_norm_rows(out, input, weight, epsilon, NormStyle::kGemma);
}

void gemma_fused_add_rms_norm(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon) {
  fused_add_rms_norm_rows(input, residual, weight, epsilon, NormStyle::kGemma);
}

void rotary_embedding(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                      const at::Tensor& cos_sin_cache) {
  check_rotary(positions, query, key, cos_sin_cache);
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor pos = positions.contiguous();
  const RotaryParams p{pos.data_ptr<int64_t>(),
                       query.data_ptr(),
                       key.data_ptr(),
                       cos_sin_cache.data_ptr(),
                       static_cast<int>(query.size(0)),
                       static_cast<int>(query.size(1)),
                       static_cast<int>(key.size(1)),
                       static_cast<int>(query.size(2)),
                       static_cast<int>(cos_sin_cache.size(0)),
                       {query.stride(0), query.stride(1)},
                       {key.stride(0), key.stride(1)}};
  C10_CUDA_CHECK(launch_rotary_embedding(p, dtype_of(query), cos_sin_cache.scalar_type() == at::kFloat,
                                         c10::cuda::getCurrentCUDAStream()));
}

void act_and_mul(at::Tensor& out, const at::Tensor& input, Activation act) {
  check_act_and_mul(out, input);
  const c10::cuda::CUDAGuard guard(input.device());
  C10_CUDA_CHECK(launch_act_and_mul(out.data_ptr(), input.data_ptr(), static_cast<int>(out.size(0)),
                                    static_cast<int>(out.size(1)), out.stride(0), input.stride(0), act,
                                    dtype_of(input), c10::cuda::getCurrentCUDAStream()));
}

void silu_and_mul(at::Tensor& out, const at::Tensor& input) { act_and_mul(out, input, Activation::kSilu); }

void gelu_tanh_and_mul(at::Tensor& out, const at::Tensor& input) { act_and_mul(out, input, Activation::kGeluTanh); }

void argmax_logprob(const at::Tensor& logits, at::Tensor& token_ids, at::Tensor& logprobs) {
  check_argmax_logprob(logits, token_ids, logprobs);
  const c10::cuda::CUDAGuard guard(logits.device());
  C10_CUDA_CHECK(launch_argmax_logprob(logits.data_ptr(), token_ids.data_ptr<int64_t>(), logprobs.data_ptr<float>(),
                                       static_cast<int>(logits.size(0)), static_cast<int>(logits.size(1)),
                                       logits.stride(0), dtype_of(logits), c10::cuda::getCurrentCUDAStream()));
}

void argmax(const at::Tensor& logits, at::Tensor& token_ids) {
  check_argmax(logits, token_ids);
  const c10::cuda::CUDAGuard guard(logits.device());
  C10_CUDA_CHECK(launch_argmax_logprob(logits.data_ptr(), token_ids.data_ptr<int64_t>(), nullptr,
                                       static_cast<int>(logits.size(0)), static_cast<int>(logits.size(1)),
                                       logits.stride(0), dtype_of(logits), c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace pagedlm::cuda

// No CUDA kernel for `gather_rows`, `scale`, `soft_cap`, `position_scale`, `top_logprobs`, `sample`,
// `apply_token_bitmask`, the OLMo 2 norms and the bf16 linears: pagedlm/ops/__init__.py registers the
// torch reference for CUDA at import time (`_reference_on_cuda`), for every op this file does not register.
TORCH_LIBRARY_IMPL(pagedlm, CUDA, m) {
  m.impl("reshape_and_cache", &pagedlm::cuda::reshape_and_cache);
  m.impl("paged_attention", &pagedlm::cuda::paged_attention);
  m.impl("paged_prefill_attention", &pagedlm::cuda::paged_prefill_attention);
  m.impl("copy_blocks", &pagedlm::cuda::copy_blocks);
  m.impl("rms_norm", &pagedlm::cuda::rms_norm);
  m.impl("fused_add_rms_norm", &pagedlm::cuda::fused_add_rms_norm);
  m.impl("rotary_embedding", &pagedlm::cuda::rotary_embedding);
  m.impl("gemma_rms_norm", &pagedlm::cuda::gemma_rms_norm);
  m.impl("gemma_fused_add_rms_norm", &pagedlm::cuda::gemma_fused_add_rms_norm);
  m.impl("silu_and_mul", &pagedlm::cuda::silu_and_mul);
  m.impl("gelu_tanh_and_mul", &pagedlm::cuda::gelu_tanh_and_mul);
  m.impl("argmax_logprob", &pagedlm::cuda::argmax_logprob);
  m.impl("argmax", &pagedlm::cuda::argmax);
}
