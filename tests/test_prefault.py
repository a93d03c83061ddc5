"""The KV cache's background prefault (pagedlm/worker/prefault.py): it maps every page, leaves what
steps wrote meanwhile as it was, and stops when told to."""

import ctypes
import gc
import os
import sys
import threading
import time

import pytest
import torch

from pagedlm.worker.cache_engine import CacheEngine
from pagedlm.worker.prefault import MADV_POPULATE_WRITE, prefault_in_background

PAGE = os.sysconf("SC_PAGE_SIZE")
# 64 MiB in bf16: past glibc's largest mmap threshold (32 MiB), so every cache is a fresh mapping
# with no page mapped yet.
CACHE_SHAPE = (8192, 4, 16, 64)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def _populate_supported() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    probe = torch.empty(PAGE // 4, dtype=torch.float32)
    start = probe.data_ptr() - probe.data_ptr() % PAGE
    return _libc.madvise(start, PAGE, MADV_POPULATE_WRITE) == 0


pytestmark = pytest.mark.skipif(not _populate_supported(), reason="needs Linux >= 5.14 (MADV_POPULATE_WRITE)")


def resident_share(t: torch.Tensor) -> float:
    """Share of the pages under ``t`` that are mapped (mincore)."""
    start = t.data_ptr() - t.data_ptr() % PAGE
    length = t.data_ptr() + t.numel() * t.element_size() - start
    pages = (length + PAGE - 1) // PAGE
    vec = ctypes.create_string_buffer(pages)
    assert _libc.mincore(start, length, vec) == 0, os.strerror(ctypes.get_errno())
    return sum(b & 1 for b in vec.raw) / pages


def prefault_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pagedlm-kv-prefault"]


def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_maps_every_page_and_keeps_what_was_written():
    caches = [torch.empty(CACHE_SHAPE, dtype=torch.bfloat16) for _ in range(4)]
    assert all(resident_share(c) < 0.01 for c in caches)  # fresh mappings: the test can fail
    # A step's writes, some before the thread gets there: the last block of every cache and block 3.
    for i, c in enumerate(caches):
        c[-1].fill_(i + 1.5)
        c[3].fill_(-(i + 0.25))
    stop = prefault_in_background(caches, blocks_per_chunk=64)
    assert stop is not None
    assert wait_for(lambda: all(resident_share(c) == 1.0 for c in caches))
    for i, c in enumerate(caches):
        assert torch.equal(c[-1], torch.full_like(c[-1], i + 1.5))
        assert torch.equal(c[3], torch.full_like(c[3], -(i + 0.25)))
    assert wait_for(lambda: not prefault_threads())


def test_stops_when_told():
    caches = [torch.empty(CACHE_SHAPE, dtype=torch.bfloat16) for _ in range(16)]  # 1 GiB: ~0.3 s or more to map
    stop = prefault_in_background(caches, blocks_per_chunk=64)
    stop.set()
    assert wait_for(lambda: not prefault_threads())
    assert sum(resident_share(c) for c in caches) / len(caches) < 0.5


def test_cache_engine_stops_its_thread_when_freed(llama_dir):
    from pagedlm.config import CacheConfig, ModelConfig

    model_config = ModelConfig.create(llama_dir, "bfloat16", None, "cpu")
    cache_config = CacheConfig(block_size=16)
    engine = CacheEngine(model_config, cache_config, num_kv_blocks=200_000)
    assert prefault_threads()
    del engine
    gc.collect()
    assert wait_for(lambda: not prefault_threads(), timeout=10.0)
