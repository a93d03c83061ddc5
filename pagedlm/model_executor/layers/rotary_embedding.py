"""Rotary position embedding with a precomputed cos/sin table: "default", "linear", "llama3",
"longrope" (Phi-3/Phi-4-mini) and "yarn" (Qwen2.5/Qwen3's long-context setting) scaling, over all of
a head or its first ``partial_rotary_factor``. Each table is transformers' (``modeling_rope_utils``),
computed as it computes it."""

import math

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedlm import ops
from pagedlm.config import reads_field
from pagedlm.model_executor.layers.direct_call import DirectCall
from pagedlm.transformers_utils.rope import rope_dict, rope_layer_types, rope_parameters


def partial_rotary_factor(config: PretrainedConfig, layer_type: str | None = None) -> float:
    """The share of each head that RoPE rotates (Phi-4-mini: 0.75); the rest passes unchanged.
    Of the supported models only transformers' Phi-3 reads it; the others rotate whole heads
    whatever their config says."""
    if not reads_field(config, "partial_rotary_factor"):
        return 1.0
    factor = rope_dict(config, layer_type).get("partial_rotary_factor")
    if factor is None:
        factor = getattr(config, "partial_rotary_factor", None)
    return 1.0 if factor is None else float(factor)  # 0: no dimension rotated (found by a hunt: it was all)


def long_rope_threshold(config: PretrainedConfig) -> int | None:
    """For "longrope" scaling, ``original_max_position_embeddings``: a token takes the long factors
    when its sequence is longer than this (its prompt, or its own position + 1), as transformers
    decides per forward pass; None for other RoPE types.

    Raises:
        ValueError: "longrope" for one layer type of a config with a RoPE per layer type (Gemma 3):
            the layers would have to switch apart.
    """
    for layer_type in rope_layer_types(config):
        if rope_parameters(config, layer_type)[1]["rope_type"] == "longrope":
            raise ValueError(f"rope_type 'longrope' for the {layer_type} layers (a RoPE per layer type) is not "
                             "supported; it is supported for the whole model (rope_parameters.rope_type).")
    _, scaling = rope_parameters(config)
    return int(scaling["original_max_position_embeddings"]) if scaling["rope_type"] == "longrope" else None


def long_rope_recomputes(config: PretrainedConfig) -> bool:
    """Whether transformers recomputes a LongRoPE sequence with the long factors where it outgrows
    the threshold: Phi-3's ``prepare_inputs_for_generation`` drops its cache there; the other
    models keep the keys computed with the short factors."""
    return config.model_type == "phi3"


def _inv_freq(dim: int, theta: float, scaling: dict, long: bool = False) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    rope_type = scaling["rope_type"]
    if rope_type == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (factors * theta**exponents)
    if rope_type == "yarn":
        return _yarn_inv_freq(dim, theta, exponents, scaling)
    inv_freq = 1.0 / (theta**exponents)
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


def _yarn_inv_freq(dim: int, theta: float, exponents: torch.Tensor, scaling: dict) -> torch.Tensor:
    """YaRN (Peng et al. 2023, arXiv:2309.00071) as transformers' ``_compute_yarn_parameters``: the
    frequencies that turn fewer than ``beta_slow`` times over the original context are divided by
    ``factor``, those that turn more than ``beta_fast`` times are kept, with a linear ramp between."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta**exponents
    kept = 1 - ramp  # the share of the unscaled ("extrapolated") frequency
    return 1.0 / (factor * pos_freqs) * (1 - kept) + 1.0 / pos_freqs * kept


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def _attention_factor(config: PretrainedConfig, scaling: dict) -> float:
    """LongRoPE's and YaRN's scale on cos and sin (transformers' ``_compute_longrope_parameters``
    and ``_compute_yarn_parameters``); 1 otherwise."""
    if scaling["rope_type"] not in ("longrope", "yarn"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if scaling["rope_type"] == "yarn":
        factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        return _yarn_mscale(factor)
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or config.max_position_embeddings / original
    return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0


class RotaryEmbedding(DirectCall, nn.Module):
    """The cos|sin table of one RoPE and its application to the first ``rotary_dim`` dimensions of
    each head. With "longrope" the table holds the short factors' rows for positions
    ``[0, max_position)`` and then the long factors' rows: the model runner passes
    ``position + max_position`` for tokens that take the long factors (see ``long_rope_threshold``).
    ``fp32_table``: the table stays float32 whatever the model dtype, and q and k rotate in fp32
    (OLMo 2/3's transformers code keeps its cos and sin so). Ministral 3's ``llama_4_scaling_beta``
    then scales q by its attention temperature, ``1 + beta * log(1 + floor(position /
    original_max_position_embeddings))`` (transformers' ``get_llama_4_attn_scale``), a table of it
    built here too (``q_scales``)."""

    def __init__(
        self, head_size: int, max_position: int, config: PretrainedConfig, layer_type: str | None = None,
        fp32_table: bool = False,
    ) -> None:
        super().__init__()
        self.head_size = head_size
        self.fp32_table = fp32_table
        # transformers' dim: the frequencies' exponents are i / dim for even i < dim, so an odd dim
        # (Phi-3's int(head_size * partial_rotary_factor)) rotates dim + 1 dimensions, as it does.
        dim = int(head_size * partial_rotary_factor(config, layer_type))
        self.frequency_dim, self.rotary_dim = dim, dim + dim % 2
        self.max_position = max_position
        self.theta, self.scaling = rope_parameters(config, layer_type)
        self.attention_factor = _attention_factor(config, self.scaling)
        self.llama_4_beta = self.scaling.get("llama_4_scaling_beta") if config.model_type == "ministral3" else None
        if self.llama_4_beta and not self.scaling.get("original_max_position_embeddings"):
            raise ValueError("the config's rope_parameters set llama_4_scaling_beta, whose temperature steps every "
                             "original_max_position_embeddings positions, without that length: give it (a yarn "
                             "RoPE's, as Ministral 3's) or drop llama_4_scaling_beta")  # found by a hunt: a TypeError
        self.build_cos_sin_cache()

    def build_cos_sin_cache(self, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        """(Re)compute the ``[max_position, rotary_dim]`` cos|sin table (``[2 * max_position, ...]`` for
        "longrope"; see ``ops.rotary_embedding``), e.g. after the model was built on the meta device.
        Computed in float32 and cast to the model dtype, as Hugging Face casts its cos and sin."""
        model_dtype, dtype = dtype, torch.float32 if self.fp32_table else dtype
        factors = (False, True) if self.scaling["rope_type"] == "longrope" else (False,)
        if torch.device(device or torch.get_default_device()).type == "meta":
            # Only its shape until the model is on its device. (A meta arange goes through torch's
            # Python references, which import torch._dynamo and with it triton: slow, and noisy at exit.)
            cache = torch.empty(len(factors) * self.max_position, self.rotary_dim, dtype=dtype, device=device)
            self.register_buffer("cos_sin_cache", cache, persistent=False)
            scales = (torch.empty(len(factors) * self.max_position, dtype=model_dtype, device=device)
                      if self.llama_4_beta else None)
            self.register_buffer("q_scales", scales, persistent=False)
            return
        positions = torch.arange(self.max_position, dtype=torch.float32, device=device)[:, None]
        tables = []
        for long in factors:
            freqs = positions * _inv_freq(self.frequency_dim, self.theta, self.scaling, long).to(device)[None, :]
            tables.append(torch.cat((freqs.cos(), freqs.sin()), dim=-1) * self.attention_factor)
        self.register_buffer("cos_sin_cache", torch.cat(tables).to(dtype), persistent=False)
        scales = None
        if self.llama_4_beta:  # transformers' arithmetic, position by position, rounded to the model dtype
            original = self.scaling["original_max_position_embeddings"]
            steps = torch.floor(torch.arange(self.max_position, device=device)[None] / original)
            scales = (1 + self.llama_4_beta * torch.log(1 + steps))[0].to(model_dtype)
            scales = torch.cat([scales] * len(factors))  # a long-factor token's position is offset by max_position
        self.register_buffer("q_scales", scales, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """Rotate the first ``rotary_dim`` dimensions of ``q`` [T, H, D] and ``k`` [T, Hkv, D] at
        ``positions`` [T] (int64 rows of the table), in place; then, with a ``q_scales`` table,
        all of q times its position's attention temperature."""
        rotated_q, rotated_k = q, k
        if self.rotary_dim < self.head_size:
            rotated_q, rotated_k = q[..., : self.rotary_dim], k[..., : self.rotary_dim]
        ops.rotary_embedding(positions, rotated_q, rotated_k, self.cos_sin_cache)
        if self.q_scales is not None:
            ops.position_scale(q, positions, self.q_scales)
