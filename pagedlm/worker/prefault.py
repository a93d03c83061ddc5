"""Maps a CPU KV cache's pages when it is allocated, so that steps take no page faults.

``torch.empty`` leaves the cache's pages unmapped; Linux maps each one (and zeroes it) at its
first write. The block manager hands out never-used blocks first, so a lazily mapped cache costs
the steps its first writes' faults, one page at a time inside ``reshape_and_cache`` on the step's
calling thread: ~1.9 s of a 42 s AlpacaEval run here (it first touches ~7,200 blocks, ~2.7 GB of
SmolLM2's 4.8 GB cache: ~3 us a 4 KiB page). ``populate`` maps the whole cache at start with ``madvise(MADV_POPULATE_WRITE)``
(Linux >= 5.14: pages mapped as writes would map them, nothing written) on every thread, as vLLM's
``torch.zeros`` cache and llama.cpp's cleared one are committed at start: 0.6 s for 4.5 GiB on 2
cores in a fresh process here, 2.2-2.7 s in ``LLM()`` after the model has loaded (the zeroing,
``clear_page``, runs slower there on this VM).

Tried and not kept: mapping a few hundred blocks ahead of the highest block each step writes (no
faults left, but the zeroing moved into the steps: AlpacaEval 42.2-42.9 s against 41.9-44.2), and a
background thread at idle priority (while it ran, decode steps took 2-3x as long: the kernels'
pool spins with ``sched_yield``, which hands the core to any runnable thread, an idle-priority one
included, until the next scheduler tick).
"""

import ctypes
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

MADV_POPULATE_WRITE = 23  # include/uapi/asm-generic/mman-common.h
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PIECE_BYTES = 64 << 20  # one madvise call: small enough to share the cache evenly among threads


def populate(tensors: list[torch.Tensor], threads: int) -> bool:
    """Map every page under ``tensors`` (contiguous CPU tensors) now, on ``threads`` threads; their
    contents are left as they are. Returns ``False``, having mapped nothing or part, where the
    kernel cannot (not Linux, Linux < 5.14); the pages are then mapped by their first writes.
    A tensor's first page may be shared with what lies before it: mapping it changes nothing there."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    pieces = []
    for t in tensors:
        begin, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        begin -= begin % _PAGE
        pieces += [(p, min(end, p + _PIECE_BYTES)) for p in range(begin, end, _PIECE_BYTES)]

    def advise(piece: tuple[int, int]) -> bool:  # ctypes releases the GIL for the call
        return libc.madvise(piece[0], piece[1] - piece[0], MADV_POPULATE_WRITE) == 0

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return all(pool.map(advise, pieces))
