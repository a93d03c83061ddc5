"""The pagedlm._C kernels against the pure-torch reference (pagedlm/ops/reference.py).

Caches start NaN-filled and only the slots of cached tokens get data, so reading a stale slot, a
padding block-table entry or an unused block poisons the result; outputs start NaN-filled, so an
element the kernel forgets to write fails too. Attention is compared as ||out - ref|| / ||ref|| with
the reference evaluated in fp32 on the exact fp32 values of the same inputs.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CUDA, HAS_CUDA_KERNELS
from pagedlm.ops import reference

pytest.importorskip("pagedlm._C", reason="pagedlm._C is not built; run `pip install --no-build-isolation -e .`")

DEVICES = ["cpu", CUDA]
# Relative error bounds: fp32 is limited by summation order (and the ~1e-6 exp approximation),
# bf16/fp16 by rounding the output.
REL_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def paged_kv(seq_lens, block_size, num_kv_heads, head_size, dtype, device, seed, key_growth=0.0):
    """NaN-filled caches where only the tokens of the given sequences hold data, plus block tables
    that scatter blocks randomly, share full prefix blocks between neighbouring sequences and pad
    with random (valid, never to be read) block ids. key_growth: the key at position p gains
    key_growth * p along one direction, so a query's logits drift by that much per key."""
    gen = torch.Generator().manual_seed(seed)
    needed = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(needed) + 8
    max_blocks = max(needed, default=0) + 2
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=gen, dtype=torch.int32)
    for i, n in enumerate(needed):
        shared = min(seq_lens[i - 1], seq_lens[i]) // block_size if i % 2 else 0
        row = tables[i - 1, :shared].tolist() + [free.pop() for _ in range(n - shared)]
        tables[i, :n] = torch.tensor(row, dtype=torch.int32)
    shape = (num_blocks, num_kv_heads, block_size, head_size)
    key_cache = torch.full(shape, float("nan"))
    value_cache = torch.full(shape, float("nan"))
    for i, n in enumerate(seq_lens):
        pos = torch.arange(n)
        blocks = tables[i, pos // block_size].long()
        drift = key_growth * pos[:, None, None] * torch.ones(head_size) / head_size**0.5
        key_cache[blocks, :, pos % block_size] = torch.randn(n, num_kv_heads, head_size, generator=gen) + drift
        value_cache[blocks, :, pos % block_size] = torch.randn(n, num_kv_heads, head_size, generator=gen)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    return key_cache.to(dtype).to(device), value_cache.to(dtype).to(device), tables.to(device), seq_lens_t.to(device)


def fused_query(num_tokens, num_heads, num_kv_heads, head_size, dtype, device, seed):
    """Queries as the model produces them: a non-contiguous view into a fused QKV projection."""
    gen = torch.Generator().manual_seed(seed + 1)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_size, generator=gen).to(dtype).to(device)
    return qkv[:, : num_heads * head_size].view(num_tokens, num_heads, head_size)


def assert_close_rel(out, ref, dtype, what):
    assert not out.isnan().any(), f"{what}: output has NaN (stale slot read or element not written)"
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < REL_TOL[dtype], f"{what}: ||out - ref|| / ||ref|| = {err:.2e} >= {REL_TOL[dtype]:.0e}"


def poison_unread(key_cache, value_cache, tables, seq_lens, first_keys):
    """NaN into every slot no sequence reads: sequence i reads its tokens [first_keys[i], seq_lens[i]),
    so a kernel that reads before a sliding window (or past the end) poisons its result."""
    num_blocks, _, block_size, _ = key_cache.shape
    read = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for i, (first, n) in enumerate(zip(first_keys, seq_lens.tolist())):
        pos = torch.arange(first, n)
        read[tables[i].cpu()[pos // block_size].long(), pos % block_size] = True
    unread = ~read.to(key_cache.device)
    key_cache.masked_fill_(unread[:, None, :, None], float("nan"))
    value_cache.masked_fill_(unread[:, None, :, None], float("nan"))


def first_key(pos, sliding_window):
    return max(0, pos - sliding_window + 1) if sliding_window else 0


def fp8_caches(key_cache, value_cache, cache_dtype, scales):
    """The caches' values as fp8 entries (value / scale; NaN stays NaN), or the caches themselves."""
    if cache_dtype is None:
        return key_cache, value_cache
    return tuple(reference._to_cache(c.float(), cache_dtype, s) for c, s in zip((key_cache, value_cache), scales))


def check_decode(device, dtype, block_size, head_size, gqa, seq_lens, num_kv_heads=2, seed=0, sliding_window=0,
                 soft_cap=0.0, cache_dtype=None, scales=(1.0, 1.0), key_growth=0.0):
    key_cache, value_cache, tables, lens = paged_kv(seq_lens, block_size, num_kv_heads, head_size, dtype, device, seed,
                                                    key_growth)
    if sliding_window:
        poison_unread(key_cache, value_cache, tables, lens, [first_key(n - 1, sliding_window) for n in seq_lens])
    key_cache, value_cache = fp8_caches(key_cache, value_cache, cache_dtype, scales)
    num_heads = num_kv_heads * gqa
    query = fused_query(len(seq_lens), num_heads, num_kv_heads, head_size, dtype, device, seed)
    out = torch.full(query.shape, float("nan"), dtype=dtype, device=device)
    scale = 1 / math.sqrt(head_size)
    options = (sliding_window, soft_cap, *scales)
    torch.ops.pagedlm.paged_attention(out, query, key_cache, value_cache, tables, lens, scale, *options)
    ref = torch.empty(query.shape, device=device)
    reference.paged_attention(ref, query.float(), key_cache, value_cache, tables, lens, scale, *options)
    what = (f"decode {dtype} bs={block_size} D={head_size} gqa={gqa} lens={seq_lens} window={sliding_window} "
            f"cap={soft_cap} cache={cache_dtype} scales={scales}")
    assert_close_rel(out, ref, dtype, what)


def check_prefill(device, dtype, block_size, head_size, gqa, spans, num_kv_heads=2, seed=0, sliding_window=0,
                  soft_cap=0.0, cache_dtype=None, scales=(1.0, 1.0), key_growth=0.0):
    """spans: (cached context, new query rows) per sequence."""
    seq_lens = [context + rows for context, rows in spans]
    key_cache, value_cache, tables, lens = paged_kv(seq_lens, block_size, num_kv_heads, head_size, dtype, device, seed,
                                                    key_growth)
    if sliding_window:
        poison_unread(key_cache, value_cache, tables, lens, [first_key(c, sliding_window) if r else c for c, r in spans])
    key_cache, value_cache = fp8_caches(key_cache, value_cache, cache_dtype, scales)
    rows = torch.tensor([0] + [r for _, r in spans]).cumsum(0)
    cu_seqlens_q = rows.to(torch.int32).to(device)
    num_heads = num_kv_heads * gqa
    query = fused_query(int(rows[-1]), num_heads, num_kv_heads, head_size, dtype, device, seed)
    out = torch.full(query.shape, float("nan"), dtype=dtype, device=device)
    scale = 1 / math.sqrt(head_size)
    options = (sliding_window, soft_cap, *scales)
    torch.ops.pagedlm.paged_prefill_attention(
        out, query, key_cache, value_cache, tables, cu_seqlens_q, lens, scale, *options
    )
    ref = torch.empty(query.shape, device=device)
    reference.paged_prefill_attention(ref, query.float(), key_cache, value_cache, tables, cu_seqlens_q, lens, scale,
                                      *options)
    what = (f"prefill {dtype} bs={block_size} D={head_size} gqa={gqa} spans={spans} window={sliding_window} "
            f"cap={soft_cap} cache={cache_dtype} scales={scales}")
    assert_close_rel(out, ref, dtype, what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_size", [64, 80, 128])
@pytest.mark.parametrize("gqa", [1, 2, 4, 8, 20])  # 20: more query heads than an AMX tile's 16
def test_paged_attention(device, dtype, block_size, head_size, gqa):
    # Lengths that end just before, on and after block and 512-token partition boundaries.
    seq_lens = [1, block_size - 1, block_size, block_size + 1, 511, 512, 513, 1100]
    check_decode(device, dtype, block_size, head_size, gqa, seq_lens, seed=block_size + head_size + gqa)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seq_lens", [[4096], [4000, 1536, 2049, 3]])
def test_paged_attention_long_context(device, dtype, seq_lens):
    check_decode(device, dtype, 16, 128, 4, seq_lens, num_kv_heads=1)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_float16(device):
    check_decode(device, torch.float16, 16, 128, 4, [5, 700])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("head_size", [96, 112, 256])
def test_cuda_head_sizes(dtype, head_size):
    check_decode("cuda", dtype, 16, head_size, 4, [1, 17, 600, 2100])
    check_prefill("cuda", dtype, 16, head_size, 4, [(0, 40), (100, 17)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_size", [64, 80, 128])
@pytest.mark.parametrize("gqa", [1, 2, 4, 8])
def test_paged_prefill_attention(device, dtype, block_size, head_size, gqa):
    # Fresh prompts and prompts after a cached context, across block and 32-row tile boundaries;
    # one sequence contributes no query rows.
    spans = [(0, 1), (0, block_size), (0, 33), (block_size - 1, 1), (5, 2 * block_size + 1), (40, 0), (70, 65)]
    check_prefill(device, dtype, block_size, head_size, gqa, spans, seed=block_size + head_size + gqa)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("soft_cap", [0.0, 30.0])
def test_attention_while_the_max_logit_grows(device, dtype, block_size, soft_cap):
    """Logits that drift by ~0.03 a key (up or down per head): over 1,100 keys a query's max grows far
    past the online softmax's lazy-rescaling threshold again and again, within chunks, partitions and
    query tiles, so the reference moves and the output summed so far is corrected many times."""
    seed = block_size + int(soft_cap)
    check_decode(device, dtype, block_size, 64, 3, [40, 513, 1100], seed=seed, soft_cap=soft_cap, key_growth=0.3)
    check_prefill(device, dtype, block_size, 64, 3, [(0, 600), (500, 130)], seed=seed, soft_cap=soft_cap,
                  key_growth=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_size", [32, 96, 160, 256])
def test_bf16_attention_other_head_sizes(device, head_size):
    """Head sizes whose 32-dimension steps leave the bf16 kernels' tile loops partial: one step (32),
    a 64-dimension pass plus 32 (96, Phi-3), query pairs that no longer fit the AMX prefill's four
    resident tiles (160, 256: Gemma)."""
    check_decode(device, torch.bfloat16, 16, head_size, 3, [1, 33, 600], seed=head_size)
    check_prefill(device, torch.bfloat16, 16, head_size, 3, [(0, 70), (530, 20)], seed=head_size)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_prefill_attention_long(device):
    check_prefill(device, torch.bfloat16, 16, 128, 4, [(0, 700), (1500, 300)], num_kv_heads=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("sliding_window", [0, 1, 7, 100, 600])
@pytest.mark.parametrize("soft_cap", [0.0, 2.0])
def test_sliding_window_and_soft_cap(device, dtype, block_size, sliding_window, soft_cap):
    # Every slot outside the windows is NaN, so reading a block before a window fails the test.
    seed = block_size + sliding_window
    lens = [1, block_size + 1, 99, 100, 101, 513, 1100]
    check_decode(device, dtype, block_size, 64, 4, lens, seed=seed, sliding_window=sliding_window, soft_cap=soft_cap)
    spans = [(0, 1), (0, 45), (5, 2 * block_size + 1), (40, 0), (90, 70), (700, 33), (0, 300)]
    check_prefill(device, dtype, block_size, 64, 2, spans, seed=seed, sliding_window=sliding_window, soft_cap=soft_cap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("head_size", [8, 40, 72, 100, 200])
def test_cpu_odd_head_sizes(dtype, head_size):
    # Head sizes that are not a multiple of the vector width take a partial last vector on CPU.
    check_decode("cpu", dtype, 16, head_size, 4, [1, 17, 600], seed=head_size)
    check_prefill("cpu", dtype, 16, head_size, 2, [(0, 40), (100, 17)], seed=head_size, sliding_window=50, soft_cap=5.0)


FP8_CACHES = pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@FP8_CACHES
@pytest.mark.parametrize("head_size", [64, 48])
def test_fp8_kv_cache(device, dtype, cache_dtype, head_size):
    # The reference reads the same fp8 entries (entry * scale), so the bounds are the query dtype's.
    # Scales that put the entries well inside the formats' range and far from 1 (1 would hide a
    # missing or doubled scale); head size 64 takes the bf16 tiles on CPU, 48 the generic path.
    scales = (0.02, 0.05)
    check_decode(device, dtype, 16, head_size, 3, [1, 17, 600, 1100], seed=1, cache_dtype=cache_dtype, scales=scales)
    check_prefill(device, dtype, 16, head_size, 3, [(0, 40), (100, 17), (500, 30)], seed=2, cache_dtype=cache_dtype,
                  scales=scales)
    check_prefill(device, dtype, 8, head_size, 2, [(0, 60), (90, 70)], seed=3, sliding_window=50, soft_cap=5.0,
                  cache_dtype=cache_dtype, scales=scales)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@FP8_CACHES
@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("sliding_window", [0, 50])
def test_fp8_kv_cache_block_sizes(device, dtype, cache_dtype, block_size, sliding_window):
    # Decode's blocks of 8 gather a 16-key group from two blocks, blocks of 32 from half of one (its
    # second half must start at key 16 of the block, not 0).
    scales = (0.02, 0.05)
    check_decode(device, dtype, block_size, 64, 3, [1, 17, 40, 600], seed=4, sliding_window=sliding_window,
                 cache_dtype=cache_dtype, scales=scales)
    check_prefill(device, dtype, block_size, 64, 3, [(0, 40), (70, 30)], seed=5, sliding_window=sliding_window,
                  cache_dtype=cache_dtype, scales=scales)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@FP8_CACHES
def test_reshape_and_cache_fp8(device, dtype, cache_dtype):
    """Entries are value / scale, saturated at the largest finite value, rounded to nearest even, NaN
    kept: the reference's bytes exactly, over magnitudes from subnormal to far past the range."""
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.logspace(-9, 7, 60)[:, None, None]
    kv = (torch.randn(60, 2, 2, 64, generator=gen) * magnitudes[..., None]).to(dtype)
    key, value = kv[:, 0], kv[:, 1]
    key[3, 0, 5], key[4, 1, 7], value[5, 1, 9] = float("nan"), float("inf"), -float("inf")
    slots = torch.randperm(12 * 16, generator=gen)[:60]
    slots[::7] = -1
    for scales in ((1.0, 1.0), (0.37, 3.1)):
        expect_k = torch.zeros(12, 2, 16, 64, dtype=cache_dtype)
        expect_v = expect_k.clone()
        reference.reshape_and_cache(key, value, expect_k, expect_v, slots, *scales)
        key_cache, value_cache = expect_k.clone().zero_().to(device), expect_v.clone().zero_().to(device)
        torch.ops.pagedlm.reshape_and_cache(key.to(device), value.to(device), key_cache, value_cache,
                                            slots.to(device), *scales)
        assert torch.equal(key_cache.cpu().view(torch.uint8), expect_k.view(torch.uint8))
        assert torch.equal(value_cache.cpu().view(torch.uint8), expect_v.view(torch.uint8))
    largest = torch.finfo(cache_dtype).max
    entries = expect_k.float()
    assert entries.isnan().any() and entries.nan_to_num(0.0).abs().max() == largest  # the cases did occur


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_dtype_and_scales_refused(device):
    key_cache, value_cache, tables, lens = paged_kv([5], 16, 1, 64, torch.bfloat16, device, 0)
    query = fused_query(1, 1, 1, 64, torch.bfloat16, device, 0)
    out = torch.empty_like(query)
    attend = torch.ops.pagedlm.paged_attention
    with pytest.raises(RuntimeError, match="apply to fp8 KV caches only"):
        attend(out, query, key_cache, value_cache, tables, lens, 0.1, 0, 0.0, 0.5, 1.0)
    with pytest.raises(RuntimeError, match="KV cache dtype must be"):
        attend(out, query, key_cache.half(), value_cache.half(), tables, lens, 0.1)
    fp8 = [c.to(torch.float8_e4m3fn) for c in (key_cache, value_cache)]
    # Checked in float32, the kernels' precision: 1e39 overflows it, 1e-40's reciprocal does.
    for bad in (0.0, -1.0, float("inf"), float("nan"), 1e39, 1e-40):
        with pytest.raises(RuntimeError, match="must be positive and finite in float32"):
            attend(out, query, *fp8, tables, lens, 0.1, 0, 0.0, bad, 1.0)
        with pytest.raises(ValueError, match="must be positive and finite in float32"):
            reference.paged_attention(out, query, *fp8, tables, lens, 0.1, 0, 0.0, 1.0, bad)
    kv = torch.randn(1, 1, 64, dtype=torch.bfloat16, device=device)
    with pytest.raises(RuntimeError, match="apply to fp8 KV caches only"):
        torch.ops.pagedlm.reshape_and_cache(kv, kv, key_cache, value_cache, torch.tensor([0], device=device), 1.0, 2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_options_refused(device):
    key_cache, value_cache, tables, lens = paged_kv([5], 16, 1, 64, torch.float32, device, 0)
    query = fused_query(1, 1, 1, 64, torch.float32, device, 0)
    out = torch.empty_like(query)
    with pytest.raises(RuntimeError, match="sliding_window must be >= 0"):
        torch.ops.pagedlm.paged_attention(out, query, key_cache, value_cache, tables, lens, 0.1, -1, 0.0)
    for cap in (-1.0, float("inf"), float("nan")):
        with pytest.raises(RuntimeError, match="logits_soft_cap must be finite and >= 0"):
            torch.ops.pagedlm.paged_attention(out, query, key_cache, value_cache, tables, lens, 0.1, 0, cap)
        with pytest.raises(ValueError, match="logits_soft_cap must be finite and >= 0"):
            reference.paged_attention(out, query, key_cache, value_cache, tables, lens, 0.1, 0, cap)
    for scale in (0.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="scale must be finite and > 0"):
            torch.ops.pagedlm.paged_attention(out, query, key_cache, value_cache, tables, lens, scale)
    # Found by a hunt: no KV heads, or blocks of no tokens, divided by zero in the kernels (SIGFPE).
    for shape in ((4, 0, 16, 64), (4, 1, 0, 64)):
        empty = torch.zeros(shape, device=device)
        for attend in (lambda: torch.ops.pagedlm.paged_attention(out, query, empty, empty, tables, lens, 0.1),
                       lambda: torch.ops.pagedlm.paged_prefill_attention(
                           out, query, empty, empty, tables, torch.tensor([0, 1], dtype=torch.int32, device=device),
                           lens, 0.1)):
            with pytest.raises(RuntimeError, match="key_cache must be .* each but num_blocks >= 1"):
                attend()
    kv = torch.randn(2, 1, 64, device=device)
    with pytest.raises(RuntimeError, match="slot_mapping must be int64 \\(or int32\\)"):
        torch.ops.pagedlm.reshape_and_cache(kv, kv, key_cache, value_cache, torch.tensor([0.7, 17.9], device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("head_size", [64, 40])  # rows of whole cache lines (streamed where lone) or not
def test_reshape_and_cache(device, dtype, slot_dtype, head_size):
    """Lone slots (decodes, which the CPU kernel streams) and a prompt's run of slots (stored as usual)
    land where the reference puts them."""
    num_blocks, num_kv_heads, block_size, num_tokens = 12, 4, 16, 50
    gen = torch.Generator().manual_seed(0)
    key_cache = torch.full((num_blocks, num_kv_heads, block_size, head_size), float("nan"), dtype=dtype)
    value_cache = key_cache.clone()
    run = torch.arange(5, 25)  # across a block boundary
    lone = torch.randperm(num_blocks * block_size - 32, generator=gen)[: num_tokens - len(run)] + 32
    slots = torch.cat([lone[:10], run, lone[10:]])
    slots[::7] = -1
    kv = torch.randn(num_tokens, 3, num_kv_heads, head_size, generator=gen).to(dtype)
    key, value = kv[:, 1], kv[:, 2]  # views into a fused buffer
    expect_k, expect_v = key_cache.clone(), value_cache.clone()
    reference.reshape_and_cache(key, value, expect_k, expect_v, slots)
    key_cache, value_cache = key_cache.to(device), value_cache.to(device)
    torch.ops.pagedlm.reshape_and_cache(
        key.to(device), value.to(device), key_cache, value_cache, slots.to(slot_dtype).to(device)
    )
    torch.testing.assert_close(key_cache.cpu(), expect_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(value_cache.cpu(), expect_v, rtol=0, atol=0, equal_nan=True)


def block_caches(num_layers, num_blocks, device, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, 2, 8, 64)
    return [torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(num_layers)]


@pytest.mark.parametrize("device", DEVICES)
def test_copy_blocks(device):
    key_caches, value_caches = block_caches(3, 20, device, seed=0), block_caches(3, 20, device, seed=1)
    # Copy-on-write: sources may repeat, destinations are distinct and never sources.
    mapping = torch.tensor([[3, 10], [3, 11], [0, 19], [7, 4]], dtype=torch.int64)
    expect_k, expect_v = [c.clone() for c in key_caches], [c.clone() for c in value_caches]
    reference.copy_blocks(expect_k, expect_v, mapping)
    torch.ops.pagedlm.copy_blocks(key_caches, value_caches, mapping.to(device))
    untouched = [b for b in range(20) if b not in (10, 11, 19, 4)]
    for got, want in zip(key_caches + value_caches, expect_k + expect_v):
        assert torch.equal(got, want)
        assert not torch.equal(got[10], got[12])  # the copy did happen and only there
        assert torch.equal(got[untouched], want[untouched])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and CUDA kernels")
def test_cuda_row_ops_past_the_grids_y_limit():
    """More than 65,535 rows (a long prompt without chunked prefill; many copy pairs): the CUDA
    launchers put rows on the grid's x dimension (y holds 65,535)."""
    rows = 70_000
    x = torch.randn(rows, 2 * 64, device="cuda")
    out = torch.empty(rows, 64, device="cuda")
    torch.ops.pagedlm.silu_and_mul(out, x)
    torch.testing.assert_close(out, torch.nn.functional.silu(x[:, :64]) * x[:, 64:], rtol=2e-6, atol=1e-6)
    caches = [torch.randn(2 * rows, 1, 2, 8, device="cuda") for _ in range(2)]
    mapping = torch.stack([torch.arange(rows), torch.arange(rows, 2 * rows)], dim=1)
    torch.ops.pagedlm.copy_blocks(caches[:1], caches[1:], mapping.cuda())
    for cache in caches:
        assert torch.equal(cache[rows:], cache[:rows])


def test_rejects_contract_violations():
    key_cache, value_cache, tables, lens = paged_kv([20], 16, 2, 64, torch.float32, "cpu", 0)
    query = torch.randn(1, 4, 64)
    out = torch.empty_like(query)
    with pytest.raises(RuntimeError, match="block_tables must be int32"):
        torch.ops.pagedlm.paged_attention(out, query, key_cache, value_cache, tables.long(), lens, 1.0)
    with pytest.raises(RuntimeError, match="query and out dtypes differ"):
        torch.ops.pagedlm.paged_attention(out, query.double(), key_cache, value_cache, tables, lens, 1.0)
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        torch.ops.pagedlm.paged_attention(out, query, key_cache, value_cache, tables[:, :1], lens, 1.0)
    bad_tables = tables.clone()
    bad_tables[0, 1] = key_cache.shape[0]
    with pytest.raises(RuntimeError, match="is not a cache block"):
        torch.ops.pagedlm.paged_attention(out, query, key_cache, value_cache, bad_tables, lens, 1.0)
    with pytest.raises(RuntimeError, match="one query row per sequence"):
        torch.ops.pagedlm.paged_attention(out.repeat(2, 1, 1), query.repeat(2, 1, 1), key_cache, value_cache, tables, lens, 1.0)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.pagedlm.copy_blocks([key_cache], [value_cache], torch.tensor([[0, 99]]))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    key_cache, value_cache, tables, lens = paged_kv([5, 40], 16, 2, 64, torch.float32, device, 0)
    query = torch.randn(2, 4, 64, device=device)
    prompt = torch.randn(7, 4, 64, device=device)
    cu_seqlens_q = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    kv = torch.randn(3, 2, 64, device=device)
    slots = torch.tensor([0, 5, -1], device=device)
    mapping = torch.tensor([[0, 1]], device=device)
    fp8_cache = torch.randn(key_cache.shape, device=device).to(torch.float8_e5m2)
    ops = torch.ops.pagedlm
    samples = [
        (ops.reshape_and_cache.default, (kv, kv.clone(), key_cache.clone(), value_cache.clone(), slots)),
        (ops.paged_attention.default, (torch.empty_like(query), query, key_cache, value_cache, tables, lens, 0.125)),
        (ops.paged_attention.default,
         (torch.empty_like(query), query, key_cache, value_cache, tables, lens, 0.125, 4, 30.0)),
        (
            ops.paged_prefill_attention.default,
            (torch.empty_like(prompt), prompt, key_cache, value_cache, tables, cu_seqlens_q, lens, 0.125),
        ),
        (ops.copy_blocks.default, ([key_cache.clone()], [value_cache.clone()], mapping)),
        (ops.rms_norm.default, (torch.empty(3, 64, device=device), kv[:, 0], torch.randn(64, device=device), 1e-6)),
        (ops.fused_add_rms_norm.default, (kv[:, 0].clone(), kv[:, 1].clone(), torch.randn(64, device=device), 1e-6)),
        (ops.rotary_embedding.default, (torch.tensor([0, 9, 3], device=device), query[:1].expand(3, 4, 64).clone(),
                                        kv.clone(), torch.randn(16, 64, device=device))),
        (ops.gemma_rms_norm.default, (torch.empty(3, 64, device=device), kv[:, 0], torch.randn(64, device=device), 1e-6)),
        (ops.gemma_fused_add_rms_norm.default,
         (kv[:, 0].clone(), kv[:, 1].clone(), torch.randn(64, device=device), 1e-6)),
        (ops.position_scale.default,
         (query.clone(), torch.tensor([0, 5], device=device), torch.randn(8, device=device))),
        (ops.olmo_rms_norm.default,
         (torch.empty(3, 64, device=device), kv[:, 0], torch.randn(64, device=device), 1e-6)),
        (ops.olmo_rms_norm_add.default, (kv[:, 0].clone(), kv[:, 1].clone(), torch.randn(64, device=device), 1e-6)),
        (ops.silu_and_mul.default, (torch.empty(3, 32, device=device), kv[:, 0])),
        (ops.gelu_tanh_and_mul.default, (torch.empty(3, 32, device=device), kv[:, 0])),
        (ops.argmax_logprob.default, (kv[:, 0], torch.empty(3, dtype=torch.int64, device=device),
                                      torch.empty(3, device=device))),
        (ops.argmax.default, (kv[:, 0], torch.empty(3, dtype=torch.int64, device=device))),
        (ops.sample.default, (kv[:, 0], torch.ones(3, device=device), torch.full((3,), 5, device=device),
                              torch.full((3,), 0.9, device=device), torch.zeros(3, device=device),
                              torch.rand(3, device=device), torch.empty(3, dtype=torch.int64, device=device),
                              torch.empty(3, device=device))),
        (ops.sample.default, (kv[:, 0], torch.ones(3, device=device), torch.full((3,), 5, device=device),
                              torch.full((3,), 0.9, device=device), torch.zeros(3, device=device),
                              torch.rand(3, device=device), torch.empty(3, dtype=torch.int64, device=device))),
        (ops.apply_token_bitmask.default, (kv[:, 0].clone(), torch.tensor([2, 0], device=device),
                                           torch.tensor([[5, 0], [-1, 7]], dtype=torch.int32, device=device))),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)
    fp8_samples = [
        (ops.reshape_and_cache.default, (kv, kv.clone(), fp8_cache.clone(), fp8_cache.clone(), slots, 0.5, 2.0)),
        (ops.paged_attention.default,
         (torch.empty_like(query), query, fp8_cache, fp8_cache, tables, lens, 0.125, 0, 0.0, 0.5, 2.0)),
        (ops.paged_prefill_attention.default,
         (torch.empty_like(prompt), prompt, fp8_cache, fp8_cache, tables, cu_seqlens_q, lens, 0.125, 0, 0.0, 0.5, 2.0)),
    ]
    for op, args in fp8_samples:  # the schema check does arithmetic that fp8 tensors lack
        torch.library.opcheck(op, args, test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


# The layer ops must reproduce Hugging Face's eager Llama code: bit for bit where it rounds each op
# (rotary, silu*mul, bf16 RMSNorm), up to fp32 summation order where a sum is involved.
LAYER_DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def assert_matches_hf(out, expected, dtype, what):
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=2e-6, atol=0, msg=what)
    else:
        assert torch.equal(out, expected), f"{what}: differs from Hugging Face's result"


def exact_norm_dtype(device, dtype):
    """The dtype whose check assert_matches_hf applies to a norm: bf16's (bit-equal) on the CPU,
    whose kernel sums in ATen's CPU order; fp32's tolerance for the CUDA kernel."""
    return torch.bfloat16 if device == "cpu" else dtype


def hf_rms_norm(style, x, weight, eps):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = {"llama": LlamaRMSNorm, "gemma": Gemma2RMSNorm}[style](x.shape[-1], eps=eps).to(x.device, x.dtype)
    norm.weight.data.copy_(weight)
    return norm(x)


@pytest.mark.parametrize("device", DEVICES)
@LAYER_DTYPES
# 7: shorter than ATen's 8 lanes (summed as scalars); 20,000: enough vectors that its cascade sum
# spills into its second level.
@pytest.mark.parametrize("hidden", [64, 576, 100, 7, 20000])
@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_rms_norm(device, dtype, hidden, style):
    """Hugging Face's bits in both dtypes on the CPU: the kernel sums the squares in ATen's order."""
    prefix = "gemma_" if style == "gemma" else ""
    gen = torch.Generator().manual_seed(hidden)
    wide = torch.randn(37, 2 * hidden, generator=gen).to(dtype).to(device)
    x = wide[:, :hidden]  # strided rows, as a view of a wider buffer
    weight = torch.randn(hidden, generator=gen).to(dtype).to(device)
    out = torch.full_like(x, float("nan"))
    getattr(torch.ops.pagedlm, f"{prefix}rms_norm")(out, x, weight, 1e-5)
    assert_matches_hf(out, hf_rms_norm(style, x, weight, 1e-5), exact_norm_dtype(device, dtype), f"{prefix}rms_norm")

    # Per head: q's heads as a view into a fused QKV buffer, normalised into a contiguous tensor, each
    # row as the same rows copied out and normalised as [rows, head_size] are.
    qkv = torch.randn(37, 5 * hidden, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    q = qkv[:, : 3 * hidden].view(37, 3, hidden)
    per_head = torch.full((37, 3, hidden), float("nan"), dtype=dtype, device=device)
    getattr(torch.ops.pagedlm, f"{prefix}rms_norm")(per_head, q, weight, 1e-5)
    rows = torch.full((37 * 3, hidden), float("nan"), dtype=dtype, device=device)
    getattr(torch.ops.pagedlm, f"{prefix}rms_norm")(rows, q.reshape(-1, hidden), weight, 1e-5)
    assert torch.equal(per_head.view(-1, hidden), rows), f"{prefix}rms_norm per head differs from its rows"

    residual = torch.randn(37, hidden, generator=gen).to(dtype).to(device)
    expected_residual = x + residual
    x_inout = x.clone()
    getattr(torch.ops.pagedlm, f"{prefix}fused_add_rms_norm")(x_inout, residual, weight, 1e-5)
    assert torch.equal(residual, expected_residual), "fused_add_rms_norm: residual is not input + residual"
    expected = hf_rms_norm(style, expected_residual, weight, 1e-5)
    assert_matches_hf(x_inout, expected, exact_norm_dtype(device, dtype), f"{prefix}fused_add_rms_norm")


@pytest.mark.parametrize("device", DEVICES)
@LAYER_DTYPES
@pytest.mark.parametrize("hidden", [64, 576, 100, 7, 20000])
def test_olmo_rms_norm(device, dtype, hidden):
    """OLMo 2's norm (weight times the normalised row in fp32, rounded once), as transformers'
    Olmo2RMSNorm gives it, on strided rows (q of a fused QKV buffer); olmo_rms_norm_add then adds
    the normalised input into the residual (rounded), as its layers' ``residual + norm(x)``."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(37, 2 * hidden, generator=gen).to(dtype).to(device)[:, :hidden]
    weight = torch.randn(hidden, generator=gen).to(dtype).to(device)
    hf = Olmo2RMSNorm(hidden, eps=1e-5).to(device, dtype)
    hf.weight.data.copy_(weight)
    out = torch.full_like(x, float("nan"))
    torch.ops.pagedlm.olmo_rms_norm(out, x, weight, 1e-5)
    assert_matches_hf(out, hf(x), exact_norm_dtype(device, dtype), "olmo_rms_norm")
    if dtype == torch.bfloat16 and device == "cpu":  # the product is not rounded first (Llama's is)
        llama = torch.empty_like(x)
        torch.ops.pagedlm.rms_norm(llama, x, weight, 1e-5)
        assert not torch.equal(llama, out)
    residual = torch.randn(37, hidden, generator=gen).to(dtype).to(device)
    expected_residual = residual + hf(x)
    x_inout = x.contiguous()
    torch.ops.pagedlm.olmo_rms_norm_add(x_inout, residual, weight, 1e-5)
    assert_matches_hf(x_inout, hf(x), exact_norm_dtype(device, dtype), "olmo_rms_norm_add's input")
    assert_matches_hf(residual, expected_residual, exact_norm_dtype(device, dtype), "olmo_rms_norm_add's residual")


@pytest.mark.parametrize("device", DEVICES)
@LAYER_DTYPES
def test_ministral3_attention_temperature_is_transformers(device, dtype):
    """position_scale with RotaryEmbedding's q_scales table: q rows as transformers' Ministral 3
    scales them (get_llama_4_attn_scale, rounded to q's dtype), past the original length too; k
    untouched."""
    from transformers import Ministral3Config, MistralConfig
    from transformers.models.ministral3.modeling_ministral3 import get_llama_4_attn_scale

    from pagedlm.model_executor.layers.rotary_embedding import RotaryEmbedding

    config = Ministral3Config(hidden_size=128, num_attention_heads=4, head_dim=32, max_position_embeddings=4096,
                              rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                                               "original_max_position_embeddings": 256, "llama_4_scaling_beta": 0.1})
    ours = RotaryEmbedding(32, 4096, config)
    ours.build_cos_sin_cache(torch.device(device), dtype)
    gen = torch.Generator().manual_seed(3)
    positions = torch.cat([torch.arange(0, 4096, 61), torch.tensor([255, 256, 511, 512, 4095])]).to(device)
    q = torch.randn(len(positions), 6, 32, generator=gen).to(dtype).to(device)[:, :4]  # strided rows
    expected = q * get_llama_4_attn_scale(positions[None], 0.1, 256)[0, 0, :, :, None].to(dtype)
    assert not torch.equal(expected, q)  # past 256 the factor is not 1
    torch.ops.pagedlm.position_scale(q, positions, ours.q_scales)
    assert torch.equal(q, expected)
    mistral = MistralConfig(hidden_size=128, num_attention_heads=4, head_dim=32, rope_parameters=config.rope_parameters)
    assert RotaryEmbedding(32, 4096, mistral).q_scales is None  # only Ministral 3 reads llama_4_scaling_beta
    # With LongRoPE a long-factor token's position comes offset by max_position (a crash before).
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 1e6, "original_max_position_embeddings": 256,
                              "short_factor": [1.0] * 16, "long_factor": [2.0] * 16, "llama_4_scaling_beta": 0.1}
    longrope = RotaryEmbedding(32, 4096, config)
    longrope.build_cos_sin_cache(torch.device(device), dtype)
    assert torch.equal(longrope.q_scales, torch.cat([ours.q_scales] * 2))


def test_bf16_rounding_of_the_layer_ops_is_torchs_at_ties_subnormals_overflow_and_nan():
    """The element-wise kernels round fp32 to bf16 as torch does (to nearest even; subnormals kept,
    not flushed as the hardware conversion flushes them; past the largest finite value to inf; NaN to
    torch's 0xffff, not the conversion's quiet NaN): fused_add_rms_norm's residual is bf16(input +
    residual), checked bit for bit on sums that land on every such case, in every vector lane and in a
    partial last vector. A row holds them all, another no NaN and another no subnormal, so that no
    vector's subnormals or NaNs are rounded right only because the other kind sits beside them (the
    kernels convert a vector with neither in hardware)."""
    tiny = 2.0**-133  # bf16 subnormals: 2^-133 is their spacing
    big = torch.finfo(torch.bfloat16).max
    ties = [
        (1.0, 2.0**-8),  # a tie, to even (down)
        (1.0 + 2.0**-7, 2.0**-8),  # a tie, to even (up)
        (1.0, 2.0**-8 + 2.0**-16),  # just past a tie
    ]
    subnormals = [
        (3 * tiny, 2 * tiny), (-5 * tiny, tiny),  # subnormal sums, exact in bf16
        (2.0**-126, -tiny),  # from the smallest normal down into the subnormals
    ]
    overflow = [(big, big), (-big, -big)]  # to +-inf
    nans = [(float("nan"), 1.0), (float("inf"), float("-inf"))]  # NaN in, NaN made
    zeros = [(-0.0, -0.0), (0.0, -0.0)]
    hidden = 45  # two whole vectors of 16 and a partial one
    for cases in (ties + subnormals + overflow + nans + zeros, ties + subnormals + overflow + zeros,
                  ties + overflow + nans + zeros):
        a = torch.tensor([c[0] for c in cases] * 8, dtype=torch.float32)[:hidden]
        b = torch.tensor([c[1] for c in cases] * 8, dtype=torch.float32)[:hidden]
        x, residual = a.to(torch.bfloat16)[None].clone(), b.to(torch.bfloat16)[None].clone()
        expected = (x.float() + residual.float()).to(torch.bfloat16)
        torch.ops.pagedlm.fused_add_rms_norm(x, residual, torch.ones(hidden, dtype=torch.bfloat16), 1e-5)
        assert torch.equal(residual.view(torch.int16), expected.view(torch.int16))  # NaN too: torch's 0xffff


@pytest.mark.parametrize("device", DEVICES)
@LAYER_DTYPES
@pytest.mark.parametrize("head_size", [16, 64, 128])
def test_rotary_embedding(device, dtype, head_size):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from pagedlm.model_executor.layers.rotary_embedding import RotaryEmbedding

    config = LlamaConfig(hidden_size=4 * head_size, num_attention_heads=4, head_dim=head_size,
                         max_position_embeddings=4096, rope_theta=500000.0)
    ours = RotaryEmbedding(head_size, 4096, config)
    ours.build_cos_sin_cache(torch.device(device), dtype)
    gen = torch.Generator().manual_seed(head_size)
    tokens = 29
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(device)
    qkv = torch.randn(tokens, 8 * head_size, generator=gen).to(dtype).to(device)
    q = qkv[:, : 4 * head_size].view(tokens, 4, head_size)
    k = qkv[:, 4 * head_size : 6 * head_size].view(tokens, 2, head_size)
    cos, sin = LlamaRotaryEmbedding(config).to(device)(q, positions[None])
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    untouched = qkv[:, 6 * head_size :].clone()
    torch.ops.pagedlm.rotary_embedding(positions, q, k, ours.cos_sin_cache)
    assert torch.equal(q, hf_q[0].transpose(0, 1)), "rotary_embedding: query differs from Hugging Face's"
    assert torch.equal(k, hf_k[0].transpose(0, 1)), "rotary_embedding: key differs from Hugging Face's"
    assert torch.equal(qkv[:, 6 * head_size :], untouched), "rotary_embedding wrote outside query and key"


@pytest.mark.parametrize("device", DEVICES)
@LAYER_DTYPES
@pytest.mark.parametrize("head_size", [64, 128, 40])
def test_rotary_embedding_with_a_float32_table_is_olmos(device, dtype, head_size):
    """OLMo 2 keeps cos and sin in fp32, so a half-precision q and k rotate in fp32 and round once:
    a float32 table (``RotaryEmbedding(fp32_table=True)``) gives transformers' Olmo2 bits."""
    from transformers import Olmo2Config
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RotaryEmbedding, apply_rotary_pos_emb

    from pagedlm.model_executor.layers.rotary_embedding import RotaryEmbedding

    config = Olmo2Config(hidden_size=4 * head_size, num_attention_heads=4, max_position_embeddings=4096)
    ours = RotaryEmbedding(head_size, 4096, config, fp32_table=True)
    ours.build_cos_sin_cache(torch.device(device), dtype)
    assert ours.cos_sin_cache.dtype == torch.float32
    gen = torch.Generator().manual_seed(head_size)
    positions = torch.randint(0, 4096, (29,), generator=gen).to(device)
    qkv = torch.randn(29, 8 * head_size, generator=gen).to(dtype).to(device)
    q = qkv[:, : 4 * head_size].view(29, 4, head_size)
    k = qkv[:, 4 * head_size : 6 * head_size].view(29, 2, head_size)
    cos, sin = Olmo2RotaryEmbedding(config).to(device)(q, positions[None])
    assert cos.dtype == torch.float32
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_in, k_in = q.clone(), k.clone()
    torch.ops.pagedlm.rotary_embedding(positions, q, k, ours.cos_sin_cache)
    assert torch.equal(q, hf_q[0].transpose(0, 1)) and torch.equal(k, hf_k[0].transpose(0, 1))
    if dtype == torch.bfloat16:  # not what the model-dtype table (Llama's rounding) gives
        torch.ops.pagedlm.rotary_embedding(positions, q_in, k_in, ours.cos_sin_cache.to(dtype))
        assert not torch.equal(q_in, q)


@pytest.mark.parametrize("device", DEVICES)
@LAYER_DTYPES
@pytest.mark.parametrize("d", [64, 1536, 100])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_act_and_mul(device, dtype, d, act):
    from transformers.activations import ACT2FN

    gen = torch.Generator().manual_seed(d)
    x = (4 * torch.randn(37, 2 * d, generator=gen)).to(dtype).to(device)
    out = torch.full((37, d), float("nan"), dtype=dtype, device=device)
    op = {"silu": torch.ops.pagedlm.silu_and_mul, "gelu_pytorch_tanh": torch.ops.pagedlm.gelu_tanh_and_mul}[act]
    op(out, x)
    expected = ACT2FN[act](x[:, :d]) * x[:, d:]  # Llama's SwiGLU, Gemma's GeGLU
    if act == "silu":
        # fp32 tails (d % 16) use a vector exp where torch's scalar tail uses std::exp: ~1 ulp apart.
        assert_matches_hf(out, expected, dtype if d % 16 == 0 else torch.float32, "silu_and_mul")
    else:
        # torch's GELU kernel and ours use different tanh approximations: results are ~1 ulp apart (of
        # fp32, or of bf16 where the activation is rounded), not bit-equal as silu_and_mul is.
        rtol = 2e-6 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(out.float(), expected.float(), rtol=rtol, atol=1e-5, msg="gelu_tanh_and_mul")


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_act_and_mul_every_bf16_gate(act):
    """On CPU a bf16 gate's activation is looked up in a table of all 65,536 bf16 values: every one of
    them, times up values of three magnitudes, gives eager torch's bits (NaN payloads aside)."""
    from transformers.activations import ACT2FN

    gate = torch.arange(-(2**15), 2**15, dtype=torch.int16).view(torch.bfloat16).view(256, 256)
    op = {"silu": torch.ops.pagedlm.silu_and_mul, "gelu_pytorch_tanh": torch.ops.pagedlm.gelu_tanh_and_mul}[act]
    gen = torch.Generator().manual_seed(0)
    for magnitude in (1e-30, 1.0, 1e3):
        up = (magnitude * torch.randn(256, 256, generator=gen)).bfloat16()
        out = torch.empty(256, 256, dtype=torch.bfloat16)
        op(out, torch.cat([gate, up], dim=1))
        expected = ACT2FN[act](gate) * up
        both_nan = out.isnan() & expected.isnan()
        differ = (out.view(torch.int16) != expected.view(torch.int16)) & ~both_nan
        assert not differ.any(), f"{act}: {int(differ.sum())} of 65,536 gates differ from torch at |up| ~ {magnitude}"


_TABLE_UNDER_FLUSH_DENORMAL = """
import pagedlm, torch
from pagedlm import ops
gate = torch.arange(-(2**15), 2**15, dtype=torch.int16).view(torch.bfloat16).view(256, 256)
x = torch.cat([gate, torch.ones(256, 256, dtype=torch.bfloat16)], dim=1)
ops.silu_and_mul(torch.empty(256, 256), x.float())  # the kernels' threads start in the default mode
torch.set_flush_denormal(True)
ops.silu_and_mul(torch.empty(256, 256, dtype=torch.bfloat16), x)  # the first bf16 call builds the table
torch.set_flush_denormal(False)
out = torch.empty(256, 256, dtype=torch.bfloat16)
ops.silu_and_mul(out, x)
print(int(((out.view(torch.int16) != torch.nn.functional.silu(gate).view(torch.int16)) & ~out.isnan()).sum()))
"""


def test_act_and_mul_table_ignores_flush_denormal_at_its_build():
    """The bf16 activation table is built once, by the first call: built while the caller flushed
    subnormals, it still holds them (as eager torch computes them without flushing)."""
    result = subprocess.run([sys.executable, "-c", _TABLE_UNDER_FLUSH_DENORMAL], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split()[-1] == "0", result.stdout + result.stderr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 5, 3000])
def test_gather_rows(device, dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    table = torch.randn(400, 2 * 96, generator=gen).to(dtype).to(device)[:, :96]  # a row stride of 192
    index = torch.randint(0, 400, (rows,), generator=gen)
    index[0] = 399
    out = torch.full((rows, 96), float("nan"), dtype=dtype, device=device)
    torch.ops.pagedlm.gather_rows(out, table, index.to(device))
    assert torch.equal(out, table[index.to(device)])


def test_gather_rows_rejects_bad_indices():
    table, out = torch.randn(10, 8), torch.empty(3, 8)
    for bad in (10, -1):
        with pytest.raises(RuntimeError, match=rf"index\[2\] = {bad} is out of range for input with 10 rows"):
            torch.ops.pagedlm.gather_rows(out, table, torch.tensor([0, 1, bad]))
    with pytest.raises(RuntimeError, match="index must be a contiguous int64"):
        torch.ops.pagedlm.gather_rows(out, table, torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="out must be \\[n, d\\]"):
        torch.ops.pagedlm.gather_rows(torch.empty(2, 8), table, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="single memory location"):  # out overlapping input
        torch.ops.pagedlm.gather_rows(table[:3], table, torch.tensor([5, 0, 1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("numel", [1, 17, 4096 * 33, 49152 * 8 + 5])
def test_scalings_are_eager_torchs(device, dtype, numel):
    """Every element as eager torch computes it with a Python float (tails of the vector loop too)."""
    x = (30 * torch.randn(numel, generator=torch.Generator().manual_seed(numel))).to(dtype).to(device)
    normaliser = torch.tensor(576**0.5, dtype=dtype).item()  # Gemma's, rounded to the dtype
    for factor, divide, expected in [(0.22, False, x * 0.22), (normaliser, False, x * normaliser),
                                     (3.7, True, x / 3.7), (1 / 3.7, True, x / (1 / 3.7))]:
        out = x.clone()
        torch.ops.pagedlm.scale(out, factor, divide)
        assert torch.equal(out, expected), (factor, divide)
    for cap in (30.0, 5.5):
        out = x.clone()
        torch.ops.pagedlm.soft_cap(out, cap)
        assert torch.equal(out, torch.tanh(x / cap) * cap), cap


def test_scalings_reject_bad_arguments():
    for call, message in [
        (lambda: torch.ops.pagedlm.scale(torch.ones(4, 3).t(), 2.0), "scale: x must be contiguous"),
        (lambda: torch.ops.pagedlm.scale(torch.ones(3, dtype=torch.int32), 2.0),
         "scale: x must be float32, bfloat16 or float16; got Int"),
        (lambda: torch.ops.pagedlm.scale(torch.ones(3), 0.0), "scale: factor must be finite and nonzero; got 0"),
        (lambda: torch.ops.pagedlm.scale(torch.ones(3), float("inf")), "scale: factor must be finite and nonzero"),
        (lambda: torch.ops.pagedlm.soft_cap(torch.ones(3), -1.0), "soft_cap: cap must be finite and positive; got -1"),
        (lambda: torch.ops.pagedlm.soft_cap(torch.ones(3, dtype=torch.int32), 2.0),
         "soft_cap: x must be float32, bfloat16 or float16"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            call()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("vocab", [49152, 1000, 37])
def test_argmax_logprob(device, dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    wide = (3 * torch.randn(9, vocab + 5, generator=gen)).to(dtype)
    wide[0, 3] = wide[0, vocab - 2] = 40  # a tie: the first index wins, as in torch.argmax
    wide[1, vocab - 1] = 50  # the maximum in the last (tail) element
    wide[2, :vocab] = -1e4  # all-equal row, far from zero
    logits = wide[:, :vocab].to(device)  # strided rows
    token_ids = torch.full((9,), -1, dtype=torch.int64, device=device)
    logprobs = torch.full((9,), float("nan"), device=device)
    torch.ops.pagedlm.argmax_logprob(logits, token_ids, logprobs)
    expected = torch.log_softmax(logits.float(), dim=-1)
    assert torch.equal(token_ids, logits.float().argmax(dim=-1))
    assert token_ids[0] == 3 and token_ids[2] == 0
    alone = torch.full_like(token_ids, -1)
    torch.ops.pagedlm.argmax(logits, alone)
    assert torch.equal(alone, token_ids)
    torch.testing.assert_close(logprobs, expected.gather(1, token_ids[:, None]).squeeze(1), rtol=0, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_ops_give_nan_for_rows_without_a_softmax(device):
    """A row with a NaN, an infinite maximum or only -inf (every token masked) has no softmax: each
    of the three ops reports NaN, so a row's cumulative logprob does not depend on which op the rest
    of the batch sends it through (the CPU argmax_logprob gave -inf for such rows)."""
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    logits[1, 7] = float("nan")
    logits[2, 9] = float("inf")
    logits[3] = float("-inf")
    logits = logits.to(device)
    n, ids = logits.shape[0], torch.zeros(5, dtype=torch.int64, device=device)
    argmax_lp, sample_lp, top_lp = (torch.empty(n, device=device) for _ in range(3))
    torch.ops.pagedlm.argmax_logprob(logits, torch.empty_like(ids), argmax_lp)
    ones = torch.ones(n, device=device)
    torch.ops.pagedlm.sample(logits, ones, torch.full((n,), 300, device=device), ones, 0 * ones, 0.5 * ones,
                             torch.empty_like(ids), sample_lp)
    torch.ops.pagedlm.top_logprobs(logits, ids, top_lp, torch.empty_like(ids), torch.empty(n, 2, device=device),
                                   torch.empty(n, 2, dtype=torch.int64, device=device))
    for lp in (argmax_lp, sample_lp, top_lp):
        assert lp[1:4].isnan().all() and lp[[0, 4]].isfinite().all(), lp


@pytest.mark.parametrize("device", DEVICES)
def test_rows_without_a_softmax_take_torch_argmax_token(device):
    """argmax_logprob, argmax and sample (any temperature, with or without logprobs) take
    torch.argmax's token in a row with no softmax: its first NaN (a NaN counts above every number),
    else the first infinite maximum. A NaN in the kernels' vector part, their scalar tail, or both;
    +inf; all -inf."""
    logits = torch.randn(7, 301, generator=torch.Generator().manual_seed(1))
    logits[0, 5] = float("nan")    # vector part
    logits[1, 300] = float("nan")  # the tail past the last full vector
    logits[2, [40, 299]] = float("nan")
    logits[3, [8, 200]] = float("inf")
    logits[4] = float("-inf")
    logits[5, 0] = float("nan")
    logits[5, 1] = float("inf")
    logits = logits.to(device)
    expected = logits.argmax(dim=-1)
    assert expected[:6].tolist() == [5, 300, 40, 8, 0, 0]
    n = logits.shape[0]
    ids, lp = torch.empty(n, dtype=torch.int64, device=device), torch.empty(n, device=device)
    torch.ops.pagedlm.argmax_logprob(logits, ids, lp)
    assert torch.equal(ids[:6], expected[:6]) and lp[:6].isnan().all()
    torch.ops.pagedlm.argmax(logits, ids)
    assert torch.equal(ids[:6], expected[:6])
    for temperature in (0.0, 0.7):
        t = torch.full((n,), temperature, device=device)
        args = (logits, t, torch.full((n,), 301, device=device), torch.ones(n, device=device),
                torch.zeros(n, device=device), torch.full((n,), 0.5, device=device))
        torch.ops.pagedlm.sample(*args, ids, lp)
        assert torch.equal(ids[:6], expected[:6]) and lp[:6].isnan().all(), (temperature, ids)
        torch.ops.pagedlm.sample(*args, ids)  # without logprobs: has_softmax tells the rows apart
        assert torch.equal(ids[:6], expected[:6]), (temperature, ids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("vocab", [49152, 1000, 37, 64])
def test_apply_token_bitmask(device, dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    wide = torch.randn(6, vocab + 3, generator=gen).to(dtype)
    logits = wide[:, :vocab].to(device)  # strided rows
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (4, words + 1), generator=gen, dtype=torch.int32)
    bitmask[1], bitmask[2] = -1, 0  # every token allowed; none
    bitmask[3, ::2] = 0x00010001  # words with few tokens allowed
    bitmask = bitmask.to(device)
    rows = torch.tensor([4, 0, 5, 2], device=device)
    expected = logits.clone()
    tokens = torch.arange(vocab, device=device)
    allowed = ((bitmask[:, tokens // 32] >> (tokens % 32).to(torch.int32)) & 1).bool()
    expected[rows] = expected[rows].masked_fill(~allowed, float("-inf"))
    before = wide.clone()
    torch.ops.pagedlm.apply_token_bitmask(logits, rows, bitmask)  # words past the vocabulary are not read
    assert torch.equal(logits, expected)
    if device == "cpu":
        assert torch.equal(wide[:, vocab:], before[:, vocab:])  # nothing past a row's vocabulary written
    with pytest.raises(RuntimeError, match=r"rows\[0\] = 6: must be in \[0, 6\)"):
        torch.ops.pagedlm.apply_token_bitmask(logits, torch.tensor([6], device=device), bitmask[:1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("vocab", [49152, 1000, 37])
@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_top_logprobs(device, dtype, vocab, k):
    gen = torch.Generator().manual_seed(vocab + k)
    wide = (3 * torch.randn(9, vocab + 5, generator=gen)).to(dtype)
    wide[3:6, :vocab] = torch.randint(-4, 5, (3, vocab), generator=gen).to(dtype)  # many ties
    wide[6, vocab - 1] = 50  # the maximum in the last (tail) element
    wide[7, :vocab] = -1e4  # all-equal row, far from zero
    logits = wide[:, :vocab].to(device)  # strided rows
    token_ids = torch.randint(0, vocab, (9,), generator=gen).to(device)
    token_ids[6] = vocab - 1

    def run(op):
        out = (torch.full((9,), float("nan"), device=device), torch.full((9,), -1, dtype=torch.int64, device=device),
               torch.full((9, k), float("nan"), device=device), torch.full((9, k), -1, dtype=torch.int64, device=device))
        op(logits, token_ids, *out)
        return out

    logprobs, ranks, top, ids = run(torch.ops.pagedlm.top_logprobs)
    ref_logprobs, ref_ranks, ref_top, ref_ids = run(reference.top_logprobs)
    expected = torch.log_softmax(logits.float(), dim=-1)
    torch.testing.assert_close(logprobs, expected.gather(1, token_ids[:, None]).squeeze(1), rtol=0, atol=2e-5)
    torch.testing.assert_close(top, ref_top, rtol=0, atol=2e-5)
    assert torch.equal(ids, ref_ids)  # ties in token order, whatever the rows around
    assert torch.equal(ranks, ref_ranks)
    # vLLM's rank: how many tokens are at least as likely, itself included (a tie ranks last of its group).
    assert torch.equal(ranks, (expected >= expected.gather(1, token_ids[:, None])).sum(dim=-1))
    assert ranks[7] == vocab
    # The argmax_logprob kernel's formula: the first maximum's entry is its logprob, bit for bit.
    argmax, argmax_logprob = torch.empty_like(token_ids), torch.empty_like(logprobs)
    torch.ops.pagedlm.argmax_logprob(logits, argmax, argmax_logprob)
    if k:
        assert torch.equal(ids[:, 0], argmax) and torch.equal(top[:, 0], argmax_logprob)
    assert ranks[6] == 1 and logprobs[6] == argmax_logprob[6]


@pytest.mark.parametrize("device", DEVICES)
def test_top_logprobs_of_a_row_without_a_softmax(device):
    """NaN, all -inf and +inf rows: NaN log-probabilities, rank 1, ids 0 .. k - 1 (kernel and reference)."""
    logits = torch.randn(4, 40)
    logits[0, 7] = float("nan")
    logits[1] = float("-inf")
    logits[2, 3] = float("inf")
    logits = logits.to(device)
    for op in (torch.ops.pagedlm.top_logprobs, reference.top_logprobs):
        out = (torch.empty(4, device=device), torch.empty(4, dtype=torch.int64, device=device),
               torch.empty(4, 3, device=device), torch.empty(4, 3, dtype=torch.int64, device=device))
        op(logits, torch.tensor([7, 0, 3, 5], device=device), *out)
        logprobs, ranks, top, ids = out
        assert logprobs[:3].isnan().all() and top[:3].isnan().all() and (ranks[:3] == 1).all()
        assert ids[:3].tolist() == [[0, 1, 2]] * 3
        assert logprobs[3].isfinite() and top[3].isfinite().all()


def test_top_logprobs_rejects_bad_arguments():
    logits, ids = torch.randn(2, 10), torch.tensor([1, 10])
    out = (torch.empty(2), torch.empty(2, dtype=torch.int64), torch.empty(2, 3), torch.empty(2, 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"token_ids\[1\] = 10 is not in \[0, 10\)"):
        torch.ops.pagedlm.top_logprobs(logits, ids, *out)
    with pytest.raises(RuntimeError, match=r"top_logprobs must be a contiguous float32 \[num_rows, k\] with k <= vocab"):
        torch.ops.pagedlm.top_logprobs(logits, torch.tensor([1, 2]), out[0], out[1], torch.empty(2, 11),
                                       torch.empty(2, 11, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="top_ids must be a contiguous int64 tensor shaped as top_logprobs"):
        torch.ops.pagedlm.top_logprobs(logits, torch.tensor([1, 2]), out[0], out[1], out[2], torch.empty(2, 3))


def sample_case(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int):
    """Logits and per-row parameters mixing greedy rows, top-k, top-p, min-p and all together."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, vocab, generator=gen)).to(dtype)
    temperatures = 0.1 + 1.5 * torch.rand(rows, generator=gen)
    temperatures[::7] = 0
    top_ks = torch.randint(1, 100, (rows,), generator=gen)
    top_ks[::3] = vocab
    top_ps = 0.1 + 0.9 * torch.rand(rows, generator=gen)
    top_ps[::4] = 1.0
    min_ps = torch.where(torch.arange(rows) % 5 == 0, 0.05, 0.0)
    uniforms = torch.rand(rows, generator=gen)
    return [t.to(device) for t in (logits, temperatures, top_ks, top_ps, min_ps, uniforms)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [49152, 1000, 37])
def test_sample_equals_reference(device, dtype, vocab):
    args = sample_case(120, vocab, dtype, device, vocab)
    got = [torch.empty(120, dtype=torch.int64, device=device), torch.empty(120, device=device)]
    want = [torch.empty(120, dtype=torch.int64, device=device), torch.empty(120, device=device)]
    torch.ops.pagedlm.sample(*args, *got)
    reference.sample(*args, *want)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=2e-5)
    without_logprobs = torch.empty_like(got[0])  # the kernel skips the log-sum: the same tokens
    torch.ops.pagedlm.sample(*args, without_logprobs)
    assert torch.equal(without_logprobs, got[0])
    greedy = args[1] == 0
    assert torch.equal(got[0][greedy], args[0].float().argmax(dim=-1)[greedy])


@pytest.mark.parametrize("device", DEVICES)
def test_sample_equals_reference_where_the_cut_lies_among_the_tiny_entries(device):
    """The CPU kernel looks for the top-k and top-p thresholds among the entries within 2^-12 of the
    top one first, then within 2^-24, then among all of them: a few large logits over a tail of
    49,000 small ones whose mass outweighs them (top-p 0.9 then cuts inside the tail), or too far
    below them for 2^-24 whose count top-k needs, beside rows whose cut lies among the large ones."""
    gen = torch.Generator().manual_seed(7)
    rows, vocab = 64, 49152
    logits = torch.rand(rows, vocab, generator=gen) * 3 - 2  # tail: p in (2^-24, 2^-12) of the top at temperature 1
    logits[2::4] -= 7  # p < 2^-24
    logits[:, :5] = 10 + torch.rand(rows, 5, generator=gen)
    top_ps = torch.tensor([0.9, 0.5, 1.0, 0.99] * (rows // 4))
    top_ks = torch.tensor([vocab, vocab, 20000, 3] * (rows // 4))
    uniforms = torch.rand(rows, generator=gen)
    uniforms[2::4] = 1 - 1e-6  # past the large entries' mass: the pick lies in what top-k kept of the tail
    args = [t.to(device) for t in (logits, torch.ones(rows), top_ks, top_ps, torch.zeros(rows), uniforms)]
    got = [torch.empty(rows, dtype=torch.int64, device=device), torch.empty(rows, device=device)]
    want = [torch.empty(rows, dtype=torch.int64, device=device), torch.empty(rows, device=device)]
    torch.ops.pagedlm.sample(*args, *got)
    reference.sample(*args, *want)
    assert torch.equal(got[0], want[0])
    assert (got[0][0::4] >= 5).any() and (got[0][1::4] < 5).all() and (got[0][3::4] < 5).all()
    assert (got[0][2::4] >= 5).all()


def _lane_sum(p: np.ndarray) -> float:
    """The CPU sample kernel's sum of a 512-entry chunk (threshold 0): 16 lanes in double, then in order."""
    lanes = np.zeros(16)
    for i in range(0, len(p) // 16 * 16, 16):
        lanes += p[i:i + 16].astype(np.float64)
    total = 0.0
    for lane in lanes:
        total += lane
    return total


def test_sample_never_picks_a_token_without_probability_where_rounding_leaves_the_walk_short():
    """Found by a reviewer: the inverse CDF adds 512-entry chunks' vector sums, then walks the
    crossing chunk token by token; a target between the walk's total and the chunk's sum left the
    walk short, and the kernel returned the chunk's last token, a -inf one. Two chunks: tiny
    logits, twelve -inf ones closing the first, the second a copy whose one entry is nudged until
    half the total falls in that gap (a search over the kernel's own summation order)."""
    rng = np.random.default_rng(1)
    x = np.full(1024, -np.inf, dtype=np.float32)
    while True:
        x[0], x[1:500] = 0.0, rng.uniform(-40, -18, 499).astype(np.float32)
        x[512:] = x[:512]
        p = torch.exp(torch.from_numpy(x)).numpy()  # the kernel's exp (Sleef's, as torch's)
        walk = 0.0
        for v in p[:512]:
            walk += float(v)
        if _lane_sum(p[:512]) > walk:
            break
    nudged = 512 + next(i for i in range(1, 500) if 1e-12 < p[i] < 1e-10)
    for _ in range(20000):
        p = torch.exp(torch.from_numpy(x)).numpy()
        target = 0.5 * (_lane_sum(p[:512]) + _lane_sum(p[512:]))
        if walk <= target < _lane_sum(p[:512]):
            break
        x[nudged] = np.nextafter(x[nudged], np.float32(-np.inf if target >= _lane_sum(p[:512]) else np.inf))
    assert walk <= target < _lane_sum(p[:512])
    logits = torch.from_numpy(x)[None]
    token_ids, logprobs = torch.empty(1, dtype=torch.int64), torch.empty(1)
    torch.ops.pagedlm.sample(logits, torch.ones(1), torch.tensor([1024]), torch.ones(1), torch.zeros(1),
                             torch.tensor([0.5]), token_ids, logprobs)
    assert torch.isfinite(logits[0, token_ids[0]]) and torch.isfinite(logprobs[0]), token_ids


@pytest.mark.parametrize("device", DEVICES)
def test_sample_follows_the_kept_distribution(device):
    """Uniforms spread evenly over [0, 1) must pick each kept token in proportion to its
    renormalised probability, and never a token that top-k, top-p or min-p removed."""
    probs = torch.tensor([0.3, 0.02, 0.25, 0.15, 0.1, 0.08, 0.06, 0.04])
    logits = probs.log()[None].expand(4000, -1).contiguous().to(device)
    uniforms = ((torch.arange(4000) + 0.5) / 4000).to(device)
    cases = {  # (top_k, top_p, min_p) -> kept token ids
        (8, 1.0, 0.0): [0, 1, 2, 3, 4, 5, 6, 7],
        (3, 1.0, 0.0): [0, 2, 3],
        (8, 0.65, 0.0): [0, 2, 3],  # 0.3 + 0.25 = 0.55 < 0.65, so 0.15 joins and reaches it
        (8, 0.5, 0.0): [0, 2],  # 0.3 < 0.5 <= 0.3 + 0.25
        (4, 0.9, 0.0): [0, 2, 3, 4],  # top-p over the top-k's 0.8 of mass: 0.72 needs all four
        (8, 1.0, 0.3): [0, 2, 3, 4],  # min_p keeps p >= 0.3 * 0.3
    }
    for (top_k, top_p, min_p), kept in cases.items():
        token_ids = torch.empty(4000, dtype=torch.int64, device=device)
        logprobs = torch.empty(4000, device=device)
        full = lambda v, dtype=torch.float32: torch.full((4000,), v, dtype=dtype, device=device)
        torch.ops.pagedlm.sample(logits, full(1.0), full(top_k, torch.int64), full(top_p), full(min_p), uniforms, token_ids, logprobs)
        counts = torch.bincount(token_ids.cpu(), minlength=8).double() / 4000
        expected = torch.zeros(8, dtype=torch.float64)
        expected[kept] = probs[kept].double() / probs[kept].sum()
        torch.testing.assert_close(counts, expected, rtol=0, atol=1.01 / 4000, msg=f"top_k={top_k} top_p={top_p} min_p={min_p}")
        torch.testing.assert_close(logprobs.cpu(), probs.log()[token_ids.cpu()], rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_rows_without_a_distribution(device):
    """A row whose maximum is +inf (a processor forcing a token), -inf or NaN is taken greedily,
    whatever top-k/top-p/min-p ask, instead of reading garbage thresholds."""
    logits = torch.zeros(3, 40)
    logits[0, 7] = float("inf")
    logits[1] = float("-inf")
    logits[2, 3] = float("nan")
    args = [t.to(device) for t in (logits, torch.ones(3), torch.full((3,), 5), torch.full((3,), 0.9),
                                   torch.full((3,), 0.1), torch.full((3,), 0.5))]
    token_ids = torch.empty(3, dtype=torch.int64, device=device)
    torch.ops.pagedlm.sample(*args, token_ids, torch.empty(3, device=device))
    assert token_ids[0] == 7 and token_ids[1] == 0 and 0 <= token_ids[2] < 40


@pytest.mark.parametrize("device", DEVICES)
def test_sample_a_maximum_that_overflows_once_tempered(device):
    """Found by a hunt: a finite maximum that overflows float32 divided by the temperature (a huge
    logit_bias over a small repetition_penalty) made every probability NaN, and the kernels picked
    token 0. Every other token's probability underflows to 0 there: the maximum's token, or one of
    the tokens tied at it, alike (found by a review: the first of them always)."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    logits[:, 17] = torch.tensor([1e37, 3e38, 4e36, -1e38])
    logits[3] = -3e38
    logits[3, 29] = -1e38
    args = [t.to(device) for t in (logits, torch.tensor([0.01, 0.5, 0.01, 0.01]), torch.full((4,), 300),
                                   torch.full((4,), 0.9), torch.zeros(4), torch.full((4,), 0.7))]
    for sample in (torch.ops.pagedlm.sample, reference.sample):
        token_ids = torch.empty(4, dtype=torch.int64, device=device)
        sample(*args, token_ids)
        assert token_ids.tolist() == [17, 17, 17, 29]
    tied = torch.zeros(400, 50)
    tied[:, [3, 5, 40]] = 1e37
    args = [t.to(device) for t in (tied, torch.full((400,), 0.01), torch.full((400,), 50), torch.ones(400),
                                   torch.zeros(400), torch.rand(400, generator=torch.Generator().manual_seed(1)))]
    picks = []
    for sample in (torch.ops.pagedlm.sample, reference.sample):
        token_ids = torch.empty(400, dtype=torch.int64, device=device)
        sample(*args, token_ids)
        picks.append(token_ids)
    assert torch.equal(picks[0], picks[1])
    counts = torch.bincount(picks[0].cpu(), minlength=50)
    assert counts.sum() == counts[[3, 5, 40]].sum() and counts[[3, 5, 40]].min() > 100


@pytest.mark.parametrize("field,value,message", [
    (1, -0.5, "temperatures"), (1, float("nan"), "temperatures"), (2, 0, "top_ks"), (3, 0.0, "top_ps"),
    (3, 1.5, "top_ps"), (4, 1.5, "min_ps"), (5, 1.0, "uniforms"),
])
def test_sample_rejects_out_of_range_parameters(field, value, message):
    args = [torch.zeros(2, 40), torch.ones(2), torch.full((2,), 5), torch.full((2,), 0.9), torch.zeros(2),
            torch.full((2,), 0.5)]
    args[field][1] = value
    with pytest.raises(RuntimeError, match=rf"{message}\[1\]"):
        torch.ops.pagedlm.sample(*args, torch.empty(2, dtype=torch.int64), torch.empty(2))


@pytest.mark.parametrize(
    "op",
    [reference.argmax_logprob, reference.rms_norm, reference.fused_add_rms_norm, reference.gemma_rms_norm,
     reference.gemma_fused_add_rms_norm, reference.rotary_embedding, reference.silu_and_mul, reference.gelu_tanh_and_mul,
     reference.gather_rows],
    ids=lambda op: op.__name__,
)
def test_layer_reference_equals_kernel(op):
    """The reference is the fallback backend: it must compute what the kernels compute."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen).bfloat16()
    w = torch.randn(64, generator=gen).bfloat16()
    table = torch.randn(8, 32, generator=gen).bfloat16()
    args = {
        "rms_norm": lambda: (torch.empty(5, 64).bfloat16(), x, w, 1e-6),
        "fused_add_rms_norm": lambda: (x.clone(), x.flip(0).clone(), w, 1e-6),
        "gemma_rms_norm": lambda: (torch.empty(5, 64).bfloat16(), x, w, 1e-6),
        "gemma_fused_add_rms_norm": lambda: (x.clone(), x.flip(0).clone(), w, 1e-6),
        "rotary_embedding": lambda: (torch.tensor([0, 3, 7, 1, 2]), x.view(5, 2, 32).clone(), x.flip(0).view(5, 2, 32).clone(), table),
        "silu_and_mul": lambda: (torch.empty(5, 32).bfloat16(), x),
        "gelu_tanh_and_mul": lambda: (torch.empty(5, 32).bfloat16(), x),
        "argmax_logprob": lambda: (x, torch.empty(5, dtype=torch.int64), torch.empty(5)),
        "gather_rows": lambda: (torch.empty(3, 64).bfloat16(), x, torch.tensor([4, 0, 4])),
    }[op.__name__]
    ours, theirs = args(), args()
    getattr(torch.ops.pagedlm, op.__name__)(*ours)
    op(*theirs)
    for a, b in zip(ours, theirs):
        if isinstance(a, torch.Tensor):  # bit-equal, except fp32 logprobs (different exp)
            torch.testing.assert_close(a, b, rtol=0, atol=2e-5 if a.dtype == torch.float32 else 0)


def _without_backend_variables():
    return {k: v for k, v in os.environ.items()
            if k not in ("PAGEDLM_OPS_BACKEND", "PAGEDLM_ATTENTION_BACKEND", "PAGEDLM_DISABLE_AMX")}


@pytest.mark.parametrize("forced", [False, True])
def test_backend_selection(forced):
    env = _without_backend_variables()
    if forced:
        env["PAGEDLM_OPS_BACKEND"] = "torch-reference"
    probe = "import pagedlm.ops as o; print(o.EXTENSION_LOADED, o.backend_for('cpu'), o.paged_attention.__module__)"
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    expected = "False torch-reference pagedlm.ops.reference" if forced else "True cpu torch._ops.pagedlm"
    assert result.stdout.split() == expected.split()


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("PAGEDLM_OPS_BACKEND", "cpu", "PAGEDLM_OPS_BACKEND='cpu': the only accepted value is 'torch-reference'"),
        ("PAGEDLM_ATTENTION_BACKEND", "torch-reference", "PAGEDLM_ATTENTION_BACKEND was renamed to PAGEDLM_OPS_BACKEND"),
        ("PAGEDLM_DISABLE_AMX", "true", "PAGEDLM_DISABLE_AMX='true': the accepted values are '0' and '1'"),
    ],
)
def test_backend_variable_errors(name, value, message):
    env = {**_without_backend_variables(), name: value}
    result = subprocess.run([sys.executable, "-c", "import pagedlm.ops"], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and f"ValueError: {message}" in result.stderr
