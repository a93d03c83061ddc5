"""Commits a CPU KV cache's memory in the background, so that steps do not take its page faults.

``torch.empty`` leaves the cache's pages unmapped; Linux maps each one (and zeroes it) at its
first write. The block manager hands out never-used blocks first, in block order, so without this
every block a run touches costs a step its first writes' faults: ~1.9 s of a 42 s AlpacaEval run
here, in ``reshape_and_cache`` on the step's calling thread (4 KiB pages, ~5 us each).

A daemon thread at ``SCHED_IDLE`` (it runs only on a core nobody else wants, such as the one a
step's serial phases leave idle) asks the kernel to map the pages, chunk by chunk in block order
over every layer, with ``madvise(MADV_POPULATE_WRITE)`` (Linux >= 5.14). That maps a page as a
write would but writes nothing, so it may run while steps write the cache, and pages already
written are left as they are. Where the call is missing (another OS, an older kernel) the thread
stops at once and the cache faults in as before. The thread holds no reference to the cache: it
checks ``stop`` before each call, and a call on memory freed meanwhile fails or maps pages of
whatever owns them now, without changing their contents.
"""

import ctypes
import errno
import logging
import os
import sys
import threading

import torch

logger = logging.getLogger("pagedlm")

MADV_POPULATE_WRITE = 23  # include/uapi/asm-generic/mman-common.h
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def prefault_in_background(caches: list[torch.Tensor], blocks_per_chunk: int) -> threading.Event | None:
    """Start mapping the pages of ``caches`` (CPU tensors of equal shape ``[num_blocks, ...]``) in
    block order, ``blocks_per_chunk`` blocks of every cache at a time; returns the event that stops
    it (set it before the caches are freed), or ``None`` where this cannot run (not Linux)."""
    if not sys.platform.startswith("linux") or not caches:
        return None
    num_blocks = caches[0].shape[0]
    block_bytes = caches[0][0].numel() * caches[0].element_size() if num_blocks else 0
    chunks = [
        [(t.data_ptr() + b * block_bytes, t.data_ptr() + min(num_blocks, b + blocks_per_chunk) * block_bytes) for t in caches]
        for b in range(0, num_blocks, blocks_per_chunk)
    ]
    stop = threading.Event()
    threading.Thread(target=_populate, args=(chunks, stop), name="pagedlm-kv-prefault", daemon=True).start()
    return stop


def _populate(chunks: list[list[tuple[int, int]]], stop: threading.Event) -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError) as exc:
        logger.debug("KV cache prefault not started: %s", exc)
        return
    for chunk in chunks:
        for begin, end in chunk:
            if stop.is_set():
                return
            start = begin - begin % _PAGE
            if libc.madvise(start, end - start, MADV_POPULATE_WRITE) != 0:
                logger.debug("KV cache prefault stopped: madvise: %s", errno.errorcode.get(ctypes.get_errno(), "?"))
                return
