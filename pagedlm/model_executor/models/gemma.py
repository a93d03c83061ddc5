"""Gemma, Gemma 2 and Gemma 3 (text) on the paged KV cache.

What Gemma changes in Llama (transformers' ``modeling_gemma.py``): embeddings scaled by
``sqrt(hidden_size)`` (rounded to the model dtype), RMSNorm as ``x * (1 + w)``, GeGLU with GELU's tanh
approximation, tied embeddings. Gemma 2 and 3 (``modeling_gemma2.py`` / ``modeling_gemma3.py``) add
two norms per layer (the attention and MLP outputs are normalised before the residual add), the
softmax scale ``query_pre_attn_scalar ** -0.5``, and sliding-window and global layers
(``config.layer_types``). Gemma 2 soft-caps the attention logits and the final logits; Gemma 3
instead normalises q and k per head and has a RoPE base per layer type. Multimodal Gemma 3
checkpoints run their language model on text prompts.
"""

import functools

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedlm import ops
from pagedlm.config import get_head_size, read_field
from pagedlm.model_executor.layers.activation import GeluAndMul
from pagedlm.model_executor.layers.attention import AttentionMetadata
from pagedlm.model_executor.layers.direct_call import DirectCall
from pagedlm.model_executor.layers.layernorm import GemmaRMSNorm
from pagedlm.model_executor.layers.rotary_embedding import RotaryEmbedding
from pagedlm.model_executor.models.llama import LANGUAGE_MODEL_PREFIXES, LlamaAttention, LlamaForCausalLM, LlamaMLP

_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


@functools.cache
def _rounded(value: float, dtype: torch.dtype) -> float:
    return torch.tensor(value, dtype=dtype).item()


class Gemma2DecoderLayer(DirectCall, nn.Module):
    def __init__(
        self, config: PretrainedConfig, layer_idx: int, rotary_emb: RotaryEmbedding, qk_norm: bool, logits_soft_cap: float
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(
            config, layer_idx, rotary_emb,
            qkv_bias=read_field(config, "attention_bias", False),
            qk_norm=GemmaRMSNorm if qk_norm else None,
            scale=config.query_pre_attn_scalar**-0.5,
            logits_soft_cap=logits_soft_cap,
        )
        self.mlp = LlamaMLP(config, GeluAndMul())
        eps = config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` is what the previous layer adds to ``residual`` (already normalised by its
        post-feedforward norm); returns the same pair for the next layer."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, kv_cache, meta))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma (1): Llama's layers with Gemma's norms, GeGLU and scaled embeddings."""

    norm_class = GemmaRMSNorm
    act_class = GeluAndMul
    activation_field = "hidden_act"  # where transformers' MLP reads it (Gemma's config reads "gelu" as tanh GELU)

    def __init__(self, config: PretrainedConfig, max_position: int) -> None:
        activation = getattr(config, self.activation_field, None) or getattr(config, "hidden_act", None)
        if activation not in _GELU_TANH:
            raise ValueError(f"Gemma's {self.activation_field} {activation!r} is not supported; "
                             f"supported: {_GELU_TANH}.")
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma checkpoints with use_bidirectional_attention=True (embedding models) are not supported.")
        super().__init__(config, max_position)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # transformers rounds the scale to the model dtype before multiplying.
        ops.scale(x, _rounded(self.config.hidden_size**0.5, x.dtype))
        return x


class Gemma2ForCausalLM(GemmaForCausalLM):
    attn_soft_cap = True  # the config's attn_logit_softcapping
    activation_field = "hidden_activation"

    def __init__(self, config: PretrainedConfig, max_position: int) -> None:
        super().__init__(config, max_position)
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)

    def make_layers(self, config: PretrainedConfig, max_position: int) -> list[nn.Module]:
        head_size = get_head_size(config)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        rotary = {t: RotaryEmbedding(head_size, max_position, config, t) for t in sorted(set(layer_types))}
        soft_cap = (getattr(config, "attn_logit_softcapping", None) or 0.0) if self.attn_soft_cap else 0.0
        return [Gemma2DecoderLayer(config, i, rotary[layer_types[i]], self.qk_norm, soft_cap)
                for i in range(config.num_hidden_layers)]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states)
        if self.final_logit_softcapping:
            ops.soft_cap(logits, self.final_logit_softcapping)
        return logits

    def greedy_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return None if self.final_logit_softcapping else super().greedy_tokens(hidden_states)


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3's text model: Gemma 2's layout with q/k norms and a RoPE base per layer type; the
    final-logit soft-cap applies when set, the attention one never (as in transformers)."""

    qk_norm = True
    attn_soft_cap = False  # transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies it


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The language model of a multimodal Gemma 3 checkpoint (4B and up), for text prompts; the
    vision tower and projector weights are not loaded (images are not supported)."""

    checkpoint_prefixes = LANGUAGE_MODEL_PREFIXES
    text_model_types = ("gemma3_text",)
