"""Allocates the paged KV cache (layout in ``pagedlm/ops/__init__.py``) and sizes it."""

import torch

from pagedlm import ops
from pagedlm.config import CacheConfig, ModelConfig, available_memory


def block_bytes(model_config: ModelConfig, cache_config: CacheConfig) -> int:
    """Bytes of one block: keys and values of ``block_size`` tokens in every layer."""
    per_token = 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_size
    return per_token * cache_config.block_size * cache_config.kv_cache_torch_dtype(model_config.dtype).itemsize


def determine_num_kv_blocks(model_config: ModelConfig, cache_config: CacheConfig, max_useful_blocks: int) -> int:
    """``num_kv_blocks`` if set, else as many blocks as ``kv_cache_memory_bytes`` (default: see
    ``available_memory``) holds, at most ``max_useful_blocks``."""
    if cache_config.num_kv_blocks is not None:
        return cache_config.num_kv_blocks
    given = cache_config.kv_cache_memory_bytes
    memory = given or available_memory(model_config.device, cache_config.gpu_memory_utilization)
    num_kv_blocks = min(memory // block_bytes(model_config, cache_config), max_useful_blocks)
    if num_kv_blocks < 1:
        share = "gpu_memory_utilization" if cache_config.gpu_memory_utilization is not None else "the default share"
        what = f"kv_cache_memory_bytes of {given} bytes" if given else f"the memory {share} leaves ({memory} bytes)"
        raise ValueError(f"{what} holds no KV block; it needs at least {block_bytes(model_config, cache_config)} bytes.")
    return int(num_kv_blocks)


class CacheEngine:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, num_kv_blocks: int) -> None:
        shape = (num_kv_blocks, model_config.num_kv_heads, cache_config.block_size, model_config.head_size)
        kw = dict(dtype=cache_config.kv_cache_torch_dtype(model_config.dtype), device=model_config.device)
        self.num_kv_blocks = num_kv_blocks
        self.key_caches = [torch.empty(shape, **kw) for _ in range(model_config.num_layers)]
        self.value_caches = [torch.empty(shape, **kw) for _ in range(model_config.num_layers)]
        self.kv_caches = list(zip(self.key_caches, self.value_caches))
        self.num_bytes = num_kv_blocks * block_bytes(model_config, cache_config)

    def copy(self, blocks_to_copy: list[tuple[int, int]]) -> None:
        if blocks_to_copy:
            mapping = torch.tensor(blocks_to_copy, dtype=torch.int64, device=self.key_caches[0].device)
            ops.copy_blocks(self.key_caches, self.value_caches, mapping)
