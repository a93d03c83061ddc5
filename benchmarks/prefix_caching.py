"""Shared-prefix workload: every row repeats one long system prompt / document, then asks a short
question and gets a short answer. Runs pagedlm with automatic prefix caching on and off in the same
process and prints throughput, prefill time and their ratio.

    python benchmarks/prefix_caching.py [--model DIR] [--dtype bfloat16] [--prefix-len 1000]
        [--num-prompts 64] [--output-len 16]

The default model is the embedded SmolLM2-135M-Instruct (``pagedlm.default_model_path()``).
"""

import argparse
import random
import time

import torch
from transformers import AutoConfig

from pagedlm import LLM, SamplingParams, default_model_path


def _workload(vocab: int, prefix_len: int, num_prompts: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(100, vocab) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(100, vocab) for _ in range(rng.randrange(8, 32))] for _ in range(num_prompts)]


def _run(model: str, dtype: str, prompts: list[list[int]], output_len: int, caching: bool) -> dict[str, float]:
    llm = LLM(model, dtype=dtype, enable_prefix_caching=caching)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    # Prefill time: the same prompts with one output token each, on a fresh cache.
    start = time.perf_counter()
    llm.generate(inputs, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    prefill = time.perf_counter() - start
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.generate(inputs, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - start
    tokens = sum(len(p) for p in prompts) + sum(len(o.outputs[0].token_ids) for o in outs)
    return {"prefill_s": prefill, "wall_s": wall, "req_per_s": len(prompts) / wall, "tok_per_s": tokens / wall,
            "hit_rate": llm.get_stats()["prefix_cache_hit_rate"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prefix-len", type=int, default=1000)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    args = parser.parse_args()
    model = args.model or default_model_path()
    vocab = AutoConfig.from_pretrained(model).vocab_size
    prompts = _workload(vocab, args.prefix_len, args.num_prompts)
    results = {name: _run(model, args.dtype, prompts, args.output_len, on) for name, on in (("caching off", False), ("caching on", True))}
    print(f"\n{args.num_prompts} prompts, {args.prefix_len}-token shared prefix, {args.output_len} output tokens, "
          f"{args.dtype}, {torch.get_num_threads()} threads")
    print(f"{'':12} {'prefill s':>10} {'wall s':>8} {'req/s':>8} {'tok/s':>9} {'hit rate':>9}")
    for name, r in results.items():
        print(f"{name:12} {r['prefill_s']:10.2f} {r['wall_s']:8.2f} {r['req_per_s']:8.2f} {r['tok_per_s']:9.1f} {r['hit_rate']:9.1%}")
    off, on = results["caching off"], results["caching on"]
    print(f"ratio on/off: throughput {on['req_per_s'] / off['req_per_s']:.2f}x, prefill time {off['prefill_s'] / on['prefill_s']:.2f}x faster")


if __name__ == "__main__":
    main()
