"""The Llama family (Llama, Mistral, Qwen2, Qwen3, Granite, Phi-3, SmolLM3) on the paged KV cache;
sliding-window layers where the config has them.

Weights are packed at load time: q/k/v into one ``qkv_proj`` and gate/up into one
``gate_up_proj``, so each layer runs two matmuls where Hugging Face runs five.
"""

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedlm import ops
from pagedlm.config import get_head_size, get_num_kv_heads, get_sliding_window, read_field
from pagedlm.model_executor.layers.activation import GeluAndMul, SiluAndMul
from pagedlm.model_executor.layers.attention import Attention, AttentionMetadata
from pagedlm.model_executor.layers.direct_call import DirectCall
from pagedlm.model_executor.layers.embedding import Embedding
from pagedlm.model_executor.layers.layernorm import RMSNorm
from pagedlm.model_executor.layers.linear import GateUpLinear, Linear
from pagedlm.model_executor.layers.rotary_embedding import RotaryEmbedding


class LlamaAttention(DirectCall, nn.Module):
    """q/k/v from one packed projection, RoPE, paged attention, o_proj. Options beyond Llama: no RoPE
    (``rotary_emb=None``: SmolLM3's NoPE layers), a qkv bias (Qwen2), a per-head norm of q and k
    before RoPE (Qwen3: ``RMSNorm``; Gemma 3: ``GemmaRMSNorm``), the softmax ``scale`` (default
    ``head_size ** -0.5``), a logit soft-cap (Gemma 2); the layer's sliding window comes from the
    config."""

    def __init__(
        self,
        config: PretrainedConfig,
        layer_idx: int,
        rotary_emb: RotaryEmbedding | None,
        qkv_bias: bool = False,
        qk_norm: type[RMSNorm] | None = None,
        scale: float | None = None,
        logits_soft_cap: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = get_num_kv_heads(config)
        self.head_size = get_head_size(config)
        self.q_size = self.num_heads * self.head_size
        self.kv_size = self.num_kv_heads * self.head_size
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=read_field(config, "attention_bias", False))
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_size, self.head_size**-0.5 if scale is None else scale,
            get_sliding_window(config, layer_idx), logits_soft_cap,
        )
        self.q_norm = qk_norm(self.head_size, config.rms_norm_eps) if qk_norm else None
        self.k_norm = qk_norm(self.head_size, config.rms_norm_eps) if qk_norm else None

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        # Heads of the fused projection as views: q, then k, then v.
        qkv = self.qkv_proj(x).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_size)
        q = qkv[:, : self.num_heads]
        k = qkv[:, self.num_heads : self.num_heads + self.num_kv_heads]
        v = qkv[:, self.num_heads + self.num_kv_heads :]
        if self.q_norm is not None:  # per head, read from the fused projection, into new tensors
            q = self.q_norm(q)
            k = self.k_norm(k)
        if self.rotary_emb is not None:
            self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, kv_cache, meta)
        return self.o_proj(out.view(-1, self.q_size))


class LlamaMLP(DirectCall, nn.Module):
    """down_proj(act(gate) * up) with gate and up in one packed projection that applies act
    (``GateUpLinear``); act is SiLU, or GELU's tanh approximation for Gemma (``act_fn=GeluAndMul()``)."""

    def __init__(self, config: PretrainedConfig, act_fn: SiluAndMul | GeluAndMul | None = None) -> None:
        super().__init__()
        if act_fn is None and getattr(config, "hidden_act", "silu") not in ("silu", "swish"):  # transformers' two SiLUs
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported for this architecture; supported: "
                             "'silu' ('swish').")
        bias = read_field(config, "mlp_bias", False)
        self.gate_up_proj = GateUpLinear(config.hidden_size, config.intermediate_size, bias, act_fn or SiluAndMul())
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))


class LlamaDecoderLayer(DirectCall, nn.Module):
    """Pre-norm attention and MLP blocks; Gemma (1) runs it with ``GemmaRMSNorm`` and GeGLU."""

    def __init__(
        self,
        config: PretrainedConfig,
        layer_idx: int,
        rotary_emb: RotaryEmbedding | None,
        qkv_bias: bool,
        qk_norm: bool,
        norm_class: type[RMSNorm] = RMSNorm,
        act_fn: SiluAndMul | GeluAndMul | None = None,
    ) -> None:
        super().__init__()
        # Granite sets the softmax scale itself (attention_multiplier).
        scale = read_field(config, "attention_multiplier", None)
        self.self_attn = LlamaAttention(config, layer_idx, rotary_emb, qkv_bias, norm_class if qk_norm else None, scale)
        self.mlp = LlamaMLP(config, act_fn)
        self.input_layernorm = norm_class(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = norm_class(config.hidden_size, config.rms_norm_eps)
        # Granite scales what each block adds to the residual stream.
        self.residual_multiplier = read_field(config, "residual_multiplier", 1.0)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta)
        if self.residual_multiplier != 1.0:
            ops.scale(x, self.residual_multiplier)
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp(x)
        if self.residual_multiplier != 1.0:
            ops.scale(x, self.residual_multiplier)
        return x, residual


class LlamaForCausalLM(DirectCall, nn.Module):
    # Checkpoint names that load into a shard of a packed parameter: name -> (packed name, shard).
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    qkv_bias: bool | None = None  # None: the config's attention_bias
    qk_norm = False
    norm_class: type[RMSNorm] = RMSNorm
    act_class: type[GeluAndMul] | None = None  # the MLP's; None: the config's hidden_act (SiLU only)

    def __init__(self, config: PretrainedConfig, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.make_layers(config, max_position))
        self.norm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.embed_tokens.weight
        # Granite: embeddings scaled up, logits scaled down.
        self.embedding_multiplier = read_field(config, "embedding_multiplier", 1.0)
        self.logits_scaling = read_field(config, "logits_scaling", 1.0)

    def make_layers(self, config: PretrainedConfig, max_position: int) -> list[nn.Module]:
        rotary_emb = RotaryEmbedding(get_head_size(config), max_position, config)
        qkv_bias = read_field(config, "attention_bias", False) if self.qkv_bias is None else self.qkv_bias
        return [
            LlamaDecoderLayer(config, i, rotary_emb if self.uses_rope(config, i) else None, qkv_bias, self.qk_norm,
                              self.norm_class, self.act_class() if self.act_class else None)
            for i in range(config.num_hidden_layers)
        ]

    def uses_rope(self, config: PretrainedConfig, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` rotates q and k (SmolLM3 skips RoPE on some layers)."""
        return True

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.embedding_multiplier != 1.0:
            ops.scale(x, self.embedding_multiplier)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm."""
        x = self.embed(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden_states)
        if self.logits_scaling != 1.0:
            ops.scale(logits, self.logits_scaling, divide=True)
        return logits

    def greedy_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Each row's argmax over ``compute_logits(hidden_states)`` (int64 ``[rows]``) without the
        logits, where the LM head's kernel gives it (``Linear.argmax``) and the logits are the LM
        head's outputs as they are (a scaling or soft-cap could round two of them equal); else None.
        A subclass whose ``compute_logits`` changes the logits gets None unless it says otherwise."""
        def owner(name: str) -> type:  # the class whose method `name` this model runs
            return next(c for c in type(self).__mro__ if name in vars(c))

        # The class that wrote compute_logits must have written greedy_tokens beside it.
        plain = owner("compute_logits") is owner("greedy_tokens") and self.logits_scaling == 1.0
        return self.lm_head.argmax(hidden_states) if plain else None


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True  # and none on o_proj


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: Llama with per-head RMSNorm on q and k before RoPE, an explicit ``head_dim`` and
    ``attention_bias`` (off in released checkpoints)."""

    qk_norm = True


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 / Phi-4-mini: Llama whose checkpoint already holds qkv_proj and gate_up_proj fused (in our
    order), with LongRoPE (the 128k variants) and partial rotary (Phi-4-mini) from its config."""

    packed_modules_mapping: dict = {}


class SmolLM3ForCausalLM(LlamaForCausalLM):
    """SmolLM3: Llama whose layers with ``no_rope_layers[i] == 0`` (every fourth in the released
    checkpoints) attend without RoPE ("NoPE"); its "sliding_attention" layers (``layer_types``) are
    windowed (``get_sliding_window``)."""

    def uses_rope(self, config: PretrainedConfig, layer_idx: int) -> bool:
        if len(config.no_rope_layers) != config.num_hidden_layers:  # found by a hunt: an IndexError
            raise ValueError(f"the config's no_rope_layers holds {len(config.no_rope_layers)} entries for "
                             f"{config.num_hidden_layers} layers (num_hidden_layers): one a layer")
        return bool(config.no_rope_layers[layer_idx])


class Ministral3ForCausalLM(LlamaForCausalLM):
    """Ministral 3: Mistral with YaRN and Llama 4's attention temperature on q from
    ``original_max_position_embeddings`` on (``RotaryEmbedding``'s ``q_scales``)."""


# Checkpoint name prefixes of a multimodal checkpoint -> ours (None: not loaded): its language
# model, for text prompts, in transformers 4's and 5's layouts.
LANGUAGE_MODEL_PREFIXES = {
    "language_model.model.": "",
    "language_model.lm_head.": "lm_head.",
    "model.language_model.": "",
    "vision_tower.": None,
    "model.vision_tower.": None,
    "multi_modal_projector.": None,
    "model.multi_modal_projector.": None,
}


class Mistral3ForConditionalGeneration(Ministral3ForCausalLM):
    """The language model of a Mistral 3 checkpoint (Mistral Small 3.1/3.2, Ministral 3), a
    Mistral or Ministral 3 text config, for text prompts; the vision tower and projector are not
    loaded (images are not supported)."""

    checkpoint_prefixes = LANGUAGE_MODEL_PREFIXES
    text_model_types = ("mistral", "ministral3")


MistralForCausalLM = LlamaForCausalLM
GraniteForCausalLM = LlamaForCausalLM  # Llama with the multipliers its config sets
