"""Linear layers whose weights are reordered once, after loading, into the CPU GEMM's blocked layout."""

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN picks its blocked weight layout for an expected number of rows; any row count works with it.
_REORDER_ROWS_HINT = 64


def _onednn_reorders(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


class Linear(nn.Linear):
    """``nn.Linear`` that keeps its weight on the CPU in oneDNN's blocked layout.

    ``F.linear`` hands oneDNN (bf16) or MKL (fp32) a row-major ``[out, in]`` weight, which is
    reordered into the kernel's layout on every call; for decode-sized inputs that reorder costs as
    much as the product. ``process_weights_after_loading`` reorders the weight once instead (a tied
    weight is reordered as a copy, so the embedding keeps the original).
    """

    blocked_layout = False

    def process_weights_after_loading(self) -> None:
        if _onednn_reorders(self.weight):
            blocked = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _REORDER_ROWS_HINT)
            self.weight = nn.Parameter(blocked, requires_grad=False)
            self.blocked_layout = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocked_layout:
            if x.shape[0] == 1:
                # oneDNN takes another kernel for one row whose sums round differently: a request's
                # results would depend on whether it ran alone. Two rows take the kernel every other
                # row count does (measured bit-identical per row for 2..4096 rows).
                return torch.ops.mkldnn._linear_pointwise(x.expand(2, -1), self.weight, self.bias, "none", [], "")[:1]
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
