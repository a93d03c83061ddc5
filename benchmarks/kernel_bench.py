"""Paged-attention kernels: the pagedlm._C kernels against the torch reference (decode) or their
FLOP rate against the machine's matmul peak (prefill).

Decode attention reads every cached K/V byte of the batch once, so it is memory bound: the table
reports the bytes of K/V read per call, the achieved GB/s and that as a fraction of this machine's
copy bandwidth (a 1 GiB ``tensor.copy_``, read + write), measured in the same run. With ``--layers
N`` a call is one pass over N layers' caches (each its own blocks and tables), as a decode step
makes: one layer's cache alone may stay in a large L3 (480 MB on the AMX Xeon) between calls.
Each sequence's blocks are scattered over the cache; with ``--block-run N`` they lie in runs of N
consecutive blocks (longer contiguous reads, which the memory system streams faster).

Prefill attention of one long prompt is compute bound: the table reports its causal Q·Kᵀ and P·V
FLOPs (2 · 2 · heads · head_size · n(n+1)/2) per second as a share of a 4096³ ``torch.matmul`` in the
same dtype, measured in the same run, and the same for torch's SDPA (its flash-attention CPU kernel,
what transformers' ``sdpa`` runs) on the same K/V, gathered into contiguous tensors.

    python benchmarks/kernel_bench.py                # decode, CPU, bf16 and fp32
    python benchmarks/kernel_bench.py --dtypes bf16 --kv-cache-dtypes auto,fp8_e4m3
    python benchmarks/kernel_bench.py --dtypes bf16 --num-heads 9 --num-kv-heads 3 --head-size 64 \
        --num-seqs 256 --min-context 100 --max-context 200 --layers 30 --reference-iters 0   # SmolLM2
    python benchmarks/kernel_bench.py --device cuda
    python benchmarks/kernel_bench.py --mode prefill --dtypes bf16 --prompt-lens 2048,8192
    python benchmarks/kernel_bench.py --mode prefill --dtypes bf16 --prompt-lens 8192 --chunk 2048
"""

import argparse
import math
import time

import torch

import pagedlm.ops as ops
from pagedlm.ops import reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def timeit(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Fastest seconds per call: the least disturbed by whatever else the machine is running."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(device: torch.device, iters: int) -> float:
    """Bytes per second of a 1 GiB tensor.copy_, counting the read and the write."""
    size = 1 << 30
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    seconds = timeit(lambda: dst.copy_(src), device, iters, warmup=1)
    del src, dst
    return 2 * size / seconds


def make_batch(args, dtype: torch.dtype, cache_dtype: torch.dtype, device: torch.device, generator: torch.Generator):
    seq_lens = torch.randint(args.min_context, args.max_context + 1, (args.num_seqs,), generator=generator)
    blocks_per_seq = (seq_lens + args.block_size - 1) // args.block_size
    # Scatter every sequence's blocks over the cache, as after a while of serving: each sequence's
    # in runs of --block-run consecutive cache blocks (1: each block on its own), its runs placed
    # at random among everyone's.
    run = args.block_run
    runs_per_seq = [-(-n // run) for n in blocks_per_seq.tolist()]
    order = torch.randperm(sum(runs_per_seq), generator=generator)
    num_blocks = sum(runs_per_seq) * run
    max_blocks = max(runs_per_seq) * run
    block_tables = torch.zeros(args.num_seqs, max_blocks, dtype=torch.int32)
    first = 0
    for i, count in enumerate(runs_per_seq):
        starts = order[first : first + count] * run
        block_tables[i, : count * run] = (starts[:, None] + torch.arange(run)).flatten()
        first += count
    shape = (num_blocks, args.num_kv_heads, args.block_size, args.head_size)
    key_cache = torch.randn(shape, generator=generator).to(cache_dtype).to(device)
    value_cache = torch.randn(shape, generator=generator).to(cache_dtype).to(device)
    query = torch.randn(args.num_seqs, args.num_heads, args.head_size, generator=generator).to(dtype).to(device)
    kv_bytes = 2 * int(seq_lens.sum()) * args.num_kv_heads * args.head_size * key_cache.element_size()
    seq_lens = seq_lens.to(torch.int32).to(device)
    return query, key_cache, value_cache, block_tables.to(device), seq_lens, kv_bytes


def matmul_peak(dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of a 4096^3 torch.matmul, the fastest of 4 calls. In fp32 for bf16 on a CPU whose oneDNN
    has no bf16 (AVX2): pagedlm's bf16 linears run fp32 FMAs there (ops.bf16_fma_linear), and torch's
    bf16 matmul runs at a few GFLOP/s (minutes for these four calls)."""
    if dtype == torch.bfloat16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtype = torch.float32
    a = torch.randn(4096, 4096, device=device).to(dtype)
    return 2 * 4096**3 / timeit(lambda: a @ a, device, iters=4, warmup=1)


def chunked_prefill(out, query, key_cache, value_cache, tables, scale: float, chunk: int) -> None:
    """The prompt as chunked prefill runs it: each chunk's queries over the cached prefix and itself."""
    n = query.shape[0]
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        cu_seqlens_q = torch.tensor([0, end - start], dtype=torch.int32, device=query.device)
        seq_lens = torch.tensor([end], dtype=torch.int32, device=query.device)
        ops.paged_prefill_attention(out[start:end], query[start:end], key_cache, value_cache, tables, cu_seqlens_q,
                                    seq_lens, scale)


def prefill(args, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(args.seed)
    group = args.num_heads // args.num_kv_heads
    print(
        f"prefill paged attention on {device}, {torch.get_num_threads()} threads: one prompt, "
        f"{args.num_heads} q heads / {args.num_kv_heads} kv heads, head size {args.head_size}, block size {args.block_size}\n"
    )
    header = f"{'dtype':<6} {'tokens':>7} {'pagedlm ms':>11} {'GFLOP/s':>8} {'% peak':>7} {'sdpa ms':>9} {'% peak':>7} {'sdpa/pagedlm':>13}"
    if args.chunk:
        header += f" {f'{args.chunk}-token chunks ms':>22} {'chunked/one pass':>17}"
    print(header)
    print("-" * len(header))
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        peak = matmul_peak(dtype, device)
        for n in (int(x) for x in args.prompt_lens.split(",")):
            num_blocks = (n + args.block_size - 1) // args.block_size
            shape = (num_blocks, args.num_kv_heads, args.block_size, args.head_size)
            key_cache = torch.randn(shape, generator=generator).to(dtype).to(device)
            value_cache = torch.randn(shape, generator=generator).to(dtype).to(device)
            table = torch.randperm(num_blocks, generator=generator).to(torch.int32)
            query = torch.randn(n, args.num_heads, args.head_size, generator=generator).to(dtype).to(device)
            out = torch.empty_like(query)
            cu_seqlens_q = torch.tensor([0, n], dtype=torch.int32, device=device)
            seq_lens = torch.tensor([n], dtype=torch.int32, device=device)
            tables = table[None].to(device)
            scale = 1.0 / math.sqrt(args.head_size)
            seconds = timeit(
                lambda: ops.paged_prefill_attention(out, query, key_cache, value_cache, tables, cu_seqlens_q, seq_lens, scale),
                device, args.prefill_iters, warmup=1,
            )
            # SDPA on the same keys and values in token order, one KV head per group of query heads.
            gathered = [c[table.long().to(device)].transpose(0, 1).reshape(args.num_kv_heads, -1, args.head_size)[:, :n]
                        for c in (key_cache, value_cache)]
            k, v = (x.repeat_interleave(group, 0)[None] for x in gathered)
            q = query.transpose(0, 1)[None]
            sdpa = timeit(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale),
                          device, args.prefill_iters, warmup=1)
            flops = 4 * args.num_heads * args.head_size * n * (n + 1) / 2
            row = (
                f"{name:<6} {n:7d} {seconds * 1e3:11.1f} {flops / seconds / 1e9:8.0f} {100 * flops / seconds / peak:6.1f}% "
                f"{sdpa * 1e3:9.1f} {100 * flops / sdpa / peak:6.1f}% {sdpa / seconds:12.2f}x"
            )
            if args.chunk:
                chunked = timeit(lambda: chunked_prefill(out, query, key_cache, value_cache, tables, scale, args.chunk),
                                 device, args.prefill_iters, warmup=1)
                row += f" {chunked * 1e3:22.1f} {chunked / seconds:16.2f}x"
            print(row)
        print(f"{name} matmul peak (4096^3 torch.matmul): {peak / 1e9:.0f} GFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="decode", choices=["decode", "prefill"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: " + ",".join(DTYPES))
    parser.add_argument("--kv-cache-dtypes", default="auto", help="decode: comma-separated: auto," + ",".join(CACHE_DTYPES))
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--min-context", type=int, default=1024)
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--block-run", type=int, default=1,
                        help="decode: a sequence's blocks lie in runs of this many consecutive cache blocks, the "
                        "runs scattered (default 1: every block scattered)")
    parser.add_argument("--layers", type=int, default=1, help="decode: caches per call, one after another (>= 1)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reference-iters", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-lens", default="512,2048,8192", help="prefill: comma-separated prompt lengths")
    parser.add_argument("--prefill-iters", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=0,
                        help="prefill: also time the prompt in chunks of this many tokens over the cached prefix")
    args = parser.parse_args()
    for name in ("layers", "block_run"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    device = torch.device(args.device)
    backend = ops.backend_for(device)
    if backend == "torch-reference":
        raise SystemExit(f"pagedlm._C kernels are not available for {device} (backend {backend!r}); build them first")
    if args.mode == "prefill":
        prefill(args, device)
        return
    copy_bw = copy_bandwidth(device, iters=5)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(
        f"decode paged attention on {device}{threads}: {args.num_seqs} seqs, context "
        f"{args.min_context}-{args.max_context}, {args.num_heads} q heads / {args.num_kv_heads} kv heads, "
        f"head size {args.head_size}, block size {args.block_size}, blocks in runs of {args.block_run}"
    )
    print(f"copy bandwidth (1 GiB copy_, read + write): {copy_bw / 1e9:.1f} GB/s\n")
    header = f"{'dtype':<14} {'impl':<10} {'ms/call':>9} {'KV MB':>8} {'GB/s':>7} {'% copy BW':>10} {'vs ref':>7}"
    print(header)
    print("-" * len(header))

    generator = torch.Generator().manual_seed(args.seed)
    for name, cache in [(d, c) for d in args.dtypes.split(",") for c in args.kv_cache_dtypes.split(",")]:
        dtype = DTYPES[name]
        layers = [make_batch(args, dtype, CACHE_DTYPES.get(cache, dtype), device, generator) for _ in range(args.layers)]
        kv_bytes = sum(layer[-1] for layer in layers)
        name = name if cache == "auto" else f"{name}/{cache}"
        out = torch.empty_like(layers[0][0])
        scale = 1.0 / math.sqrt(args.head_size)
        timings = {}
        for impl, fn, iters in (
            (backend, ops.paged_attention, args.iters),
            ("reference", reference.paged_attention, args.reference_iters),
        ):
            if iters == 0:
                continue

            def call(fn=fn):
                for query, key_cache, value_cache, block_tables, seq_lens, _ in layers:
                    fn(out, query, key_cache, value_cache, block_tables, seq_lens, scale)

            timings[impl] = timeit(call, device, iters, warmup=1)
        for impl, seconds in timings.items():
            bandwidth = kv_bytes / seconds
            versus = f"{timings['reference'] / seconds:6.1f}x" if "reference" in timings else f"{'-':>7}"
            print(
                f"{name:<14} {impl:<10} {seconds * 1e3:9.2f} {kv_bytes / 1e6:8.1f} {bandwidth / 1e9:7.2f} "
                f"{100 * bandwidth / copy_bw:9.1f}% {versus}"
            )
        del layers, out


if __name__ == "__main__":
    main()
