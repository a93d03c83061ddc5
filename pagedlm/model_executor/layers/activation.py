import torch
from torch import nn

from pagedlm import ops
from pagedlm.model_executor.layers.direct_call import DirectCall


class SiluAndMul(DirectCall, nn.Module):
    """``silu(gate) * up`` over a packed ``[num_tokens, 2 * d]`` gate_up projection."""

    activation = "silu"  # the gated linears' name for it (ops.bf16_*_linear_act_and_mul)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0], x.shape[1] // 2)
        ops.silu_and_mul(out, x)
        return out


class GeluAndMul(DirectCall, nn.Module):
    """``gelu_tanh(gate) * up`` (GeGLU with GELU's tanh approximation, transformers'
    ``gelu_pytorch_tanh``) over a packed ``[num_tokens, 2 * d]`` gate_up projection."""

    activation = "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0], x.shape[1] // 2)
        ops.gelu_tanh_and_mul(out, x)
        return out
