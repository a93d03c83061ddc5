"""What a checkpoint's ``generation_config.json`` says: its EOS ids and its sampling defaults."""

import json
import os
from typing import Any

from transformers import GenerationConfig, PretrainedConfig

# generation_config.json key -> SamplingParams field: the defaults vLLM takes from a model.
_SAMPLING_DEFAULTS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "max_new_tokens": "max_tokens",
}


def eos_token_ids(config_dir: str, hf_config: PretrainedConfig, tokenizer_eos: int | None) -> set[int]:
    """EOS ids from ``config_dir``'s generation_config.json (without one, the model's config.json)
    and the tokenizer's."""
    try:
        eos = GenerationConfig.from_pretrained(config_dir).eos_token_id
    except OSError:
        eos = getattr(hf_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    return ids


def sampling_defaults(config_dir: str) -> dict[str, int | float]:
    """The ``SamplingParams`` fields that ``config_dir/generation_config.json`` sets (vLLM's
    ``get_diff_sampling_param``): temperature, top_k, top_p, min_p, repetition_penalty,
    presence_penalty, frequency_penalty, and ``max_new_tokens`` as ``max_tokens``; ``"do_sample":
    false`` makes it greedy (temperature 0), as in Hugging Face's ``generate`` (vLLM ignores it). Keys the file leaves out are not defaults; no file, none."""
    path = os.path.join(config_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); pass generation_config='vllm' to ignore it.") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}; "
                         "pass generation_config='vllm' to ignore it.")
    defaults = {field: config[key] for key, field in _SAMPLING_DEFAULTS.items() if config.get(key) is not None}
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


def check_generation_overrides(overrides: dict[str, Any] | None) -> None:
    """Raises: ValueError: not a dict, or a key ``sampling_defaults`` does not read (named)."""
    if overrides is None:
        return
    if not isinstance(overrides, dict):
        raise ValueError(f"override_generation_config must be a dict, got {type(overrides).__name__}.")
    unknown = sorted(map(repr, set(overrides) - set(_SAMPLING_DEFAULTS)))
    if unknown:
        raise ValueError(f"override_generation_config: unknown key(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(_SAMPLING_DEFAULTS)}.")


def generation_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """vLLM's ``override_generation_config`` as ``SamplingParams`` fields (a None value stays: it
    unsets the model's default)."""
    return {_SAMPLING_DEFAULTS[key]: value for key, value in (overrides or {}).items()}
