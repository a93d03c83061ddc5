"""Where the block manager puts a sequence's KV blocks, and what that costs decode attention.

Decode attention reads runs of consecutive cache blocks faster than blocks scattered one by one
(docs/performance.md, "Where decode attention's bandwidth goes"). This runs the engine as a long job
does, then times ``ops.paged_attention`` over the block tables it produced:

1. For each ``--extent-blocks`` value (the block manager's ``EXTENT_BLOCKS``; with 1 every block is
   an extent, so a sequence gets a warm block freed long ago or a fresh one, never by position), an
   ``LLM`` generates ``--passes`` batches of ``--num-prompts`` random prompts
   (16-160 tokens, outputs of 32-160), so that the cache has been recycled as in a long job, then
   ``--num-seqs`` more prompts; at decode step ``--step`` of that last batch one layer's block tables
   and sequence lengths are kept.
2. Those tables, and the first one with its block numbers permuted at random (every block
   scattered), drive ``paged_attention`` over ``--layers`` layers' caches of the engine's size with
   the model's head shape, in interleaved rounds (ms per pass over the layers: min / median / max).

    python benchmarks/block_placement.py                         # SmolLM2, extents of 16 and 1
    python benchmarks/block_placement.py --passes 0              # a fresh cache
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jobs import Load  # noqa: E402
from pagedlm import LLM, SamplingParams, default_model_path, ops  # noqa: E402
from pagedlm.engine.block_manager import BlockAllocator  # noqa: E402


def random_prompts(rng: random.Random, count: int, vocab: int) -> list[dict]:
    return [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(rng.randint(16, 160))]} for _ in range(count)]


def capture_tables(args: argparse.Namespace, extent_blocks: int, num_kv_blocks: int | None) -> dict:
    """The block tables and sequence lengths of one decode step of the last batch (see the module),
    with a cache of ``num_kv_blocks`` (None: the default size)."""
    llm = LLM(args.model, dtype="bfloat16", num_kv_blocks=num_kv_blocks)
    blocks = llm.llm_engine.block_manager
    blocks.allocator = BlockAllocator(blocks.num_kv_blocks, extent_blocks)  # before any block is taken
    rng = random.Random(args.seed)
    vocab = llm.llm_engine.model_config.hf_config.vocab_size
    for _ in range(args.passes):
        prompts = random_prompts(rng, args.num_prompts, vocab)
        params = [SamplingParams(temperature=0, max_tokens=rng.randint(32, 160), ignore_eos=True) for _ in prompts]
        llm.generate(prompts, params, use_tqdm=False)
    captured = {}
    attention = ops.paged_attention
    calls = 0

    def keep(out, query, key_cache, value_cache, block_tables, seq_lens, *rest, **kwargs):
        nonlocal calls
        calls += 1
        if calls == args.step * llm.llm_engine.model_config.num_layers + 1:
            captured.update(tables=block_tables.clone(), seq_lens=seq_lens.clone(), num_blocks=key_cache.shape[0],
                            shape=key_cache.shape[1:], num_heads=query.shape[1])
        return attention(out, query, key_cache, value_cache, block_tables, seq_lens, *rest, **kwargs)

    ops.paged_attention = keep
    try:
        prompts = random_prompts(rng, args.num_seqs, vocab)
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.step + 8, ignore_eos=True), use_tqdm=False)
    finally:
        ops.paged_attention = attention
    llm.close()
    return captured


def adjacency(tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> float:
    """Share of a table's steps from one block to the next that go to the next cache block."""
    steps = same = 0
    for table, n in zip(tables.tolist(), ((seq_lens + block_size - 1) // block_size).tolist()):
        steps += n - 1
        same += sum(b == a + 1 for a, b in zip(table[: n - 1], table[1:n]))
    return same / max(steps, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--extent-blocks", default="16,1", help="comma-separated placements to compare")
    parser.add_argument("--passes", type=int, default=2, help="batches run before the measured one")
    parser.add_argument("--num-prompts", type=int, default=805)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--step", type=int, default=60, help="decode step of the last batch whose tables are kept")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.model = args.model or default_model_path()

    cases = {}
    num_kv_blocks = None  # the first engine's default; every later one gets the same cache
    for extent in (int(x) for x in args.extent_blocks.split(",")):
        cases[f"extents of {extent}"] = capture_tables(args, extent, num_kv_blocks)
        num_kv_blocks = cases[f"extents of {extent}"]["num_blocks"]
    first = next(iter(cases.values()))
    scatter = torch.randperm(first["num_blocks"], generator=torch.Generator().manual_seed(args.seed)).to(torch.int32)
    cases["every block scattered"] = {**first, "tables": scatter[first["tables"].long()]}

    kv_heads, block_size, head_size = first["shape"]
    caches = [(torch.randn(first["num_blocks"], kv_heads, block_size, head_size).bfloat16(),
               torch.randn(first["num_blocks"], kv_heads, block_size, head_size).bfloat16()) for _ in range(args.layers)]
    query = torch.randn(first["tables"].shape[0], first["num_heads"], head_size).bfloat16()
    out = torch.empty_like(query)
    times = {name: [] for name in cases}
    with Load() as load:
        for _ in range(args.rounds):
            for name, case in cases.items():
                start = time.perf_counter()
                for key_cache, value_cache in caches:
                    ops.paged_attention(out, query[: case["tables"].shape[0]], key_cache, value_cache, case["tables"],
                                        case["seq_lens"], head_size ** -0.5)
                times[name].append(1e3 * (time.perf_counter() - start))

    print(f"\n{args.model}: {args.passes} batches of {args.num_prompts} before the measured one; decode step "
          f"{args.step} of {first['tables'].shape[0]} sequences, context {float(first['seq_lens'].float().mean()):.0f} "
          f"on average; {args.layers} layers, {torch.get_num_threads()} threads; other processes kept "
          f"{load.others:.2f} cores busy")
    print(f"{'placement':<24} {'next-block steps':>16} {'min ms':>8} {'median':>8} {'max':>8} {'x scattered':>12}")
    scattered = statistics.median(times["every block scattered"])
    for name, case in cases.items():
        t = times[name]
        print(f"{name:<24} {adjacency(case['tables'], case['seq_lens'], block_size):>16.2f} {min(t):>8.1f} "
              f"{statistics.median(t):>8.1f} {max(t):>8.1f} {scattered / statistics.median(t):>11.2f}x")


if __name__ == "__main__":
    main()
