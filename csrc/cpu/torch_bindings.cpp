#include "ops.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(pagedlm, CPU, m) {
  m.impl("reshape_and_cache", &pagedlm::cpu::reshape_and_cache);
  m.impl("paged_attention", &pagedlm::cpu::paged_attention);
  m.impl("paged_prefill_attention", &pagedlm::cpu::paged_prefill_attention);
  m.impl("copy_blocks", &pagedlm::cpu::copy_blocks);
  m.impl("gather_rows", &pagedlm::cpu::gather_rows);
  m.impl("rms_norm", &pagedlm::cpu::rms_norm);
  m.impl("fused_add_rms_norm", &pagedlm::cpu::fused_add_rms_norm);
  m.impl("rotary_embedding", &pagedlm::cpu::rotary_embedding);
  m.impl("gemma_rms_norm", &pagedlm::cpu::gemma_rms_norm);
  m.impl("gemma_fused_add_rms_norm", &pagedlm::cpu::gemma_fused_add_rms_norm);
  m.impl("olmo_rms_norm", &pagedlm::cpu::olmo_rms_norm);
  m.impl("olmo_rms_norm_add", &pagedlm::cpu::olmo_rms_norm_add);
  m.impl("silu_and_mul", &pagedlm::cpu::silu_and_mul);
  m.impl("gelu_tanh_and_mul", &pagedlm::cpu::gelu_tanh_and_mul);
  m.impl("scale", &pagedlm::cpu::scale);
  m.impl("soft_cap", &pagedlm::cpu::soft_cap);
  m.impl("position_scale", &pagedlm::cpu::position_scale);
  m.impl("argmax_logprob", &pagedlm::cpu::argmax_logprob);
  m.impl("argmax", &pagedlm::cpu::argmax);
  m.impl("top_logprobs", &pagedlm::cpu::top_logprobs);
  m.impl("sample", &pagedlm::cpu::sample);
  m.impl("apply_token_bitmask", &pagedlm::cpu::apply_token_bitmask);
  m.impl("bf16_blocked_linear", &pagedlm::cpu::bf16_blocked_linear);
  m.impl("bf16_amx_linear", &pagedlm::cpu::bf16_amx_linear);
  m.impl("bf16_blocked_linear_act_and_mul", &pagedlm::cpu::bf16_blocked_linear_act_and_mul);
  m.impl("bf16_blocked_linear_argmax", &pagedlm::cpu::bf16_blocked_linear_argmax);
  m.impl("bf16_amx_linear_act_and_mul", &pagedlm::cpu::bf16_amx_linear_act_and_mul);
  m.impl("bf16_amx_linear_argmax", &pagedlm::cpu::bf16_amx_linear_argmax);
  m.impl("bf16_fma_linear", &pagedlm::cpu::bf16_fma_linear);
  m.impl("bf16_fma_linear_act_and_mul", &pagedlm::cpu::bf16_fma_linear_act_and_mul);
  m.impl("fp32_fma_linear", &pagedlm::cpu::fp32_fma_linear);
  m.impl("fp32_fma_linear_act_and_mul", &pagedlm::cpu::fp32_fma_linear_act_and_mul);
  m.impl("bf16_fma_linear_argmax", &pagedlm::cpu::bf16_fma_linear_argmax);
  m.impl("fp32_fma_linear_argmax", &pagedlm::cpu::fp32_fma_linear_argmax);
}

// The weight of the bf16_blocked_linear ops is an MKLDNN tensor, whose dispatch key outranks CPU.
TORCH_LIBRARY_IMPL(pagedlm, MkldnnCPU, m) {
  m.impl("bf16_blocked_linear", &pagedlm::cpu::bf16_blocked_linear);
  m.impl("bf16_blocked_linear_act_and_mul", &pagedlm::cpu::bf16_blocked_linear_act_and_mul);
  m.impl("bf16_blocked_linear_argmax", &pagedlm::cpu::bf16_blocked_linear_argmax);
}
