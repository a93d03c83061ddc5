"""Engine configuration: the model, the KV cache and the scheduler's budgets."""

import copy
import gc
import inspect
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jinja2 import TemplateSyntaxError
from transformers import AutoConfig, PretrainedConfig
from transformers.utils.chat_template_utils import _compile_jinja_template  # how chats are rendered

from pagedlm.ops import backend_for
from pagedlm.transformers_utils.generation_config import check_generation_overrides, generation_overrides, sampling_defaults
from pagedlm.transformers_utils.rope import rope_layer_types, rope_parameters

logger = logging.getLogger("pagedlm")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# vLLM's other names of LLM(dtype=...)'s values.
DTYPE_ALIASES = {"half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32", "bf16": "bfloat16"}
# kv_cache_dtype values other than "auto" (vLLM's names; "fp8" is e4m3).
KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# vLLM's kv_cache_dtype names of a cache in the model's own dtype: "auto" where they are the model's.
MODEL_CACHE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Share of available RAM given to the KV cache on CPU when neither kv_cache_memory_bytes nor
# num_kv_blocks is set; the rest stays for weights, activations and the user's process.
CPU_KV_CACHE_RAM_SHARE = 0.2
GPU_MEMORY_UTILIZATION = 0.9


def check_device_name(device: object) -> None:
    """Raises: ValueError: ``device`` is none of 'auto', 'cpu', 'cuda', 'cuda:N' (whatever this
    machine has: for a job whose engines start on other machines)."""
    if device != "auto" and not (isinstance(device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", device)):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}.")


def resolve_device(device: str) -> torch.device:
    check_device_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but this torch sees no CUDA device (a CPU-only build, or no GPU).")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}, but there are {torch.cuda.device_count()} CUDA devices.")
    return torch.device(device)


@dataclass
class ModelConfig:
    model: str
    # The language model's config: a composite (multimodal) checkpoint's text_config, with the
    # checkpoint's architectures; pagedlm runs the language model only.
    hf_config: PretrainedConfig
    dtype: torch.dtype
    max_model_len: int
    device: torch.device
    generation_config: str = "auto"  # where sampling defaults come from: "auto" (the model), "vllm" (none), a directory
    seed: int | None = None  # seeds the draws of completions without a seed of their own
    tokenizer: str | None = None  # the tokenizer's checkpoint directory; None: the model's
    trust_remote_code: bool = False  # lets transformers run a checkpoint's own config/tokenizer code
    chat_template: str | None = None  # a Jinja template that replaces the tokenizer's own
    override_generation_config: dict[str, Any] | None = None  # generation-config keys set over the model's
    max_logprobs: int | None = None  # the most logprobs / prompt_logprobs a request may ask for (None: any)
    # Whether a request's results must not depend on the rest of the batch (see LLM's batch_invariant).
    batch_invariant: bool = True
    # Whether every step runs the model's forward pass op by op (see LLM's enforce_eager).
    enforce_eager: bool = False
    # Whether requests may force their tokens (SamplingParams.trace_decode_token_ids; vLLM's).
    enable_trace_replay: bool = False

    @classmethod
    def create(
        cls, model: str, dtype: str | torch.dtype, max_model_len: int | None, device: str, generation_config: str = "auto",
        seed: int | None = None, tokenizer: str | None = None, trust_remote_code: bool = False,
        chat_template: str | None = None, override_generation_config: dict[str, Any] | None = None,
        hf_overrides: dict[str, Any] | Callable[[PretrainedConfig], PretrainedConfig] | None = None,
        max_logprobs: int | None = None, batch_invariant: bool | None = None, enforce_eager: bool = False,
        enable_trace_replay: bool = False,
    ) -> "ModelConfig":
        if not isinstance(trust_remote_code, bool):
            raise ValueError(f"trust_remote_code must be a bool, got {trust_remote_code!r}.")
        if seed is not None and (not _is_int(seed) or not -2**63 <= seed < 2**64):
            raise ValueError(f"seed must be None or an int in [-2**63, 2**64), got {seed!r}.")
        if not isinstance(generation_config, str) or (
            generation_config not in ("auto", "vllm")
            and not os.path.isfile(os.path.join(generation_config, "generation_config.json"))
        ):
            raise ValueError(
                f"generation_config must be 'auto' (the model's generation_config.json), 'vllm' (no model "
                f"defaults) or a directory holding a generation_config.json, got {generation_config!r}."
            )
        check_generation_overrides(override_generation_config)
        if max_logprobs is not None and (not _is_int(max_logprobs) or max_logprobs < -1):
            raise ValueError(f"max_logprobs must be None, -1 (the vocabulary) or an int >= 0, got {max_logprobs!r}.")
        try:
            hf_config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            raise
        except Exception as exc:  # transformers' typed fields raise huggingface_hub's StrictDataclassError
            raise ValueError(f"{model!r}: its config does not validate: {type(exc).__name__}: {exc}") from None
        hf_config = _apply_hf_overrides(hf_config, hf_overrides)
        if quantization := _quantization(hf_config, model):
            raise ValueError(f"{model!r} is a quantized checkpoint ({quantization}); pagedlm runs "
                             "checkpoints in float32, bfloat16 or float16, and GGUF files (dequantized when loaded).")
        dev = resolve_device(device)
        resolved = _resolve_dtype(hf_config, dtype, dev)
        text_config = hf_config.get_text_config()
        if text_config is not hf_config:
            text_config.architectures = hf_config.architectures
            # transformers' composite model ties its head by the top-level flag, and generates
            # with the top-level EOS ids when there is no generation_config.json.
            text_config.tie_word_embeddings = getattr(hf_config, "tie_word_embeddings", text_config.tie_word_embeddings)
            if getattr(hf_config, "eos_token_id", None) is not None:
                text_config.eos_token_id = hf_config.eos_token_id
            hf_config = text_config
        _check_model_fields(hf_config)
        limit = _max_positions(hf_config)
        if max_model_len is None:
            max_model_len = limit
        elif not _is_int(max_model_len) or not 0 < max_model_len <= limit:
            auto = " (vLLM's -1, the longest the KV cache holds, is not taken: pass None for the model's own)" \
                if max_model_len == -1 else ""
            raise ValueError(f"max_model_len must be an int in [1, {limit}] for this model or None, got "
                             f"{max_model_len!r}{auto}.")
        if batch_invariant is not None and not isinstance(batch_invariant, bool):
            raise ValueError(f"batch_invariant must be None (the backend's), True or False, got {batch_invariant!r}.")
        backend = backend_for(dev)
        if batch_invariant is None:
            batch_invariant = backend != "torch-reference"
        elif batch_invariant and backend == "torch-reference":  # found by a hunt: accepted, not honoured
            raise ValueError(
                "batch_invariant=True needs pagedlm's kernels, but the ops run on the torch reference "
                "(PAGEDLM_OPS_BACKEND=torch-reference, or the extension did not load), whose results change with "
                "the batch: leave batch_invariant at None or pass False.")
        elif backend == "cpu" and not batch_invariant:
            raise ValueError(
                "batch_invariant must be None or True on the CPU (False is for CUDA and the torch reference), got "
                "False: the CPU kernels are batch-invariant at no measured cost and have no other path.")
        for name, value in (("enforce_eager", enforce_eager), ("enable_trace_replay", enable_trace_replay)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}.")
        return cls(model, hf_config, resolved, max_model_len, dev, generation_config, seed, tokenizer, trust_remote_code,
                   load_chat_template(chat_template), override_generation_config, max_logprobs, batch_invariant,
                   enforce_eager, enable_trace_replay)

    def get_diff_sampling_param(self) -> dict[str, int | float]:
        """The sampling defaults the model's generation config sets (vLLM's name); none with
        ``generation_config="vllm"``; ``override_generation_config`` set over either."""
        defaults = {} if self.generation_config == "vllm" else sampling_defaults(self.generation_config_dir)
        merged = {**defaults, **generation_overrides(self.override_generation_config)}
        return {field: value for field, value in merged.items() if value is not None}

    @property
    def generation_config_dir(self) -> str:
        """Where ``generation_config.json`` is read (its EOS ids, and its sampling defaults unless
        ``generation_config="vllm"``): the directory given, else the model's (vLLM's
        ``try_get_generation_config``)."""
        return self.model if self.generation_config in ("auto", "vllm") else self.generation_config

    @property
    def num_kv_heads(self) -> int:
        return get_num_kv_heads(self.hf_config)

    @property
    def head_size(self) -> int:
        return get_head_size(self.hf_config)

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers


def _check_model_fields(hf_config: PretrainedConfig) -> None:
    """Refuse values the model would run as something else, or fail on only once loaded (found by
    hunts): a soft cap of 0 (transformers' divides by it; pagedlm read it as no cap) or infinite, a
    negative sliding window, a softmax scale that is not positive, and a zero ``logits_scaling``.
    (The sizes are checked once the architecture is known to be supported: ``check_model_sizes``.)

    Raises:
        ValueError: naming the field and the values allowed.
    """
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = getattr(hf_config, name, None)
        if value is not None and not _is_positive(value):
            raise ValueError(f"the config's {name} must be a positive number or null (no cap), got {value!r}.")
    window = getattr(hf_config, "sliding_window", None)
    if window is not None and not (_is_int(window) and window >= 0):
        raise ValueError(f"the config's sliding_window must be a number of tokens >= 0 or null (0 and null: no "
                         f"window), got {window!r}.")
    # The attention kernels take a positive scale (they scale a score's running maximum); transformers
    # would run 0 (uniform attention) and a negative scale, pagedlm ran 0 at the default scale.
    multiplier = read_field(hf_config, "attention_multiplier", None)
    if multiplier is not None and not _is_positive(multiplier):
        raise ValueError(f"the config's attention_multiplier (the softmax scale) must be a positive number or null "
                         f"(head_dim ** -0.5), got {multiplier!r}.")
    if hf_config.model_type in ("gemma2", "gemma3", "gemma3_text"):
        scalar = getattr(hf_config, "query_pre_attn_scalar", None)
        if not _is_positive(scalar):
            raise ValueError(f"the config's query_pre_attn_scalar (the softmax scale is its ** -0.5) must be a positive "
                             f"number, got {scalar!r}.")
    scaling = read_field(hf_config, "logits_scaling", 1.0)
    if not (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling != 0):
        raise ValueError(f"the config's logits_scaling (the logits are divided by it) must be a finite number other "
                         f"than 0, got {scaling!r}.")


def check_model_sizes(hf_config: PretrainedConfig) -> None:
    """Refuse a supported architecture's config whose sizes and counts (layers, heads, widths,
    vocabulary) are not positive integers, or whose heads are no multiple of its KV heads: found by
    a hunt, 0 layers raised ZeroDivisionError once the weights had loaded, the heads only in the
    first step's kernel.

    Raises:
        ValueError: naming the field.
    """
    for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
                 "num_key_value_heads", "head_dim"):
        value = getattr(hf_config, name, None)
        if (value is not None or name not in ("num_key_value_heads", "head_dim")) and not (_is_int(value) and value > 0):
            raise ValueError(f"the config's {name} must be a positive integer, got {value!r}.")
    heads, kv_heads = hf_config.num_attention_heads, get_num_kv_heads(hf_config)
    if heads % kv_heads:
        raise ValueError(f"the config's num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                         f"({kv_heads}).")


def _is_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _apply_hf_overrides(hf_config: PretrainedConfig, hf_overrides: Any) -> PretrainedConfig:
    """vLLM's ``hf_overrides``: a function of the config, or fields to set on it (a dict value
    updates the nested config of that name, e.g. a multimodal checkpoint's ``text_config``)."""
    if hf_overrides is None:
        return hf_config
    if not callable(hf_overrides) and (not isinstance(hf_overrides, dict)
                                       or not all(isinstance(k, str) for k in hf_overrides)):
        raise ValueError(f"hf_overrides must be a dict of config fields or a function of the config, "
                         f"got {type(hf_overrides).__name__}.")
    try:
        if callable(hf_overrides):
            hf_config = hf_overrides(hf_config)
        else:
            _set_fields(hf_config, hf_overrides)
    except Exception as exc:  # transformers' own validation errors are not all ValueErrors
        raise ValueError(f"hf_overrides: {type(exc).__name__}: {exc}") from None
    if not isinstance(hf_config, PretrainedConfig):
        raise ValueError(f"hf_overrides must return the config, got {type(hf_config).__name__}.")
    return hf_config


# Fields transformers reads only while building a config (its __post_init__), and what it builds
# from them: set afterwards, they would change nothing.
_BUILT_FROM = {"use_sliding_window": ("layer_types",), "max_window_layers": ("layer_types",),
               "no_rope_layer_interval": ("no_rope_layers",), "sliding_window_pattern": ("layer_types",)}


def _set_fields(config: PretrainedConfig, fields: dict[str, Any]) -> None:
    """Raises ValueError for a key that is no field of ``config`` (neither set on it nor taken by
    its class), which nothing would read."""
    known = set(config.to_dict()) | set(inspect.signature(type(config).__init__).parameters) - {"self", "kwargs"}
    for key, value in fields.items():
        if key not in known and not hasattr(config, key):
            raise ValueError(f"{key!r} is no field of {type(config).__name__}, so nothing would read it; its fields: "
                             f"{', '.join(sorted(known))}")
        if key == "rope_scaling" and "rope_parameters" in known:
            raise ValueError("set rope_parameters instead of rope_scaling: transformers writes rope_scaling into "
                             "rope_parameters without the model's rope_theta")
        built = _BUILT_FROM.get(key)
        if built is not None and any(getattr(config, name, None) is not None for name in built):
            raise ValueError(f"{key!r} is read only while transformers builds the config, into "
                             f"{' and '.join(built)}, which the checkpoint's config already holds: override "
                             f"{' and '.join(built)} instead")
        nested = getattr(config, key, None)
        if isinstance(nested, PretrainedConfig) and isinstance(value, dict):
            _set_fields(nested, value)
        elif key == "rope_parameters" and isinstance(value, dict) and isinstance(nested, dict):
            config.rope_parameters = _overridden_rope_parameters(config, nested, value)
        else:
            setattr(config, key, value)
    if "original_max_position_embeddings" in fields and isinstance(getattr(config, "rope_parameters", None), dict):
        # transformers' RoPE reads its copy in rope_parameters (LongRoPE's short/long switch, YaRN's
        # ratio): set there too, as transformers' from_pretrained(**fields) has it (found by a hunt).
        rope = config.rope_parameters
        for params in [rope[t] for t in config.nested_rope_parameter_keys(rope)] or [rope]:
            if isinstance(params, dict) and "original_max_position_embeddings" in params:
                params["original_max_position_embeddings"] = fields["original_max_position_embeddings"]
    if isinstance(fields.get("rope_parameters"), dict) or "original_max_position_embeddings" in fields:
        # As transformers reads a checkpoint's, with every other field set (max_position_embeddings).
        config.standardize_rope_params()
        config.validate_rope()


def _overridden_rope_parameters(config: PretrainedConfig, old: dict, new: dict) -> dict:
    """The config's ``rope_parameters`` ``old`` with an override ``new``: each dict it gives
    replaces the model's (flat, or one per layer type, the layer types it leaves out kept), with
    the ``rope_theta`` and ``partial_rotary_factor`` it leaves out taken from the model's
    (transformers 5 holds them only there: a YaRN override without them ran at theta 10,000).
    transformers' ``standardize_rope_params`` then adds ``original_max_position_embeddings`` where
    a scaled type needs it.

    Raises:
        ValueError: a flat override of a model with a RoPE per layer type, or a dict without its
            ``rope_type`` (transformers would read it as "default", dropping what it scales by).
    """
    old_types, new_types = config.nested_rope_parameter_keys(old), config.nested_rope_parameter_keys(new)
    if old_types and not new_types:
        raise ValueError(f"rope_parameters: the model has a RoPE per layer type ({', '.join(old_types)}); give the "
                         "override under those keys (a layer type left out keeps the model's)")
    merged = {**(copy.deepcopy(old) if old_types else {}),  # and new's other keys (Olmo 3's top-level "truncate")
              **{key: value for key, value in new.items() if key not in new_types}}
    for layer_type in new_types or [None]:
        params = copy.deepcopy(new if layer_type is None else new[layer_type])
        source = old if not old_types else old.get(layer_type) or {}
        where = "" if layer_type is None else f"[{layer_type!r}]"
        if not isinstance(params, dict) or "rope_type" not in params:
            raise ValueError(f"rope_parameters{where} must be a dict naming its rope_type: an override replaces the "
                             f"model's ({source!r})")
        for kept in ("rope_theta", "partial_rotary_factor"):
            if kept not in params and kept in source:
                params[kept] = source[kept]
        if layer_type is None:
            return params
        merged[layer_type] = params
    return merged


def get_num_kv_heads(hf_config: PretrainedConfig) -> int:
    """KV heads per layer (``num_key_value_heads``; equal to the query heads without GQA/MQA)."""
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def get_head_size(hf_config: PretrainedConfig) -> int:
    """Size of one attention head: ``head_dim`` where the config sets it, else hidden / heads."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


# Config fields that only some of transformers' models read, by model_type: a checkpoint may carry
# keys its architecture's model never reads, which must not count (``reads_field``).
_FIELD_READERS = {
    "partial_rotary_factor": ("phi3",),
    "attention_bias": ("llama", "granite", "qwen3", "smollm3", "olmo2", "olmo3", "gemma", "gemma2", "gemma3",
                       "gemma3_text"),
    "mlp_bias": ("llama", "granite", "smollm3"),
    **{name: ("granite",) for name in ("attention_multiplier", "residual_multiplier", "embedding_multiplier",
                                       "logits_scaling")},
}


def reads_field(hf_config: PretrainedConfig, name: str) -> bool:
    """Whether transformers' model of the config's ``model_type`` reads the field ``name`` (one of
    ``_FIELD_READERS``); others run as if it were absent."""
    return hf_config.model_type in _FIELD_READERS[name]


def read_field(hf_config: PretrainedConfig, name: str, default: Any) -> Any:
    """The config's ``name`` where transformers' model of its ``model_type`` reads it, else ``default``."""
    return getattr(hf_config, name, default) if reads_field(hf_config, name) else default


# Where transformers' models read a sliding window: on every layer, or by the config's layer_types.
# Others (Llama, Granite) ignore ``sliding_window`` (a "llamafied" Qwen2 checkpoint keeps the key).
_SLIDING_EVERY_LAYER = ("mistral", "ministral3", "phi3")
_SLIDING_BY_LAYER_TYPES = ("qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text", "ministral", "smollm3", "olmo3")


def get_sliding_window(hf_config: PretrainedConfig, layer_idx: int) -> int:
    """The sliding window of layer ``layer_idx`` in tokens (a query sees itself and the ``W - 1``
    tokens before it), 0 for full attention, as transformers' model of the config's ``model_type``
    applies ``sliding_window``: Mistral, Ministral 3 and Phi-3 on every layer; Gemma 2/3, Qwen2, Qwen3, SmolLM3,
    OLMo 3 and Ministral (a Mistral config with ``layer_types``, as transformers reads it) on the
    "sliding_attention" layers of ``layer_types`` (their configs derive it; SmolLM3's attention
    also reads ``use_sliding_window``, but transformers' mask windows those layers without it);
    other models never."""
    window = getattr(hf_config, "sliding_window", None) or 0
    if hf_config.model_type in _SLIDING_EVERY_LAYER:
        return window
    layer_types = getattr(hf_config, "layer_types", None)
    if hf_config.model_type not in _SLIDING_BY_LAYER_TYPES or layer_types is None:
        return 0
    if layer_types[layer_idx] not in ("full_attention", "sliding_attention"):
        raise ValueError(f"layer_types[{layer_idx}] = {layer_types[layer_idx]!r} is not supported; supported: "
                         "'full_attention', 'sliding_attention'.")
    if layer_types[layer_idx] == "sliding_attention" and not window:
        # transformers fails building such a layer's mask (found by a hunt; pagedlm attended fully)
        raise ValueError(f"layer_types[{layer_idx}] is 'sliding_attention' but sliding_window is "
                         f"{getattr(hf_config, 'sliding_window', None)!r}: give the window (sliding_window) or "
                         "make the layer 'full_attention'.")
    return window if layer_types[layer_idx] == "sliding_attention" else 0


# Files that name a checkpoint's quantization beside config.json: AutoGPTQ's, ModelOpt's.
_QUANTIZATION_FILES = ("quantize_config.json", "hf_quant_config.json")


def _quantization(hf_config: PretrainedConfig, model: str) -> str | None:
    """Where and how a checkpoint says it is quantized, or None: where vLLM 0.32 looks (the config's
    ``quantization_config``, a composite model's text config's, compressed-tensors'
    ``compression_config``) and the quantizers' own files (found by a hunt: those were refused
    only by a weight name, after the model was built)."""
    text_config = getattr(hf_config, "text_config", None)
    for where, config in (("quantization_config", getattr(hf_config, "quantization_config", None)),
                          ("text_config.quantization_config", getattr(text_config, "quantization_config", None)),
                          ("compression_config", getattr(hf_config, "compression_config", None))):
        if isinstance(config, dict) and all(v is None for v in config.values()):
            continue  # a review: compressed-tensors' {"quantization_config": null, ...} quantizes nothing
        if config:
            method = config.get("quant_method", "no quant_method") if isinstance(config, dict) else type(config).__name__
            return f"{where}: {method}"
    found = [name for name in _QUANTIZATION_FILES if os.path.isfile(os.path.join(model, name))]
    return f"{found[0]} beside its config" if found else None


def _resolve_dtype(hf_config: PretrainedConfig, dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype == "auto":
        config_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
        if isinstance(config_dtype, str):
            config_dtype = _DTYPES.get(config_dtype, torch.float32)
        if config_dtype == torch.float16 and device.type == "cpu":
            logger.info("The checkpoint is float16; running it in bfloat16, the fast half precision on CPU.")
            return torch.bfloat16
        return config_dtype if config_dtype in _DTYPES.values() else torch.float32
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of 'auto', {', '.join(map(repr, _DTYPES))} (or vLLM's aliases "
                         f"{', '.join(map(repr, DTYPE_ALIASES))}), got {dtype!r}.")
    return _DTYPES[dtype]


@dataclass
class CacheConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None  # bytes
    enable_prefix_caching: bool = True
    cache_dtype: str = "auto"  # "auto" (the model's dtype) or a key of KV_CACHE_DTYPES
    calculate_kv_scales: bool = False  # fp8 scales from a calibration prefill instead of the checkpoint's or 1.0
    # The share of the GPU's memory pagedlm may fill (CUDA), or of available RAM the KV cache takes (CPU).
    gpu_memory_utilization: float | None = None

    def kv_cache_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the KV cache's entries: the model's for "auto", else the fp8 format."""
        return model_dtype if self.cache_dtype == "auto" else KV_CACHE_DTYPES[self.cache_dtype]

    def __post_init__(self) -> None:
        if not _is_int(self.block_size) or self.block_size not in (8, 16, 32):
            raise ValueError(f"block_size must be 8, 16 or 32, got {self.block_size!r}.")
        if not isinstance(self.cache_dtype, str) or (self.cache_dtype != "auto" and self.cache_dtype not in KV_CACHE_DTYPES):
            raise ValueError(f"kv_cache_dtype must be 'auto' (or the model's dtype, 'bfloat16' or 'float16'), "
                             f"{', '.join(map(repr, KV_CACHE_DTYPES))}, got {self.cache_dtype!r}.")
        if not isinstance(self.calculate_kv_scales, bool):
            raise ValueError(f"calculate_kv_scales must be a bool, got {self.calculate_kv_scales!r}.")
        if self.calculate_kv_scales and self.cache_dtype == "auto":
            raise ValueError("calculate_kv_scales=True sets the scales of an fp8 KV cache; it needs kv_cache_dtype "
                             f"{' or '.join(map(repr, KV_CACHE_DTYPES))}, got 'auto'.")
        sizes = [name for name in ("num_kv_blocks", "kv_cache_memory_bytes", "gpu_memory_utilization")
                 if getattr(self, name) is not None]
        if len(sizes) > 1:
            raise ValueError(f"Set at most one of num_kv_blocks, kv_cache_memory_bytes and gpu_memory_utilization, "
                             f"got {' and '.join(sizes)}.")
        if self.num_kv_blocks is not None and (not _is_int(self.num_kv_blocks) or self.num_kv_blocks < 1):
            raise ValueError(f"num_kv_blocks must be a positive int, got {self.num_kv_blocks!r}.")
        memory = self.kv_cache_memory_bytes
        if memory is not None and (not _is_int(memory) or memory < 1):
            raise ValueError(f"kv_cache_memory_bytes must be a positive number of bytes, got {memory!r}.")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}.")
        share = self.gpu_memory_utilization
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1):
            raise ValueError(f"gpu_memory_utilization must be None or a number in (0, 1], got {share!r}.")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    # LLMEngine.step returns a running request's output every this many tokens (vLLM's).
    stream_interval: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(f"enable_chunked_prefill must be a bool, got {self.enable_chunked_prefill!r}.")
        for name in ("max_num_seqs", "max_num_batched_tokens", "stream_interval"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs ({self.max_num_seqs})."
            )


# vLLM's reasoning parsers whose reasoning start and end strings pagedlm knows (vllm/reasoning/).
REASONING_PARSERS = {
    "qwen3": ("<think>", "</think>"),
    "deepseek_r1": ("<think>", "</think>"),
    "ernie45": ("<think>", "</think>"),
    "cohere_command3": ("<|START_THINKING|>", "<|END_THINKING|>"),
    "minimax_m3": ("<mm:think>", "</mm:think>"),
}


@dataclass
class ReasoningConfig:
    """Where a reasoning model's thinking starts, and the string forced when a request's
    ``thinking_token_budget`` runs out (vLLM's ``ReasoningConfig``). ``reasoning_parser`` names
    vLLM's parser whose strings to take (``REASONING_PARSERS``); a string given here wins over the
    parser's. ``reasoning_end_str`` may lead with a transition phrase ("\n\nTime to answer.\n</think>").

    Raises:
        ValueError: an unknown parser, or no start or end string.
    """

    reasoning_parser: str = ""
    reasoning_start_str: str = ""
    reasoning_end_str: str = ""

    def __post_init__(self) -> None:
        for name in ("reasoning_parser", "reasoning_start_str", "reasoning_end_str"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str, got {getattr(self, name)!r}.")
        if self.reasoning_parser:
            if self.reasoning_parser not in REASONING_PARSERS:
                raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)} (or give "
                                 f"reasoning_start_str and reasoning_end_str), got {self.reasoning_parser!r}.")
            start, end = REASONING_PARSERS[self.reasoning_parser]
            self.reasoning_start_str = self.reasoning_start_str or start
            self.reasoning_end_str = self.reasoning_end_str or end
        if not (self.reasoning_start_str and self.reasoning_end_str):
            raise ValueError("a ReasoningConfig needs reasoning_parser, or both reasoning_start_str and "
                             "reasoning_end_str.")
        if self.reasoning_start_str == self.reasoning_end_str:
            raise ValueError(f"reasoning_start_str and reasoning_end_str must differ, got {self.reasoning_end_str!r} "
                             "for both (no thinking section could ever close).")


@dataclass
class StructuredOutputsConfig:
    """The engine's structured-outputs settings (vLLM's ``StructuredOutputsConfig``, the fields
    pagedlm honours). ``reasoning_parser`` (or ``LLM``'s) makes a request's grammar hold only after
    the model's reasoning ends (``engine/reasoning_gate.py``), unless ``enable_in_reasoning``.
    ``disable_any_whitespace``: every request's JSON (``json``, ``json_object``) is compact, with no
    whitespace at all, as a request's own ``disable_any_whitespace`` makes it (vLLM 0.32 reads only
    this one).

    Raises:
        ValueError: a field of the wrong type, or a backend other than xgrammar.
    """

    backend: str = "auto"  # "auto" or "xgrammar": pagedlm's grammars run on xgrammar
    reasoning_parser: str = ""
    enable_in_reasoning: bool = False
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "xgrammar"):
            raise ValueError(f"structured_outputs_config.backend must be 'auto' or 'xgrammar' (pagedlm's structured "
                             f"outputs run on xgrammar), got {self.backend!r}.")
        if not isinstance(self.reasoning_parser, str) or self.reasoning_parser not in ("", *REASONING_PARSERS):
            raise ValueError(f"structured_outputs_config.reasoning_parser must be one of {', '.join(REASONING_PARSERS)} "
                             f"or '' (none), got {self.reasoning_parser!r}.")
        for name in ("enable_in_reasoning", "disable_any_whitespace"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"structured_outputs_config.{name} must be True or False, got {getattr(self, name)!r}.")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_chat_template(chat_template: str | os.PathLike | None, files: bool = True) -> str | None:
    """A chat template given as a file's path (unless not ``files``), or as the template itself
    (vLLM's ``load_chat_template``: text with any of ``{``, ``}`` or a newline is a template),
    compiled as transformers compiles it to render chats.

    Raises:
        ValueError: neither a file nor template text (with ``files`` False: not template text),
            or the template is not valid Jinja.
    """
    if chat_template is None:
        return None
    if not isinstance(chat_template, (str, os.PathLike)):
        raise ValueError(f"chat_template must be a Jinja template or a path to one, got {type(chat_template).__name__}.")
    if files and os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            template = f.read()
    elif isinstance(chat_template, str) and any(c in chat_template for c in "{}\n"):
        template = chat_template
    elif not files:
        raise ValueError(f"chat_template must be a Jinja template; {str(chat_template)[:200]!r} is none, and a row's "
                         "template is not read from a file (give the file to the job: --chat-template)")
    else:
        what = "a directory" if os.path.isdir(chat_template) else "no file"
        raise ValueError(f"chat_template must be a Jinja template or a path to one; {chat_template!r} is {what}.")
    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as exc:
        raise ValueError(f"chat_template is not a valid Jinja template: {exc.message} (line {exc.lineno}).") from None
    return template


def check_free_gpu_memory(device: torch.device, gpu_memory_utilization: float | None) -> int | None:
    """Bytes free on a CUDA ``device`` now (None on CPU), checked to hold the budget of
    ``available_memory`` before the weights load (vLLM's ``request_memory``), so that a GPU another
    LLM already holds fails at once. What this process's allocator caches of released tensors (a
    closed LLM's) is given back first, as vLLM's worker does.

    Raises:
        ValueError: less is free than ``gpu_memory_utilization`` (default
            ``GPU_MEMORY_UTILIZATION``) of the GPU's total memory.
    """
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    utilization = gpu_memory_utilization or GPU_MEMORY_UTILIZATION
    if free < total * utilization:
        raise ValueError(f"gpu_memory_utilization {utilization} asks for {total * utilization / 2**30:.2f} GiB of "
                         f"{device}'s {total / 2**30:.2f} GiB, but only {free / 2**30:.2f} GiB are free (other "
                         "processes or LLMs hold the rest): lower gpu_memory_utilization, e.g. 0.45 for each of two "
                         "LLMs sharing the GPU, or set kv_cache_memory_bytes")
    return free


def available_memory(device: torch.device, gpu_memory_utilization: float | None, free_at_start: int | None) -> int:
    """Bytes the KV cache may take by default on ``device``. On CUDA, vLLM's per-instance budget:
    the share ``gpu_memory_utilization`` (default ``GPU_MEMORY_UTILIZATION``) of the GPU's total
    memory, less what this LLM took since ``free_at_start`` bytes were free
    (``check_free_gpu_memory``, before its weights loaded), whatever other processes hold: two LLMs
    at 0.45 share one GPU (activations and recorded steps come on top, from the rest). On CPU, the
    share ``gpu_memory_utilization`` (default ``CPU_KV_CACHE_RAM_SHARE``) of the available RAM."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total * (gpu_memory_utilization or GPU_MEMORY_UTILIZATION) - (free_at_start - free))
    return int(_available_ram() * (gpu_memory_utilization or CPU_KV_CACHE_RAM_SHARE))


def _available_ram() -> int:
    """MemAvailable (free plus reclaimable page cache) where /proc/meminfo exists, else free pages;
    at most what this process's memory cgroup has left (a container's limit, which /proc/meminfo
    does not show)."""
    ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    left = _cgroup_memory_left()
    return ram if left is None else min(ram, left)


CGROUP_ROOT = "/sys/fs/cgroup"


def _cgroup_memory_left(root: str = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """Bytes this process's memory cgroup and its ancestors may still take (the least of limit minus
    usage among those with a limit), or None where none has one or they cannot be read. cgroup v2
    (``memory.max``, ``memory.current``) or v1 (``memory/memory.limit_in_bytes``,
    ``memory.usage_in_bytes``); the process's path from ``proc_cgroup``, whose root is the mount's
    inside a container's cgroup namespace."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, limit_file, usage_file = root, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_file, usage_file = os.path.join(root, "memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        left = None
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            directory = os.path.join(base, *parts[:depth])
            try:
                with open(os.path.join(directory, limit_file)) as f:
                    text = f.read().strip()
                limit = None if text == "max" else int(text)
                with open(os.path.join(directory, usage_file)) as f:
                    usage = int(f.read())
            except (OSError, ValueError):
                continue
            if limit is not None and limit < 1 << 60:  # v1 writes "no limit" as ~2^63
                left = limit - usage if left is None else min(left, limit - usage)
        if left is not None:
            return max(left, 0)
    return None


def _max_positions(hf_config: PretrainedConfig) -> int:
    """The longest sequence the model takes: ``max_position_embeddings`` (2048 if absent), times the
    factor of a "linear" RoPE scaling, whose checkpoints were tuned at the scaled length (e.g.
    vicuna-13b-v1.5-16k: 4096 x 4), as vLLM's ``_get_and_verify_max_len`` reads it. A RoPE per layer
    type (Gemma 3) gives the length as it is."""
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    if rope_layer_types(hf_config):
        return limit
    _, scaling = rope_parameters(hf_config)
    if scaling["rope_type"] == "linear":
        limit = int(limit * float(scaling.get("factor", 1.0)))
    return limit
