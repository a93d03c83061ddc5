import torch
from torch import nn

from pagedlm import ops
from pagedlm.model_executor.layers.direct_call import DirectCall


class RMSNorm(DirectCall, nn.Module):
    """RMSNorm with Hugging Face's numerics, optionally fused with the residual add (in place)."""

    norm = staticmethod(ops.rms_norm)
    fused_add_norm = staticmethod(ops.fused_add_rms_norm)

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)`` into a new contiguous tensor (x ``[num_tokens, hidden]``, or ``[num_tokens, num_heads,
        head_size]`` for per-head norms; rows may be strided views); with ``residual`` (2-D),
        ``residual += x`` and ``x = norm(residual)``, both in place."""
        if residual is None:
            out = x.new_empty(x.shape)
            self.norm(out, x, self.weight, self.eps)
            return out
        self.fused_add_norm(x, residual, self.weight, self.eps)
        return x, residual


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + weight)`` in fp32, rounded once (the checkpoint stores
    ``weight`` as the offset from 1)."""

    norm = staticmethod(ops.gemma_rms_norm)
    fused_add_norm = staticmethod(ops.gemma_fused_add_rms_norm)


class OlmoRMSNorm(DirectCall, nn.Module):
    """OLMo 2's RMSNorm: ``x / rms(x) * weight`` in fp32, rounded once (Llama's rounds before the
    weight multiplies)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``norm(x)`` into a new contiguous tensor (``x`` [num_tokens, hidden], rows may be strided);
        with ``residual``, ``residual += norm(x)`` (``x`` normalised in place; a post-norm layer's
        residual add), returning ``residual``."""
        if residual is None:
            out = x.new_empty(x.shape)
            ops.olmo_rms_norm(out, x, self.weight, self.eps)
            return out
        ops.olmo_rms_norm_add(x, residual, self.weight, self.eps)
        return residual
