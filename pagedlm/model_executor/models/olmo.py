"""OLMo 2 and OLMo 3 on the paged KV cache.

What differs from Llama (transformers' ``modeling_olmo2.py`` / ``modeling_olmo3.py``): the layers
normalise what attention and the MLP add to the residual stream ("post-norm": ``h = h +
norm(attn(h))``, no norm on their inputs), q and k are normalised over all their heads at once
before RoPE, the norms multiply by their weight in fp32 before rounding (``OlmoRMSNorm``), and
RoPE rotates in fp32 with fp32 cos and sin (rounded once).
OLMo 3 adds sliding-window layers and a RoPE per layer type (``config.layer_types``).
"""

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedlm.config import get_head_size, read_field
from pagedlm.model_executor.layers.attention import AttentionMetadata
from pagedlm.model_executor.layers.direct_call import DirectCall
from pagedlm.model_executor.layers.layernorm import OlmoRMSNorm
from pagedlm.model_executor.layers.rotary_embedding import RotaryEmbedding
from pagedlm.model_executor.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class Olmo2Attention(LlamaAttention):
    """Llama's attention with q and k each normalised over all their heads (a norm of ``q_size`` and
    one of ``kv_size`` elements) before RoPE."""

    def __init__(self, config: PretrainedConfig, layer_idx: int, rotary_emb: RotaryEmbedding, qkv_bias: bool) -> None:
        super().__init__(config, layer_idx, rotary_emb, qkv_bias)
        self.q_norm = OlmoRMSNorm(self.q_size, config.rms_norm_eps)
        self.k_norm = OlmoRMSNorm(self.kv_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q = self.q_norm(qkv[:, : self.q_size]).view(-1, self.num_heads, self.head_size)
        k = self.k_norm(qkv[:, self.q_size : self.q_size + self.kv_size]).view(-1, self.num_kv_heads, self.head_size)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_size)
        self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, kv_cache, meta)
        return self.o_proj(out.view(-1, self.q_size))


class Olmo2DecoderLayer(DirectCall, nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int, rotary_emb: RotaryEmbedding, qkv_bias: bool) -> None:
        super().__init__()
        self.self_attn = Olmo2Attention(config, layer_idx, rotary_emb, qkv_bias)
        self.mlp = LlamaMLP(config)
        self.post_attention_layernorm = OlmoRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = OlmoRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, h: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> None:
        """Advance the residual stream ``h`` [num_tokens, hidden] through the layer, in place."""
        self.post_attention_layernorm(self.self_attn(positions, h, kv_cache, meta), h)
        self.post_feedforward_layernorm(self.mlp(h), h)


class Olmo2ForCausalLM(LlamaForCausalLM):
    norm_class = OlmoRMSNorm

    def make_layers(self, config: PretrainedConfig, max_position: int) -> list[nn.Module]:
        head_size = get_head_size(config)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        rotary = {t: RotaryEmbedding(head_size, max_position, config, t, fp32_table=True)
                  for t in sorted(set(layer_types))}
        qkv_bias = read_field(config, "attention_bias", False)
        return [Olmo2DecoderLayer(config, i, rotary[layer_types[i]], qkv_bias) for i in range(config.num_hidden_layers)]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm."""
        h = self.embed(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches):
            layer(positions, h, kv_cache, meta)
        return self.norm(h)


class Olmo3ForCausalLM(Olmo2ForCausalLM):
    """OLMo 3: OLMo 2 with sliding-window layers and a RoPE per layer type, from its config."""
