"""oneDNN's summation order for a bf16 linear, found at load time.

``ops.bf16_blocked_linear`` streams a ``Linear``'s blocked weight faster than oneDNN's matmul does for
few rows, runs no libgomp region, and sums in oneDNN's order: a chain per chunk of input features,
chunks added left to right. A row then gets the bits oneDNN (and so transformers' ``F.linear``) gives
it, which ``Linear`` keeps at every row count by running the kernel for all of them. Where the
chunks start is oneDNN's choice (here: 512 features for K <= 1024, else 1024); ``k_chunk_ends`` asks
oneDNN itself, and the kernel is used for a weight only after it reproduced oneDNN's rows bit for
bit on that weight. AMX machines lay the weights out and sum in tiles this kernel does not mimic;
``Linear`` runs ``ops.bf16_amx_linear`` there.
"""

import ctypes
import functools
import logging

import torch

from pagedlm import ops

logger = logging.getLogger(__name__)

# The weight layout's input-feature block: chunk boundaries fall on multiples of it.
_K_BLOCK = 32
# A value whose sum with 1 rounds back to it in fp32 (its ulp is 128).
_BIG = 2.0**30
# Candidate boundaries per probe matmul.
_PROBE_ROWS = 256
# Rows of the check against oneDNN: enough elements that a wrong chunk boundary, which changes about
# one bf16 result in 10^4 on random rows, shows (the kernel's row tiles of 1..6 rows are checked too).
_CHECK_ROWS = 256

_verified: dict[tuple, list[int] | None] = {}


def onednn_linear(x: torch.Tensor, blocked_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's matmul ``x @ weight.T + bias`` on a weight from ``torch.ops.mkldnn._reorder_linear_weight``."""
    return torch.ops.mkldnn._linear_pointwise(x, blocked_weight, bias, "none", [], "")


@functools.cache
def reorders_to_ab16b64a2b(reorder_rows_hint: int) -> bool:
    """Whether oneDNN lays bf16 linear weights out as ``AB16b64a2b``, the layout ``ops.bf16_blocked_linear``
    reads (its avx512_core_bf16 matmul does; with AMX it picks ``AB16b32a2b``), read from the bytes of
    a reordered probe weight whose entries are distinct."""
    n, k = 64, 64
    dense = (torch.arange(n * k) % 251).to(torch.bfloat16).view(n, k)  # integers below 256 are exact in bf16
    blocked = torch.ops.mkldnn._reorder_linear_weight(dense, reorder_rows_hint)
    nbytes = torch.ops.mkldnn._nbytes(blocked)
    if nbytes != n * k * 2:
        return False
    raw = bytes((ctypes.c_uint8 * nbytes).from_address(torch.ops.mkldnn.data_ptr(blocked)))
    expected = dense.view(n // 64, 64, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.bfloat16), expected.flatten())


@functools.cache  # layers of one in_features share it (qkv and gate_up; o and down when equal)
def k_chunk_ends(in_features: int, reorder_rows_hint: int) -> list[int]:
    """Where oneDNN's bf16 matmul restarts its fp32 sums along the input features (exclusive ends).

    Probe matmuls on a weight of ones, one row per candidate boundary ``b`` (a multiple of 32):
    features ``b - 1 = 1``, ``b = 2**30`` and ``b + 1 = -2**30``. In one chain the 1 is lost to the
    large values (the row sums to 0); across a chunk boundary the chunk sums are 1 and 0. A boundary
    before the last feature has no ``b + 1``; there the chains differ only in that ``vdpbf16ps``
    flushes a subnormal running sum to zero while adding chunk sums does not, so its row is
    ``b - 1 = 2**-125``, ``b = -1.5 * 2**-126`` with a bias of ``2**-125`` that exposes the
    subnormal ``2**-127`` only when the two features are summed apart.
    """
    ones = torch.ops.mkldnn._reorder_linear_weight(torch.ones(64, in_features, dtype=torch.bfloat16), reorder_rows_hint)
    ends = []
    candidates = list(range(_K_BLOCK, in_features - 1, _K_BLOCK))
    for first in range(0, len(candidates), _PROBE_ROWS):  # bounded probe memory for wide layers
        batch = candidates[first : first + _PROBE_ROWS]
        x = torch.zeros(max(2, len(batch)), in_features, dtype=torch.bfloat16)
        for row, b in enumerate(batch):
            x[row, b - 1], x[row, b], x[row, b + 1] = 1.0, _BIG, -_BIG
        sums = onednn_linear(x, ones, None)[: len(batch), 0]
        ends += [b for b, s in zip(batch, sums.tolist()) if s == 1.0]
    last = in_features - 1
    if last > 0 and last % _K_BLOCK == 0:
        x = torch.zeros(2, in_features, dtype=torch.bfloat16)
        x[:, last - 1], x[:, last] = 2.0**-125, -1.5 * 2.0**-126
        bias = torch.full((64,), 2.0**-125, dtype=torch.bfloat16)
        if onednn_linear(x, ones, bias)[0, 0].item() != 2.0**-125:
            ends.append(last)
    return ends + [in_features]


def streamed_chunk_ends(
    blocked_weight: torch.Tensor, bias: torch.Tensor | None, reorder_rows_hint: int
) -> list[int] | None:
    """oneDNN's chunk ends for ``blocked_weight`` (a bf16 MKLDNN tensor ``[out, in]``) if
    ``ops.bf16_blocked_linear`` reproduces oneDNN's rows on it bit for bit, else None.

    Checked once per (shape, bias dtype) on random rows against the weight itself; None also when the
    kernel is unavailable (no AVX512-BF16 build, or the ops run on the torch reference).
    """
    out_features, in_features = blocked_weight.shape
    key = (out_features, in_features, None if bias is None else bias.dtype, reorder_rows_hint)
    if key not in _verified:
        _verified[key] = _check(blocked_weight, bias, reorder_rows_hint)
    return _verified[key]


@torch.inference_mode()  # as the model runs: with autograd on, oneDNN adds a bias that needs grad apart
def _check(blocked_weight: torch.Tensor, bias: torch.Tensor | None, reorder_rows_hint: int) -> list[int] | None:
    if ops.backend_for("cpu") != "cpu":
        return None
    if not reorders_to_ab16b64a2b(reorder_rows_hint):
        logger.info("bf16 linear %s: oneDNN keeps bf16 weights in another layout here",
                    tuple(blocked_weight.shape))
        return None
    ends = k_chunk_ends(blocked_weight.shape[1], reorder_rows_hint)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(_CHECK_ROWS, blocked_weight.shape[1], generator=generator).to(torch.bfloat16)
    expected = onednn_linear(x, blocked_weight, bias)
    try:
        for rows in [*range(1, 7), _CHECK_ROWS]:  # every row tile size of the kernel, then many rows
            out = torch.empty(rows, blocked_weight.shape[0], dtype=torch.bfloat16)
            ops.bf16_blocked_linear(out, x[:rows], blocked_weight, bias, ends)
            if not torch.equal(out, expected[:rows]):
                logger.info("bf16 linear %s: oneDNN sums in another order here",
                            tuple(blocked_weight.shape))
                return None
    except RuntimeError as exc:  # the kernel refused, e.g. in a build without AVX512-BF16
        logger.info("bf16 linear %s: the streaming kernel is unavailable (%s)",
                    tuple(blocked_weight.shape), exc)
        return None
    return ends
