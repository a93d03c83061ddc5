"""Build a native model and load its weights straight from safetensors (no transformers model)."""

import glob
import json
import logging
import os
import re

import torch
from safetensors import safe_open
from torch import nn

from pagedlm.config import ModelConfig, check_model_sizes
from pagedlm.model_executor.layers.linear import Linear
from pagedlm.model_executor.layers.rotary_embedding import RotaryEmbedding
from pagedlm.model_executor.models import get_model_class
from pagedlm.ops import kv_cache_scale_is_valid

logger = logging.getLogger("pagedlm")


def get_model(model_config: ModelConfig, kv_cache_scales: bool = False) -> nn.Module:
    """The model of ``model_config`` with the checkpoint's weights; its fp8 KV-cache scales only where
    ``kv_cache_scales`` (an fp8 cache), else left unread (vLLM's: a cache in the model's dtype holds
    the values themselves, whatever scales the checkpoint has).

    Raises:
        ValueError: a config or checkpoint the model cannot take (named).
    """
    model_cls = get_model_class(model_config.hf_config)
    check_model_sizes(model_config.hf_config)  # once the architecture is known (another's config has other fields)
    with torch.device("meta"):
        model = model_cls(model_config.hf_config, model_config.max_model_len)
    model = model.to(dtype=model_config.dtype).to_empty(device=model_config.device)
    if getattr(model_config.hf_config, "tie_word_embeddings", False):
        model.lm_head.weight = model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_cos_sin_cache(model_config.device, model_config.dtype)
    load_weights(model, model_config.model, kv_cache_scales)
    for module in model.modules():
        if isinstance(module, Linear):
            module.process_weights_after_loading(model_config.batch_invariant)
    return model.eval()


def _checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files that hold the model (vLLM's rule): those ``model.safetensors.index.json``
    names where there is one (Mistral's repos also ship ``consolidated.safetensors``, the same
    weights under other names), else every ``*.safetensors``."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f).get("weight_map", {}).values()))
        files = [os.path.join(model_dir, name) for name in names]
        missing = [name for name, path in zip(names, files) if not os.path.isfile(path)]
        if not files or missing:
            raise ValueError(f"{index} names {'no files' if not files else f'files that are missing: {missing[:4]}'}.")
        return files
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"No *.safetensors files in {model_dir!r}; pagedlm loads safetensors checkpoints.")
    return files


def load_weights(model: nn.Module, model_dir: str, kv_cache_scales: bool = False) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    saved_head = None  # a tied model's lm_head.weight, when the checkpoint holds one
    packed = getattr(model, "packed_modules_mapping", {})
    prefixes = getattr(model, "checkpoint_prefixes", {})
    scales: dict[str, set[str]] = {}  # the KV-cache scales each attention module's checkpoint gave
    num_layers = 1 + max((int(m[1]) for p in params if (m := _LAYER.match(p))), default=-1)
    skipped = set()  # the checkpoint's layers past the model's (hf_overrides num_hidden_layers)
    unused_scales = set()  # the kinds of scale tensors not read: "KV-cache" (without kv_cache_scales), "attention"
    for path in _checkpoint_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for ckpt_name in f.keys():
                name = _our_name(ckpt_name, prefixes)
                if name is None:
                    continue
                if (layer := _LAYER.match(name)) and int(layer[1]) >= num_layers:
                    skipped.add(int(layer[1]))  # transformers skips them too (found by a hunt: refused)
                    continue
                if _ATTENTION_SCALE.fullmatch(name):
                    unused_scales.add("attention")
                    continue
                if scale := _KV_CACHE_SCALE.fullmatch(name):
                    if not kv_cache_scales:
                        unused_scales.add("KV-cache")
                        continue
                    _load_kv_cache_scale(model, scale, f.get_tensor(ckpt_name), ckpt_name)
                    scales.setdefault(scale[1], set()).update(_scaled(scale))
                    continue
                shard = None
                for src, (dst, shard_id) in packed.items():
                    if f".{src}." in name:
                        name, shard = name.replace(f".{src}.", f".{dst}."), shard_id
                        break
                if name not in params:
                    if name == "lm_head.weight" and "embed_tokens.weight" in params:
                        saved_head = f.get_tensor(ckpt_name)
                        continue
                    raise ValueError(f"Unexpected weight {ckpt_name!r} in {path}: {type(model).__name__}, the model "
                                     "of the config's architectures, has no such parameter (does it name the "
                                     "checkpoint's architecture?).")
                target = _shard_view(model, name, params[name], shard)
                tensor = f.get_tensor(ckpt_name)
                if tensor.shape != target.shape:
                    raise ValueError(f"Weight {ckpt_name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}.")
                with torch.no_grad():
                    target.copy_(tensor)
                loaded.add(name if shard is None else f"{name}:{shard}")
    if skipped:
        logger.warning("The checkpoint's layers %d-%d are not loaded: the model has %d (num_hidden_layers).",
                       min(skipped), max(skipped), num_layers)
    if "KV-cache" in unused_scales:
        logger.info("The checkpoint has fp8 KV-cache scales; kv_cache_dtype='auto' keeps the model's dtype and does not "
                    "use them (kv_cache_dtype='fp8' does).")
    if "attention" in unused_scales:
        logger.info("The checkpoint has fp8 attention scales (q_scale, prob_scale), for attention that quantizes its "
                    "queries and probabilities; pagedlm's keeps them unquantized and does not use them.")
    _share_kv_cache_scales(model, scales)
    expected = _expected_weights(params, packed, model)
    if saved_head is not None and "embed_tokens.weight" in expected - loaded:
        # A tied checkpoint that saved the head alone: it is the embeddings too (as transformers ties it).
        _load_tied(params["embed_tokens.weight"], saved_head)
        loaded.add("embed_tokens.weight")
        saved_head = None
    missing = sorted(_checkpoint_name(name, packed) for name in expected - loaded)
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"Checkpoint {model_dir!r} lacks {len(missing)} weight(s) the model needs: "
                         f"{', '.join(missing[:8])}{more} (named without the checkpoint's 'model.' prefix).")
    if saved_head is not None:
        _untie_a_different_head(model, saved_head)


def _check_head_shape(saved_head: torch.Tensor, embedding: torch.Tensor) -> None:
    if saved_head.shape != embedding.shape:
        raise ValueError(f"Weight 'lm_head.weight' has shape {tuple(saved_head.shape)}, expected {tuple(embedding.shape)}.")


def _load_tied(embedding: torch.Tensor, saved_head: torch.Tensor) -> None:
    _check_head_shape(saved_head, embedding)
    with torch.no_grad():
        embedding.copy_(saved_head)


def _untie_a_different_head(model: nn.Module, saved_head: torch.Tensor) -> None:
    """A checkpoint that ties its head yet saves one that differs from the embeddings runs with the
    saved head, as transformers does ("will NOT tie them"); an equal one stays tied."""
    embedding = model.embed_tokens.weight
    _check_head_shape(saved_head, embedding)
    saved_head = saved_head.to(embedding)
    if not torch.equal(saved_head, embedding):
        model.lm_head.weight = nn.Parameter(saved_head, requires_grad=False)


_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.")  # a decoder layer's parameter, by our name

# An fp8 KV cache's per-tensor scales, as vLLM reads them (its QuantizationConfig's
# get_cache_scale_mapper): llm-compressor's "self_attn.k_scale", ModelOpt's
# "self_attn.k_proj.k_scale", a fused projection's "self_attn.qkv_proj.k_scale", the older
# "self_attn.k_proj.output_scale" and "self_attn.kv_scale" (both), and "self_attn.k_cache.scale";
# group 1 is the attention module, the others what it scales.
_KV_CACHE_SCALE = re.compile(r"(.+?)\.(?:([kv])_scale|([kv])_proj\.output_scale|[kv]_proj\.([kv])_scale"
                             r"|(kv)_scale|qkv_proj\.([kv])_scale|([kv])_cache\.scale)")
# fp8 attention's own scales, for attention that quantizes its queries or probabilities: vLLM maps
# "q_scale" and "q_proj.output_scale" to attn.q_scale, "prob_output_scale" to attn.prob_scale.
_ATTENTION_SCALE = re.compile(r".+?\.(?:q_scale|q_proj\.output_scale|prob_output_scale|prob_scale)")


def _scaled(match: re.Match) -> str:
    """What a ``_KV_CACHE_SCALE`` match scales: "k", "v" or "kv"."""
    return next(kind for kind in match.groups()[1:] if kind)


def _share_kv_cache_scales(model: nn.Module, loaded: dict[str, set[str]]) -> None:
    """A layer whose checkpoint gave one of its two scales takes it for both (vLLM's
    ``BaseKVCacheMethod``; found by a hunt: the other stayed 1.0)."""
    for module, kinds in loaded.items():
        if len(kinds) == 1:
            attention = model.get_submodule(f"{module}.attn")
            attention.k_scale = attention.v_scale = getattr(attention, f"{next(iter(kinds))}_scale")


def _load_kv_cache_scale(model: nn.Module, match: re.Match, tensor: torch.Tensor, ckpt_name: str) -> None:
    if tensor.numel() != 1:
        raise ValueError(f"Checkpoint tensor {ckpt_name!r} holds {tensor.numel()} KV-cache scales; pagedlm takes one "
                         "per layer's keys and values (per-head scales are not supported).")
    try:
        attention = model.get_submodule(f"{match[1]}.attn")
    except AttributeError:
        raise ValueError(f"Unexpected weight {ckpt_name!r}: the model has no attention layer {match[1]!r}.") from None
    scale = float(tensor)
    if not kv_cache_scale_is_valid(scale):
        raise ValueError(f"Checkpoint tensor {ckpt_name!r} is a KV-cache scale of {scale}; a scale must be positive "
                         "and finite in float32, with a finite reciprocal.")
    for kind in _scaled(match):
        setattr(attention, f"{kind}_scale", scale)


def _our_name(ckpt_name: str, prefixes: dict[str, str | None]) -> str | None:
    """The parameter a checkpoint tensor loads into (before packing), or None for one not loaded:
    the model's ``checkpoint_prefixes`` (first match) then transformers' "model." prefix."""
    if "rotary_emb.inv_freq" in ckpt_name:
        return None
    for prefix, ours in prefixes.items():
        if ckpt_name.startswith(prefix):
            return None if ours is None else ours + ckpt_name.removeprefix(prefix)
    return ckpt_name.removeprefix("model.")


def _shard_view(model: nn.Module, name: str, param: torch.Tensor, shard: str | int | None) -> torch.Tensor:
    if shard is None:
        return param
    if shard in ("q", "k", "v"):
        attn = model.get_submodule(name.rsplit(".", 2)[0])
        sizes = {"q": (0, attn.q_size), "k": (attn.q_size, attn.kv_size), "v": (attn.q_size + attn.kv_size, attn.kv_size)}
        start, size = sizes[shard]
        return param.narrow(0, start, size)
    half = param.shape[0] // 2
    return param.narrow(0, shard * half, half)


def _checkpoint_name(name: str, packed: dict) -> str:
    """A parameter's name in ``_expected_weights`` ("layers.1.self_attn.qkv_proj.weight:k") as
    the checkpoint tensor that fills it ("layers.1.self_attn.k_proj.weight")."""
    name, _, shard = name.partition(":")
    for src, (dst, shard_id) in packed.items():
        if shard and str(shard_id) == shard and f".{dst}." in name:
            return name.replace(f".{dst}.", f".{src}.")
    return name


def _expected_weights(params: dict[str, torch.Tensor], packed: dict, model: nn.Module) -> set[str]:
    expected = set()
    for name in params:
        shards = [s for dst, s in packed.values() if f".{dst}." in name]
        if shards:
            expected.update(f"{name}:{s}" for s in shards)
        else:
            expected.add(name)
    if getattr(model.config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    return expected
