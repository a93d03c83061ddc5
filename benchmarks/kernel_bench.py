"""Decode paged-attention throughput: the pagedlm._C kernel against the torch reference.

Decode attention reads every cached K/V byte of the batch once, so it is memory bound: the table
reports the bytes of K/V read per call, the achieved GB/s and that as a fraction of this machine's
copy bandwidth (a 1 GiB ``tensor.copy_``, read + write), measured in the same run.

    python benchmarks/kernel_bench.py                # CPU, bf16 and fp32
    python benchmarks/kernel_bench.py --device cuda
"""

import argparse
import math
import time

import torch

import pagedlm.ops as ops
from pagedlm.ops import reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def make_batch(args, dtype: torch.dtype, device: torch.device, generator: torch.Generator):
    seq_lens = torch.randint(args.min_context, args.max_context + 1, (args.num_seqs,), generator=generator)
    blocks_per_seq = (seq_lens + args.block_size - 1) // args.block_size
    num_blocks = int(blocks_per_seq.sum())
    max_blocks = int(blocks_per_seq.max())
    # Scatter every sequence's blocks over the cache, as after a while of serving.
    placement = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    block_tables = torch.zeros(args.num_seqs, max_blocks, dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks_per_seq.tolist()):
        block_tables[i, :n] = placement[start : start + n]
        start += n
    shape = (num_blocks, args.num_kv_heads, args.block_size, args.head_size)
    key_cache = torch.randn(shape, generator=generator).to(dtype).to(device)
    value_cache = torch.randn(shape, generator=generator).to(dtype).to(device)
    query = torch.randn(args.num_seqs, args.num_heads, args.head_size, generator=generator).to(dtype).to(device)
    kv_bytes = 2 * int(seq_lens.sum()) * args.num_kv_heads * args.head_size * key_cache.element_size()
    seq_lens = seq_lens.to(torch.int32).to(device)
    return query, key_cache, value_cache, block_tables.to(device), seq_lens, kv_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: " + ",".join(DTYPES))
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--min-context", type=int, default=1024)
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reference-iters", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    backend = ops.backend_for(device)
    if backend == "torch-reference":
        raise SystemExit(f"pagedlm._C kernels are not available for {device} (backend {backend!r}); build them first")
    copy_bw = copy_bandwidth(device, iters=5)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(
        f"decode paged attention on {device}{threads}: {args.num_seqs} seqs, context "
        f"{args.min_context}-{args.max_context}, {args.num_heads} q heads / {args.num_kv_heads} kv heads, "
        f"head size {args.head_size}, block size {args.block_size}"
    )
    print(f"copy bandwidth (1 GiB copy_, read + write): {copy_bw / 1e9:.1f} GB/s\n")
    header = f"{'dtype':<6} {'impl':<10} {'ms/call':>9} {'KV MB':>8} {'GB/s':>7} {'% copy BW':>10} {'vs ref':>7}"
    print(header)
    print("-" * len(header))

    generator = torch.Generator().manual_seed(args.seed)
    for name in args.dtypes.split(","):
        query, key_cache, value_cache, block_tables, seq_lens, kv_bytes = make_batch(
            args, DTYPES[name], device, generator
        )
        out = torch.empty_like(query)
        scale = 1.0 / math.sqrt(args.head_size)
        timings = {}
        for impl, fn, iters in (
            (backend, ops.paged_attention, args.iters),
            ("reference", reference.paged_attention, args.reference_iters),
        ):
            call = lambda fn=fn: fn(out, query, key_cache, value_cache, block_tables, seq_lens, scale)  # noqa: E731
            timings[impl] = timeit(call, device, iters, warmup=1)
        for impl, seconds in timings.items():
            bandwidth = kv_bytes / seconds
            print(
                f"{name:<6} {impl:<10} {seconds * 1e3:9.2f} {kv_bytes / 1e6:8.1f} {bandwidth / 1e9:7.2f} "
                f"{100 * bandwidth / copy_bw:9.1f}% {timings['reference'] / seconds:6.1f}x"
            )
        del query, key_cache, value_cache, out


if __name__ == "__main__":
    main()
