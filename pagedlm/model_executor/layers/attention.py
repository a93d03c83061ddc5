"""Attention over the paged KV cache: writes the step's keys and values, then attends.

A step's tokens are laid out prefill sequences first (several query tokens each, through
``paged_prefill_attention``), then decode sequences (one query token each, through
``paged_attention``).
"""

from dataclasses import dataclass

import torch
from torch import nn

from pagedlm import ops
from pagedlm.model_executor.layers.direct_call import DirectCall

# vLLM's calculate_kv_scales constants: a calibration pass's largest |key| becomes entry 200, its
# largest |value| entry 100 (headroom below e4m3's 448 for later, larger ones).
K_SCALE_CONSTANT = 200.0
V_SCALE_CONSTANT = 100.0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    num_prefill_tokens: int
    # Prefill sequences: their query rows, cached lengths and block tables.
    prefill_cu_seqlens_q: torch.Tensor  # [num_prefills + 1] int32
    prefill_seq_lens: torch.Tensor  # [num_prefills] int32
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int32
    # Decode sequences, one query token each, after the prefill tokens.
    decode_seq_lens: torch.Tensor  # [num_decodes] int32
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32


class Attention(DirectCall, nn.Module):
    """One layer's attention: softmax ``scale``, a ``sliding_window`` in tokens (0: full causal) and a
    ``logits_soft_cap`` (0: none); see ``pagedlm.ops`` for their exact meaning. ``k_scale`` and
    ``v_scale`` are the per-tensor scales of an fp8 KV cache (an entry times its scale is the value;
    vLLM's convention): 1.0 unless the checkpoint gives them."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        scale: float,
        sliding_window: int = 0,
        logits_soft_cap: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.calculate_kv_scales = False  # set for one calibration pass: see _calculate_kv_scales

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        key_cache, value_cache = kv_cache
        if self.calculate_kv_scales:
            self._calculate_kv_scales(k, v)
        ops.reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        out = torch.empty_like(q)
        n = meta.num_prefill_tokens
        if n:
            ops.paged_prefill_attention(
                out[:n], q[:n], key_cache, value_cache, meta.prefill_block_tables,
                meta.prefill_cu_seqlens_q, meta.prefill_seq_lens, self.scale, self.sliding_window, self.logits_soft_cap,
                self.k_scale, self.v_scale,
            )
        if n < q.shape[0]:
            ops.paged_attention(
                out[n:] if n else out, q[n:] if n else q, key_cache, value_cache, meta.decode_block_tables,
                meta.decode_seq_lens, self.scale, self.sliding_window, self.logits_soft_cap, self.k_scale, self.v_scale,
            )
        return out

    def _calculate_kv_scales(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """vLLM's ``calculate_kv_scales``: ``k_scale = max|k| / 200``, ``v_scale = max|v| / 100`` over
        this pass's tokens (1.0 kept where that is no usable scale, e.g. all zeros), fixed from then on."""
        for name, x, constant in (("k_scale", k, K_SCALE_CONSTANT), ("v_scale", v, V_SCALE_CONSTANT)):
            largest = float(x.abs().max()) if x.numel() else 0.0
            if ops.kv_cache_scale_is_valid(largest / constant):
                setattr(self, name, largest / constant)
        self.calculate_kv_scales = False
