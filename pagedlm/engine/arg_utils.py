"""``LLM``'s arguments as the engine's configs (vLLM's ``engine/arg_utils.py``), and vLLM's
arguments pagedlm takes only at the values it honours."""

import dataclasses
from dataclasses import replace
from typing import Any

from pagedlm.config import (MODEL_CACHE_DTYPES, CacheConfig, ModelConfig, ReasoningConfig, SchedulerConfig,
                            StructuredOutputsConfig)
from pagedlm.sampling_params import SamplingParams
from pagedlm.transformers_utils.gguf import resolve_model
from pagedlm.utils import is_integer

# vLLM's LLM arguments that pagedlm takes at the values it honours: name -> (allowed values, why).
VLLM_NO_OP_ARGS: dict[str, tuple[tuple, str]] = {
    "disable_log_stats": ((True,), "pagedlm logs no periodic statistics (llm.get_stats() gives them)"),
    "quantization": ((None,), "pagedlm runs checkpoints in their dtype (a GGUF file is dequantized)"),
    "revision": ((None,), "pagedlm loads local checkpoints or the Hub cache's default revision"),
    "tokenizer_revision": ((None,), "pagedlm loads local checkpoints or the Hub cache's default revision"),
    "code_revision": ((None,), "pagedlm loads local checkpoints or the Hub cache's default revision"),
    "download_dir": ((None,), "pagedlm reads the Hugging Face cache (HF_HUB_CACHE)"),
    "hf_token": ((None,), "pagedlm reads the Hugging Face cache (HF_TOKEN for a download)"),
    "tokenizer_mode": (("auto", "hf"), "pagedlm uses the checkpoint's fast Hugging Face tokenizer"),
    "skip_tokenizer_init": ((False,), "pagedlm detokenizes and renders chats with the tokenizer"),
    "load_format": (("auto",), "pagedlm reads safetensors or GGUF as the checkpoint holds them"),
    "cpu_offload_gb": ((0, 0.0), "pagedlm keeps the weights on the model's device"),
    "offload_group_size": ((0,), "pagedlm keeps the weights on the model's device"),
    **dict.fromkeys(("offload_num_in_group", "offload_prefetch_step"), ((1,), "pagedlm keeps the weights on the "
                                                                              "model's device")),
    "offload_params": ((None,), "pagedlm keeps the weights on the model's device"),
    "pipeline_parallel_size": ((1,), "pagedlm runs a model on one device (replicas: Ray Data)"),
    "data_parallel_size": ((1,), "pagedlm runs a model on one device (replicas: Ray Data)"),
    "distributed_executor_backend": ((None,), "pagedlm runs a model on one device (replicas: Ray Data)"),
    "disable_custom_all_reduce": ((False, True), "pagedlm runs a model on one device"),
    "disable_sliding_window": ((False,), "pagedlm runs sliding-window layers as the model defines them"),
    "logits_processors": ((None, []), "pagedlm takes logits processors per request (SamplingParams.logits_processors)"),
    "runner": (("auto", "generate"), "pagedlm runs generative models"),
    "convert": (("auto", "none"), "pagedlm runs generative models"),
    "pooler_config": ((None,), "pagedlm runs generative models"),
    **dict.fromkeys(("mm_processor_kwargs", "limit_mm_per_prompt"), ((None, {}), "pagedlm runs text-only models")),
    "allowed_media_domains": ((None,), "pagedlm runs text-only models"),
    "allowed_local_media_path": (("",), "pagedlm runs text-only models"),
    "enable_prompt_embeds": ((False,), "pagedlm takes text or token-id prompts"),
    "enable_lora": ((False,), "pagedlm runs no LoRA adapters"),
    "enable_return_routed_experts": ((False,), "pagedlm runs no mixture-of-experts models"),
    "return_sampling_mask": ((False,), "pagedlm does not return the sampled tokens' masks"),
    "compilation_config": ((None, 0), "pagedlm runs its own kernels; enforce_eager turns off replayed decode steps"),
    "attention_config": ((None,), "pagedlm runs its own attention kernels"),
    "profiler_config": ((None,), "pagedlm has no built-in profiler (benchmarks/profile_decode.py)"),
    "quantization_config": ((None,), "pagedlm runs checkpoints in their dtype"),
    **dict.fromkeys(("speculative_config", "spec_method", "spec_model", "spec_tokens"),
                    ((None,), "pagedlm runs no speculative decoding")),
    "async_scheduling": ((None, False), "pagedlm schedules each step before it runs"),
    "swap_space": ((4, 4.0, 0, 0.0), "pagedlm preempts by recompute and swaps nothing (older vLLM's argument, default 4)"),
    "served_model_name": ((None,), "an LLM serves no API (pagedlm run's --served-model-name names OpenAI rows' model)"),
    "logprobs_mode": (("raw_logprobs",), "pagedlm's log-probabilities are vLLM's raw_logprobs: before "
                                         "temperature, penalties, biases and bans"),
    "scheduling_policy": (("fcfs",), "pagedlm schedules first come, first served"),
    "long_prefill_token_threshold": ((0,), "pagedlm chunks every prefill by max_num_batched_tokens alone"),
    "enable_sleep_mode": ((False,), "pagedlm keeps its weights and KV cache until LLM.close()"),
    "model_impl": (("auto", "vllm"), "pagedlm runs its own model implementations"),
    "worker_cls": (("auto",), "pagedlm runs its own worker"),
    "language_model_only": ((False, True), "pagedlm runs a multimodal checkpoint's language model only"),
    "disable_cascade_attn": ((True, False), "vLLM 0.32 removed cascade attention: the argument does nothing there"),
    "config_format": (("auto", "hf"), "pagedlm reads the checkpoint's config.json"),
}


def create_engine_configs(
    *, model, dtype, device, max_model_len, block_size, kv_cache_dtype, calculate_kv_scales, num_kv_blocks,
    kv_cache_memory_bytes, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, enable_prefix_caching,
    generation_config, override_generation_config, hf_overrides, max_logprobs, seed, tokenizer, trust_remote_code,
    chat_template, gpu_memory_utilization, tensor_parallel_size, batch_invariant, enforce_eager, reasoning_parser,
    reasoning_config, structured_outputs_config, enable_trace_replay, stream_interval, vllm_kwargs,
) -> tuple[ModelConfig, CacheConfig, SchedulerConfig, ReasoningConfig | None, StructuredOutputsConfig]:
    """``LLM``'s arguments as the engine's configs, each checked; None stands for the default
    (vLLM's ``EngineArgs.create_engine_config``).

    Raises:
        TypeError: an argument neither ``LLM``'s nor one of ``VLLM_NO_OP_ARGS``.
        ValueError: a value the engine cannot run, naming its argument (and ``VLLM_NO_OP_ARGS``'
            values other than the allowed ones, with why).
    """
    vllm_kwargs = dict(vllm_kwargs)
    blocks = vllm_kwargs.pop("num_gpu_blocks_override", None)  # vLLM's name for num_kv_blocks
    if blocks is not None:
        if num_kv_blocks is not None:
            raise ValueError("num_gpu_blocks_override is vLLM's name for num_kv_blocks: give one of them.")
        if not (isinstance(blocks, int) and not isinstance(blocks, bool) and blocks > 0):  # a hunt: named num_kv_blocks
            raise ValueError(f"num_gpu_blocks_override (num_kv_blocks) must be a positive int, got {blocks!r}.")
        num_kv_blocks = blocks
    for name, value in vllm_kwargs.items():
        if name not in VLLM_NO_OP_ARGS:
            raise TypeError(f"LLM() got an unexpected keyword argument {name!r}")
        if name == "limit_mm_per_prompt" and isinstance(value, dict) and all(type(v) is int and v == 0
                                                                            for v in value.values()):
            value = {}  # {"image": 0}: vLLM's idiom for a multimodal checkpoint run on text alone
        allowed, why = VLLM_NO_OP_ARGS[name]
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))} ({why}), got {value!r}.")
    if type(tensor_parallel_size) is not int or tensor_parallel_size != 1:
        raise ValueError(f"tensor_parallel_size must be 1, got {tensor_parallel_size!r}: pagedlm runs a model on one "
                         "device (for more throughput, run replicas on Ray Data: docs/distributed.md).")
    model_config = ModelConfig.create(
        resolve_model(model), dtype, max_model_len, device, generation_config, seed,
        None if tokenizer is None else resolve_model(tokenizer, "tokenizer"), trust_remote_code, chat_template,
        override_generation_config, hf_overrides, max_logprobs, batch_invariant, enforce_eager, enable_trace_replay,
    )
    try:
        SamplingParams(**model_config.get_diff_sampling_param())
    except ValueError as exc:
        if override_generation_config:
            raise ValueError(f"override_generation_config with the model's generation config gives unusable "
                             f"sampling defaults ({exc}).") from exc
        raise ValueError(f"The model's generation config gives unusable sampling defaults ({exc}); "
                         "pass generation_config='vllm' to ignore them.") from exc
    if isinstance(kv_cache_dtype, str) and kv_cache_dtype in MODEL_CACHE_DTYPES:  # a hunt: refused
        if MODEL_CACHE_DTYPES[kv_cache_dtype] != model_config.dtype:
            raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} needs a model run in {kv_cache_dtype} (dtype="
                             f"{kv_cache_dtype!r}); the KV cache holds the model's dtype ('auto') or fp8, and this model "
                             f"runs in {str(model_config.dtype).removeprefix('torch.')}.")
        if calculate_kv_scales is True:  # a review: the refusal below named 'auto'
            raise ValueError(f"calculate_kv_scales=True sets the scales of an fp8 KV cache; kv_cache_dtype "
                             f"{kv_cache_dtype!r} is the model's own dtype.")
        kv_cache_dtype = "auto"
    cache_config = CacheConfig(16 if block_size is None else block_size, num_kv_blocks, kv_cache_memory_bytes,
                               True if enable_prefix_caching is None else enable_prefix_caching, kv_cache_dtype,
                               calculate_kv_scales, gpu_memory_utilization)
    if cache_config.calculate_kv_scales and model_config.max_model_len < 2:
        raise ValueError(f"calculate_kv_scales=True measures the scales over a prompt of up to max_model_len - 1 "
                         f"tokens; it needs max_model_len of at least 2, got {model_config.max_model_len}.")
    if enable_chunked_prefill is None:
        enable_chunked_prefill = True
    if max_num_batched_tokens is None:
        max_num_batched_tokens = 2048 if enable_chunked_prefill is not False else max(2048, model_config.max_model_len)
        if _is_positive_int(max_num_seqs) and max_num_seqs > max_num_batched_tokens:  # a hunt: named no default
            raise ValueError(f"max_num_seqs ({max_num_seqs}) must be <= max_num_batched_tokens, which defaults to "
                             f"{max_num_batched_tokens} here; set max_num_batched_tokens too.")
    if max_num_seqs is None:
        max_num_seqs = min(256, max_num_batched_tokens) if _is_positive_int(max_num_batched_tokens) else 256
    scheduler_config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, stream_interval)
    if not enable_chunked_prefill and max_num_batched_tokens < model_config.max_model_len:
        # vLLM's rule: without chunking a sequence computed again after preemption (prompt and
        # outputs) must fit one step, or it would wait forever.
        raise ValueError(
            f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_model_len "
            f"({model_config.max_model_len}) when enable_chunked_prefill=False; raise max_num_batched_tokens, "
            "lower max_model_len or enable chunked prefill."
        )
    reasoning = _reasoning_config(reasoning_parser, reasoning_config)
    return model_config, cache_config, scheduler_config, reasoning, _structured_outputs_config(
        structured_outputs_config, reasoning_parser)


def _reasoning_config(parser: str | None, config: ReasoningConfig | dict[str, str] | None) -> ReasoningConfig | None:
    """``LLM``'s ``reasoning_parser`` and ``reasoning_config`` as one ``ReasoningConfig`` (the
    config's strings over the parser's), or None where neither is given."""
    if parser is not None and not isinstance(parser, str):
        raise ValueError(f"reasoning_parser must be a str, got {parser!r}.")
    if isinstance(config, dict):
        fields = [f.name for f in dataclasses.fields(ReasoningConfig)]
        if set(config) - set(fields):
            raise ValueError(f"reasoning_config: unknown field(s) {', '.join(sorted(set(config) - set(fields)))}; "
                             f"allowed: {', '.join(fields)}.")
        config = ReasoningConfig(**{"reasoning_parser": parser or "", **config})
    elif config is not None and not isinstance(config, ReasoningConfig):
        raise ValueError(f"reasoning_config must be a ReasoningConfig, a dict of its fields or None, got {config!r}.")
    if config is None:
        return ReasoningConfig(reasoning_parser=parser) if parser else None
    if parser and config.reasoning_parser and parser != config.reasoning_parser:
        raise ValueError(f"reasoning_parser {parser!r} differs from reasoning_config's {config.reasoning_parser!r}.")
    return replace(config, reasoning_parser=parser) if parser and not config.reasoning_parser else config


def _structured_outputs_config(config: StructuredOutputsConfig | dict[str, Any] | None,
                               reasoning_parser: str | None) -> StructuredOutputsConfig:
    """``LLM``'s ``structured_outputs_config``, with ``LLM``'s ``reasoning_parser`` over the
    config's own, as in vLLM (whose ``reasoning_parser`` argument sets both; a
    ``reasoning_config``'s parser only names the thinking budget's strings)."""
    if isinstance(config, dict):
        fields = [f.name for f in dataclasses.fields(StructuredOutputsConfig)]
        if set(config) - set(fields):
            raise ValueError(f"structured_outputs_config: unknown or unsupported field(s) "
                             f"{', '.join(sorted(set(config) - set(fields)))}; supported: {', '.join(fields)}.")
        config = StructuredOutputsConfig(**config)
    elif config is None:
        config = StructuredOutputsConfig()
    elif not isinstance(config, StructuredOutputsConfig):
        raise ValueError(f"structured_outputs_config must be a StructuredOutputsConfig, a dict of its fields or None, "
                         f"got {config!r}.")
    return replace(config, reasoning_parser=reasoning_parser) if reasoning_parser else config


def _is_positive_int(value: object) -> bool:
    return is_integer(value) and value > 0
