"""Rotary position embedding with a precomputed cos/sin table (Llama "default", "linear", "llama3")."""

import math

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedlm import ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: PretrainedConfig, layer_type: str | None = None) -> tuple[float, dict]:
    """(rope_theta, scaling dict) from a transformers 5 ``rope_parameters`` or a 4.x config. Configs
    with a RoPE per layer type (Gemma 3: ``{"sliding_attention": {...}, "full_attention": {...}}``)
    give the ``layer_type``'s."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    theta = params.pop("rope_theta", None) or getattr(config, "rope_theta", None) or 10000.0
    scaling = params or dict(getattr(config, "rope_scaling", None) or {})
    scaling.pop("partial_rotary_factor", None)  # a model that supports it reads it from its config
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    if scaling["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling type {scaling['rope_type']!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}.")
    return float(theta), scaling


def _inv_freq(head_size: int, theta: float, scaling: dict) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size))
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(
        self, head_size: int, max_position: int, config: PretrainedConfig, layer_type: str | None = None
    ) -> None:
        super().__init__()
        self.head_size = head_size
        self.max_position = max_position
        self.theta, self.scaling = rope_parameters(config, layer_type)
        self.build_cos_sin_cache()

    def build_cos_sin_cache(self, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        """(Re)compute the ``[max_position, head_size]`` cos|sin table (see ``ops.rotary_embedding``),
        e.g. after the model was built on the meta device. Computed in float32 and cast to the
        model dtype, as Hugging Face casts its cos and sin."""
        inv_freq = _inv_freq(self.head_size, self.theta, self.scaling).to(device)
        freqs = torch.arange(self.max_position, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """Rotate ``q`` [T, H, D] and ``k`` [T, Hkv, D] at ``positions`` [T], in place."""
        ops.rotary_embedding(positions, q, k, self.cos_sin_cache)
