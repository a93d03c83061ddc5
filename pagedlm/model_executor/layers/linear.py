"""Linear layers whose weights are reordered once, after loading, into the CPU GEMM's blocked layout."""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from pagedlm import ops
from pagedlm.model_executor.layers.activation import GeluAndMul, SiluAndMul
from pagedlm.model_executor.layers.direct_call import DirectCall
from pagedlm.model_executor.layers.onednn_order import onednn_linear, streamed_chunk_ends
from pagedlm.ops.fixed_rows import call_in_fixed_row_chunks

# oneDNN picks its blocked weight layout for an expected number of rows; any row count works with it.
_REORDER_ROWS_HINT = 64

# Rows per cuBLAS product on CUDA with batch_invariant (ops/fixed_rows.py). 128: a bf16 product of
# 128 rows takes about as long as reading the weight on an H100/H200, whose bf16 FLOP-to-byte
# ridge is near 300 rows.
INVARIANT_ROWS = 128


# The packed kernels' weight layouts by the weight's dtype: (a plain weight's, a gate_up weight's).
_PACKINGS = {
    torch.bfloat16: (ops.amx_pack_weight, ops.amx_pack_gate_up_weight),
    torch.float32: (ops.fp32_pack_weight, ops.fp32_pack_gate_up_weight),
}


def fixed_shape_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` as products of exactly ``INVARIANT_ROWS`` rows each, so that a row's
    result does not depend on how many rows came with it (``call_in_fixed_row_chunks``).

    x ``[m, in]``, weight ``[out, in]``, bias ``[out]`` or None, all of one dtype and device;
    returns ``[m, out]``.
    """

    def product(out: torch.Tensor, rows: torch.Tensor) -> None:
        if bias is None:
            torch.mm(rows, weight.t(), out=out)
        else:
            torch.addmm(bias, rows, weight.t(), out=out)

    out = x.new_empty(x.shape[0], weight.shape[0])
    call_in_fixed_row_chunks(product, INVARIANT_ROWS, (out, x), written=(0,))
    return out


def _packed_kernel_runs(op) -> bool:
    if ops.backend_for("cpu") != "cpu":
        return False
    x = torch.ones(1, 32, dtype=torch.bfloat16)
    out = torch.empty(1, 16, dtype=torch.bfloat16)
    try:
        op(out, x, ops.amx_pack_weight(torch.ones(16, 32)), None)
    except RuntimeError:
        return False
    return bool((out == 32).all())


@functools.cache
def amx_linear_available() -> bool:
    """Whether ``ops.bf16_amx_linear`` runs here: an AMX-BF16 build on a CPU and kernel that grant AMX."""
    return _packed_kernel_runs(ops.bf16_amx_linear)


@functools.cache
def fma_linear_available() -> bool:
    """Whether ``ops.bf16_fma_linear`` and ``ops.fp32_fma_linear`` run here: an AVX2 + FMA build (every
    x86 build but the portable one)."""
    return _packed_kernel_runs(ops.bf16_fma_linear)


def _onednn_reorders(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


class Linear(DirectCall, nn.Linear):
    """``nn.Linear`` that keeps its weight on the CPU in its kernel's layout.

    ``F.linear`` hands oneDNN (bf16) or MKL (fp32) a row-major ``[out, in]`` weight, which is
    reordered into the kernel's layout on every call; for decode-sized inputs that reorder costs as
    much as the product. ``process_weights_after_loading`` lays the weight out once instead (a tied
    weight as a copy, so the embedding keeps the original):

    - bf16 on a CPU with AMX: ``ops.amx_pack_weight``, and every row count runs on
      ``ops.bf16_amx_linear``, whose row sums do not depend on the row count (oneDNN's AMX matmul
      changes its sums between 32 and 33 rows, among others).
    - fp32 on every AVX2 or AVX-512 build: ``ops.fp32_pack_weight``, and every row count runs on
      ``ops.fp32_fma_linear`` (one fp32 FMA chain per output over the features in order, so row sums
      independent of the row count; 512-bit tiles on AVX-512): against oneDNN's fp32 matmul
      1.1-1.9x at 1-26 rows on AVX2, 1.0-2.0x at 1-256 rows and 0.93-1.15x at 2,048 on AVX-512, with no
      libgomp region in a step (docs/performance.md, sessions 35 and 36).
    - otherwise (bf16 without AMX, fp32 in a portable build), where oneDNN takes the dtype, oneDNN's
      blocked layout. In bf16, where ``onednn_order`` reproduced oneDNN's sums for the weight at load
      (an AVX512-BF16 build without AMX), every row count runs on
      ``ops.bf16_blocked_linear`` over the same weight, which gives each row oneDNN's bits: faster
      than oneDNN's matmul up to ~768 rows and within a few percent of it at 1,024-2,048 on the AMD
      EPYC of docs/performance.md, and no libgomp region in a step, whose threads would compete with
      the kernels' own pool. Where it did not (oneDNN's own AMX kernels, with ``PAGEDLM_DISABLE_AMX=1``
      on an AMX CPU), the weight goes to the FMA kernel below; only a portable build runs oneDNN's
      matmul, one row as two.
    - bf16 where oneDNN takes none (AVX2 CPUs: Haswell, Zen 1-3), or whose sums were not reproduced:
      ``ops.amx_pack_weight``, and every row count runs on ``ops.bf16_fma_linear`` (fp32 FMAs, row
      sums independent of the row count), 5-7x torch's bf16 matmul on AVX2 (docs/performance.md).

    On CUDA the weight stays as loaded; with ``batch_invariant`` (the default) every call runs
    ``fixed_shape_linear``, else one ``F.linear``.

    Input ``[..., in_features]``, output ``[..., out_features]``, in the weight's dtype.
    """

    # The op that runs the packed weight (ops.bf16_amx_linear, bf16_fma_linear or fp32_fma_linear), if packed,
    # and its argmax op (ops.*_linear_argmax).
    packed_linear = None
    packed_argmax = None
    blocked_layout = False
    # oneDNN's summation order for ops.bf16_blocked_linear (bf16 weights whose rows it reproduces).
    k_chunk_ends: list[int] | None = None
    # Products of INVARIANT_ROWS rows (CUDA with batch_invariant).
    fixed_shape = False

    def process_weights_after_loading(self, batch_invariant: bool = True) -> None:
        if self.bias is not None:
            # With autograd on, oneDNN adds a bias that needs grad apart from the sums.
            self.bias.requires_grad_(False)
        bf16_cpu = self.weight.dtype == torch.bfloat16 and self.weight.device.type == "cpu"
        fp32_cpu = self.weight.dtype == torch.float32 and self.weight.device.type == "cpu"
        if self.weight.device.type == "cuda":
            self.fixed_shape = batch_invariant
        elif bf16_cpu and amx_linear_available():
            self._pack("bf16_amx")
        elif fp32_cpu and fma_linear_available():
            self._pack("fp32_fma")
        elif _onednn_reorders(self.weight):
            blocked = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _REORDER_ROWS_HINT)
            chunk_ends = streamed_chunk_ends(blocked, self.bias, _REORDER_ROWS_HINT) if bf16_cpu else None
            if bf16_cpu and chunk_ends is None and fma_linear_available():
                # oneDNN's sums were not reproduced, so they may change with the row count (its AMX
                # kernels do, which it runs on an AMX CPU with PAGEDLM_DISABLE_AMX=1): the FMA kernel's do not.
                self._pack("bf16_fma")
            else:
                self.weight = nn.Parameter(blocked, requires_grad=False)
                self.blocked_layout = True
                self.k_chunk_ends = chunk_ends
        elif bf16_cpu and fma_linear_available():
            self._pack("bf16_fma")

    def _pack(self, kernel: str) -> None:
        """Lays the weight out for ``ops.{kernel}_linear`` (``GateUpLinear`` packs its own)."""
        self.packed_linear = getattr(ops, f"{kernel}_linear")
        self.packed_argmax = getattr(ops, f"{kernel}_linear_argmax")
        pack, _ = _PACKINGS[self.weight.dtype]
        self.weight = nn.Parameter(pack(self.weight.detach()), requires_grad=False)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dim() == 2 and x.stride(1) == 1 else x.reshape(-1, self.in_features).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.blocked_layout or self.packed_linear or self.fixed_shape):
            return F.linear(x, self.weight, self.bias)
        rows = self._rows(x)
        if self.fixed_shape:
            out = fixed_shape_linear(rows, self.weight, self.bias)
        elif self.packed_linear:
            out = rows.new_empty(rows.shape[0], self.out_features)
            self.packed_linear(out, rows, self.weight, self.bias)
        elif self.k_chunk_ends is not None:
            out = rows.new_empty(rows.shape[0], self.out_features)
            ops.bf16_blocked_linear(out, rows, self.weight, self.bias, self.k_chunk_ends)
        elif rows.shape[0] == 1:
            # oneDNN takes another kernel for one row whose sums round differently: a request's
            # results would depend on whether it ran alone. Two rows take the kernel every other
            # row count does (measured bit-identical per row for 2..4096 rows).
            out = onednn_linear(rows.expand(2, -1), self.weight, self.bias)[:1]
        else:
            out = onednn_linear(rows, self.weight, self.bias)
        return out if rows is x else out.view(*x.shape[:-1], self.out_features)

    @property
    def runs_own_kernel(self) -> bool:
        """Whether one of pagedlm's kernels runs this layer on the CPU (AMX, the FMA kernels, or the
        AVX512-BF16 streaming kernel in oneDNN's order), rather than oneDNN's matmul or ``F.linear``."""
        return self.packed_linear is not None or self.k_chunk_ends is not None

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each row's ``argmax`` over ``forward(x)`` (int64 ``[rows]``: the first index of the maximum,
        or of the first NaN) without the outputs, where pagedlm's kernel runs the linear (its
        ``_argmax`` op: the same sums and rounding); None where oneDNN's matmul or ``F.linear`` runs it."""
        if not self.runs_own_kernel:
            return None
        rows = self._rows(x)
        token_ids = torch.empty(rows.shape[0], dtype=torch.int64, device=rows.device)
        if self.packed_argmax is not None:
            self.packed_argmax(token_ids, rows, self.weight, self.bias, self.out_features)
        else:
            ops.bf16_blocked_linear_argmax(token_ids, rows, self.weight, self.bias, self.k_chunk_ends)
        return token_ids


class GateUpLinear(Linear):
    """A gated MLP's gate and up projections in one ``[2 * d, in_features]`` weight (gate rows, then
    up rows: vLLM's ``MergedColumnParallelLinear``), joined by their activation: input
    ``[..., in_features]``, output ``act_fn(gate_up)`` ``[..., d]`` in the weight's dtype.

    Where ``Linear`` would run a packed kernel (``ops.bf16_amx_linear``, ``ops.bf16_fma_linear``,
    ``ops.fp32_fma_linear``) and ``d`` is a multiple of 16, the weight is packed by
    ``ops.amx_pack_gate_up_weight`` (``ops.fp32_pack_gate_up_weight`` in fp32) and that kernel's
    ``_act_and_mul`` op sums and activates,
    with the bits of the two ops it replaces; the ``[rows, 2 * d]`` projection is never stored nor read
    back. Where it would run ``ops.bf16_blocked_linear`` and ``d`` is a multiple of 64,
    ``ops.bf16_blocked_linear_act_and_mul`` does the same on that weight.
    """

    # The op that sums and activates the packed gate_up weight, if packed so.
    packed_act_and_mul = None
    blocked_act_and_mul = False

    def __init__(self, in_features: int, d: int, bias: bool, act_fn: SiluAndMul | GeluAndMul) -> None:
        super().__init__(in_features, 2 * d, bias=bias)
        self.act_fn = act_fn

    def process_weights_after_loading(self, batch_invariant: bool = True) -> None:
        super().process_weights_after_loading(batch_invariant)
        self.blocked_act_and_mul = self.k_chunk_ends is not None and self.out_features % 128 == 0

    def _pack(self, kernel: str) -> None:
        if self.out_features % 32:  # d not a multiple of 16: the plain linear, then act_fn
            super()._pack(kernel)
            return
        self.packed_act_and_mul = getattr(ops, f"{kernel}_linear_act_and_mul")
        _, pack = _PACKINGS[self.weight.dtype]
        self.weight = nn.Parameter(pack(self.weight.detach()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows(x)
        d = self.out_features // 2
        if self.packed_act_and_mul:
            out = rows.new_empty(rows.shape[0], d)
            self.packed_act_and_mul(out, rows, self.weight, self.bias, self.act_fn.activation)
        elif self.blocked_act_and_mul:
            out = rows.new_empty(rows.shape[0], d)
            ops.bf16_blocked_linear_act_and_mul(
                out, rows, self.weight, self.bias, self.k_chunk_ends, self.act_fn.activation
            )
        else:
            out = self.act_fn(super().forward(rows))
        return out if rows is x else out.view(*x.shape[:-1], d)
