// Op schemas of the pagedlm library (documented in pagedlm/ops/__init__.py). Kernels are registered per device in cpu/torch_bindings.cpp
// and cuda/bindings.cpp; the Meta kernels below let fake tensors (torch.compile, opcheck) trace
// the ops, which only mutate their arguments.

#include "cpu/ops.h"

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pagedlm, m) {
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping, float k_scale=1.0, float v_scale=1.0) -> ()");
  m.def(
      "paged_attention(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor seq_lens, float scale, int sliding_window=0, float logits_soft_cap=0.0, "
      "float k_scale=1.0, float v_scale=1.0) -> ()");
  m.def(
      "paged_prefill_attention(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor cu_seqlens_q, Tensor seq_lens, float scale, int sliding_window=0, "
      "float logits_soft_cap=0.0, float k_scale=1.0, float v_scale=1.0) -> ()");
  m.def("copy_blocks(Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, Tensor block_mapping) -> ()");
  m.def("gather_rows(Tensor(a!) out, Tensor input, Tensor index) -> ()");
  m.def("rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float epsilon) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float epsilon) -> ()");
  m.def("rotary_embedding(Tensor positions, Tensor(a!) query, Tensor(b!) key, Tensor cos_sin_cache) -> ()");
  m.def("gemma_rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float epsilon) -> ()");
  m.def("gemma_fused_add_rms_norm(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float epsilon) -> ()");
  m.def("olmo_rms_norm(Tensor(a!) out, Tensor input, Tensor weight, float epsilon) -> ()");
  m.def("olmo_rms_norm_add(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float epsilon) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor input) -> ()");
  m.def("gelu_tanh_and_mul(Tensor(a!) out, Tensor input) -> ()");
  m.def("scale(Tensor(a!) x, float factor, bool divide=False) -> ()");
  m.def("soft_cap(Tensor(a!) x, float cap) -> ()");
  m.def("position_scale(Tensor(a!) x, Tensor positions, Tensor scales) -> ()");
  m.def("argmax_logprob(Tensor logits, Tensor(a!) token_ids, Tensor(b!) logprobs) -> ()");
  m.def("argmax(Tensor logits, Tensor(a!) token_ids) -> ()");
  m.def(
      "top_logprobs(Tensor logits, Tensor token_ids, Tensor(a!) logprobs, Tensor(b!) ranks, Tensor(c!) top_logprobs, "
      "Tensor(d!) top_ids) -> ()");
  m.def(
      "sample(Tensor logits, Tensor temperatures, Tensor top_ks, Tensor top_ps, Tensor min_ps, Tensor uniforms, "
      "Tensor(a!) token_ids, Tensor(b!)? logprobs=None) -> ()");
  m.def("apply_token_bitmask(Tensor(a!) logits, Tensor rows, Tensor bitmask) -> ()");
  m.def("bf16_blocked_linear(Tensor(a!) out, Tensor input, Tensor weight, Tensor? bias, int[] k_chunk_ends) -> ()");
  m.def(
      "bf16_blocked_linear_act_and_mul(Tensor(a!) out, Tensor input, Tensor weight, Tensor? bias, int[] k_chunk_ends, "
      "str activation) -> ()");
  m.def("bf16_blocked_linear_argmax(Tensor(a!) token_ids, Tensor input, Tensor weight, Tensor? bias, int[] k_chunk_ends) -> ()");
  m.def("bf16_amx_linear(Tensor(a!) out, Tensor input, Tensor weight, Tensor? bias) -> ()");
  m.def("bf16_amx_linear_act_and_mul(Tensor(a!) out, Tensor input, Tensor weight, Tensor? bias, str activation) -> ()");
  m.def("bf16_amx_linear_argmax(Tensor(a!) token_ids, Tensor input, Tensor weight, Tensor? bias, int out_features) -> ()");
  m.def("bf16_fma_linear_argmax(Tensor(a!) token_ids, Tensor input, Tensor weight, Tensor? bias, int out_features) -> ()");
  m.def("fp32_fma_linear_argmax(Tensor(a!) token_ids, Tensor input, Tensor weight, Tensor? bias, int out_features) -> ()");
  m.def("bf16_fma_linear(Tensor(a!) out, Tensor input, Tensor weight, Tensor? bias) -> ()");
  m.def("bf16_fma_linear_act_and_mul(Tensor(a!) out, Tensor input, Tensor weight, Tensor? bias, str activation) -> ()");
  m.def("fp32_fma_linear(Tensor(a!) out, Tensor input, Tensor weight, Tensor? bias) -> ()");
  m.def("fp32_fma_linear_act_and_mul(Tensor(a!) out, Tensor input, Tensor weight, Tensor? bias, str activation) -> ()");
}

// Kernels for one op must share a C++ signature across dispatch keys: mutated tensors are
// at::Tensor&, everything else const at::Tensor&.
TORCH_LIBRARY_IMPL(pagedlm, Meta, m) {
  m.impl("reshape_and_cache",
         [](const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, double, double) {});
  m.impl("paged_attention", [](at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, double, int64_t, double, double, double) {});
  m.impl("paged_prefill_attention", [](at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t,
                                       double, double, double) {});
  m.impl("copy_blocks", [](at::TensorList, at::TensorList, const at::Tensor&) {});
  m.impl("gather_rows", [](at::Tensor&, const at::Tensor&, const at::Tensor&) {});
  m.impl("rms_norm", [](at::Tensor&, const at::Tensor&, const at::Tensor&, double) {});
  m.impl("fused_add_rms_norm", [](at::Tensor&, at::Tensor&, const at::Tensor&, double) {});
  m.impl("rotary_embedding", [](const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&) {});
  m.impl("gemma_rms_norm", [](at::Tensor&, const at::Tensor&, const at::Tensor&, double) {});
  m.impl("gemma_fused_add_rms_norm", [](at::Tensor&, at::Tensor&, const at::Tensor&, double) {});
  m.impl("olmo_rms_norm", [](at::Tensor&, const at::Tensor&, const at::Tensor&, double) {});
  m.impl("olmo_rms_norm_add", [](at::Tensor&, at::Tensor&, const at::Tensor&, double) {});
  m.impl("silu_and_mul", [](at::Tensor&, const at::Tensor&) {});
  m.impl("gelu_tanh_and_mul", [](at::Tensor&, const at::Tensor&) {});
  m.impl("scale", [](at::Tensor&, double, bool) {});
  m.impl("soft_cap", [](at::Tensor&, double) {});
  m.impl("position_scale", [](at::Tensor&, const at::Tensor&, const at::Tensor&) {});
  m.impl("argmax_logprob", [](const at::Tensor&, at::Tensor&, at::Tensor&) {});
  m.impl("argmax", [](const at::Tensor&, at::Tensor&) {});
  m.impl("top_logprobs",
         [](const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&) {});
  m.impl("sample", [](const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, at::Tensor&, const std::optional<at::Tensor>&) {});
  m.impl("apply_token_bitmask", [](at::Tensor&, const at::Tensor&, const at::Tensor&) {});
  m.impl("bf16_blocked_linear", [](at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, at::IntArrayRef) {});
  m.impl("bf16_blocked_linear_act_and_mul", [](at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, at::IntArrayRef, c10::string_view) {});
  m.impl("bf16_blocked_linear_argmax", [](at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const std::optional<at::Tensor>&, at::IntArrayRef) {});
  m.impl("bf16_amx_linear",
         [](at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&) {});
  m.impl("bf16_amx_linear_act_and_mul", [](at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, c10::string_view) {});
  m.impl("bf16_amx_linear_argmax", [](at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, int64_t) {});
  m.impl("bf16_fma_linear_argmax", [](at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, int64_t) {});
  m.impl("fp32_fma_linear_argmax", [](at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&, int64_t) {});
  m.impl("bf16_fma_linear",
         [](at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&) {});
  m.impl("bf16_fma_linear_act_and_mul", [](at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, c10::string_view) {});
  m.impl("fp32_fma_linear",
         [](at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&) {});
  m.impl("fp32_fma_linear_act_and_mul", [](at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, c10::string_view) {});
}

// `import pagedlm._C` loads this library, which runs the registrations above. BF16_ATTENTION_TILES:
// whether this build's CPU attention runs bf16 on csrc/cpu/bf16_tiles.h (see pagedlm.ops).
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m && PyModule_AddIntConstant(m, "BF16_ATTENTION_TILES", pagedlm::cpu::bf16_attention_tiles()) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
