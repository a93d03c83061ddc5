"""Allocates the paged KV cache (layout in ``pagedlm/ops/__init__.py``) and sizes it."""

import math
import mmap

import torch

from pagedlm import ops
from pagedlm.config import CacheConfig, ModelConfig, available_memory


def block_bytes(model_config: ModelConfig, cache_config: CacheConfig) -> int:
    """Bytes of one block: keys and values of ``block_size`` tokens in every layer."""
    per_token = 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_size
    return per_token * cache_config.block_size * cache_config.kv_cache_torch_dtype(model_config.dtype).itemsize


def determine_num_kv_blocks(model_config: ModelConfig, cache_config: CacheConfig, max_useful_blocks: int,
                            free_at_start: int | None) -> int:
    """``num_kv_blocks`` if set, else as many blocks as ``kv_cache_memory_bytes`` (default: see
    ``available_memory``, of ``free_at_start``) holds, at most ``max_useful_blocks``."""
    if cache_config.num_kv_blocks is not None:
        return cache_config.num_kv_blocks
    given = cache_config.kv_cache_memory_bytes
    memory = given or available_memory(model_config.device, cache_config.gpu_memory_utilization, free_at_start)
    num_kv_blocks = min(memory // block_bytes(model_config, cache_config), max_useful_blocks)
    if num_kv_blocks < 1:
        share = "gpu_memory_utilization" if cache_config.gpu_memory_utilization is not None else "the default share"
        what = f"kv_cache_memory_bytes of {given} bytes" if given else f"the memory {share} leaves ({memory} bytes)"
        raise ValueError(f"{what} holds no KV block; it needs at least {block_bytes(model_config, cache_config)} bytes.")
    return int(num_kv_blocks)


HUGE_PAGE_BYTES = 2 << 20


def empty_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor of ``shape`` and ``dtype`` on private anonymous memory advised for
    transparent huge pages (``madvise(MADV_HUGEPAGE)``), starting on a 2 MiB boundary, so that Linux
    backs it with 2 MiB pages where it can. In THP's "madvise" mode (many distributions' default)
    ``torch.empty``'s memory gets 4 KiB pages, and decode attention, which reads a few KiB from each of
    thousands of cache blocks a layer, then misses the TLB run after run: 2-9% slower over blocks in
    the block manager's extents, 9-22% over scattered ones (docs/performance.md, session 47). The
    price: a 2 MiB page is committed (and zeroed) at its first write, so a short job's RSS is higher
    (AlpacaEval: 2.73 GB against 2.08), and under THP's ``defrag`` setting "madvise" a first write
    may wait for the kernel to compact memory. (torch's own ``THP_MEM_ALLOC_ENABLE=1`` advises
    every large CPU allocation so; this advises the cache alone.) Where the platform has no
    ``MADV_HUGEPAGE`` (not Linux) or refuses it, the memory is the same, on the pages it gives."""
    nbytes = math.prod(shape) * dtype.itemsize
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive while a view lives
    start = -raw.data_ptr() % HUGE_PAGE_BYTES
    return raw[start : start + nbytes].view(dtype).view(shape)


class CacheEngine:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, num_kv_blocks: int) -> None:
        shape = (num_kv_blocks, model_config.num_kv_heads, cache_config.block_size, model_config.head_size)
        dtype, device = cache_config.kv_cache_torch_dtype(model_config.dtype), model_config.device

        def empty() -> torch.Tensor:
            if torch.device(device).type == "cpu":
                return empty_on_huge_pages(shape, dtype)
            return torch.empty(shape, dtype=dtype, device=device)

        self.num_kv_blocks = num_kv_blocks
        self.key_caches = [empty() for _ in range(model_config.num_layers)]
        self.value_caches = [empty() for _ in range(model_config.num_layers)]
        self.kv_caches = list(zip(self.key_caches, self.value_caches))
        self.num_bytes = num_kv_blocks * block_bytes(model_config, cache_config)

    def copy(self, blocks_to_copy: list[tuple[int, int]]) -> None:
        if blocks_to_copy:
            mapping = torch.tensor(blocks_to_copy, dtype=torch.int64, device=self.key_caches[0].device)
            ops.copy_blocks(self.key_caches, self.value_caches, mapping)
