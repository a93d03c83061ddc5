"""Row-wise work in calls of one shape, for batch invariance on CUDA.

cuBLAS picks its GEMM kernel and split-K by the product's shape and the operands' alignment, and
torch's CUDA reductions and scans pick their launch shape by the number of rows (a single row's
``cumsum`` even takes another algorithm): a row's result then depends on how many rows came with
it. A kernel of fixed configuration computes each row from that row alone, so running every call
as chunks of one row count, from freshly allocated (so equally aligned) buffers, gives each row
the same bits whatever the batch (Thinking Machines, "Defeating Nondeterminism in LLM Inference",
2025, on fixing the kernel configuration).
"""

from collections.abc import Callable, Sequence

import torch


def call_in_fixed_row_chunks(op: Callable[..., object], rows: int, args: Sequence[torch.Tensor],
                             written: Sequence[int]) -> None:
    """Runs ``op(*chunks)`` over chunks of exactly ``rows`` rows of ``args``.

    Every tensor in ``args`` has the same number ``m`` of rows (dim 0). The inputs are copied into
    fresh buffers of ``ceil(m / rows) * rows`` rows, padded with copies of their last row; ``op``
    gets each buffer's chunk ``[lo, lo + rows)`` and writes the chunks of the fresh buffers of the
    ``written`` args, whose first ``m`` rows are then copied into those args. ``op`` must treat rows
    independently (a padding row is a valid input because it repeats a real one).
    """
    m = args[0].shape[0]
    if m == 0:
        return
    n = -(-m // rows) * rows
    fresh = []
    for i, arg in enumerate(args):
        buffer = arg.new_empty((n, *arg.shape[1:]))
        if i not in written:
            buffer[:m] = arg
            buffer[m:] = arg[-1]
        fresh.append(buffer)
    for lo in range(0, n, rows):
        op(*(buffer[lo:lo + rows] for buffer in fresh))
    for i in written:
        args[i].copy_(fresh[i][:m])
