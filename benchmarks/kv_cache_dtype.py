"""The fp8 KV cache against the model's dtype ("auto"): accuracy on AlpacaEval and throughput by context.

Accuracy (``--mode accuracy``): SmolLM2-135M-Instruct by default, chat-templated AlpacaEval
instructions (``../shared/data/alpaca_eval_805.jsonl`` or ``--dataset``), greedy, ``--max-tokens``
each, once per cache setting (e4m3 with scales 1.0 and with ``calculate_kv_scales``, e5m2). Printed
per setting: the share of completions token-identical to the "auto" run's, and the mean absolute
difference of the log-probabilities of the "auto" run's completion tokens when prompt + completion
is scored (``prompt_logprobs``) with each cache.

Throughput (``--mode throughput``): for each context length, ``--context-tokens`` worth of random
prompts of that length; one LLM per cache dtype, the dtypes interleaved ``--repeats`` times (best
kept). ``prefill s`` is a ``max_tokens=1`` run of the prompts, which leaves them in the prefix cache;
``decode tok/s`` is a second run of the same prompts for ``--output-len`` tokens each (ignore_eos),
whose prompts then cost one token each. ``others`` is other processes' CPU (cores) meanwhile.

    python benchmarks/kv_cache_dtype.py --mode accuracy --num-prompts 805
    python benchmarks/kv_cache_dtype.py --mode throughput --contexts 256,1024,4096
"""

import argparse
import random
import statistics
import time
from pathlib import Path

from jobs import Load  # other processes' CPU over a region
from throughput import SHARED_DATASET, chat_prompt, read_records

from pagedlm import LLM, SamplingParams, default_model_path

# (kv_cache_dtype, calculate_kv_scales) compared with "auto"; SmolLM2's checkpoint has no scales, so
# without calculate_kv_scales they are 1.0.
FP8_SETTINGS = [("fp8_e4m3", False), ("fp8_e4m3", True), ("fp8_e5m2", False)]


def engine(args: argparse.Namespace, kv_cache_dtype: str, **kwargs) -> LLM:
    return LLM(args.model, dtype=args.dtype, kv_cache_dtype=kv_cache_dtype, **kwargs)


def completion_logprobs(llm: LLM, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
    """Log-probabilities of each completion's tokens after its prompt, scored in one prefill."""
    outs = llm.generate([{"prompt_token_ids": p + c} for p, c in zip(prompts, completions)],
                        SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return [[out.prompt_logprobs[i][t].logprob for i, t in enumerate(c, start=len(p))]
            for p, c, out in zip(prompts, completions, outs)]


def accuracy(args: argparse.Namespace) -> None:
    llm = engine(args, "auto")
    tokenizer = llm.get_tokenizer()
    records = read_records(Path(args.dataset) if args.dataset else SHARED_DATASET)[: args.num_prompts]
    prompts = [chat_prompt(tokenizer, r["prompt"]) for r in records]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)

    def completions(llm: LLM) -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]

    with Load() as load:
        reference = completions(llm)
        reference_logprobs = completion_logprobs(llm, prompts, reference)
        llm.close()
        rows = []
        for kv_cache_dtype, calculate_kv_scales in FP8_SETTINGS:
            fp8 = engine(args, kv_cache_dtype, calculate_kv_scales=calculate_kv_scales)
            same = sum(a == b for a, b in zip(completions(fp8), reference))
            diffs = [abs(a - b) for ours, theirs in zip(completion_logprobs(fp8, prompts, reference), reference_logprobs)
                     for a, b in zip(ours, theirs)]
            fp8.close()
            name = kv_cache_dtype + (", calculate_kv_scales" if calculate_kv_scales else "")
            rows.append((name, same, statistics.fmean(diffs), max(diffs)))
    print(f"\n{len(prompts)} AlpacaEval prompts, {args.model}, {args.dtype}, greedy, max_tokens {args.max_tokens}; "
          f"others {load.others:.2f} cores")
    print("| kv_cache_dtype | completions identical to auto | mean abs logprob diff | max abs logprob diff |")
    print("|---|---|---|---|")
    for kv_cache_dtype, same, mean, largest in rows:
        print(f"| {kv_cache_dtype} | {same}/{len(prompts)} ({100 * same / len(prompts):.0f}%) | {mean:.4f} | {largest:.3f} |")


def throughput(args: argparse.Namespace) -> None:
    dtypes = ["auto", *args.throughput_dtypes.split(",")]
    rng = random.Random(0)
    results: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    for context in [int(c) for c in args.contexts.split(",")]:
        prompts = [{"prompt_token_ids": [rng.randrange(3, 40000) for _ in range(context)]}
                   for _ in range(max(1, args.context_tokens // context))]
        for repeat in range(args.repeats):
            for kv_cache_dtype in dtypes if repeat % 2 == 0 else dtypes[::-1]:
                llm = engine(args, kv_cache_dtype, max_num_seqs=len(prompts))
                llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
                with Load() as load:
                    start = time.perf_counter()
                    llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
                    prefill = time.perf_counter() - start
                    start = time.perf_counter()
                    llm.generate(prompts, SamplingParams(max_tokens=args.output_len, ignore_eos=True), use_tqdm=False)
                    decode = len(prompts) * args.output_len / (time.perf_counter() - start)
                assert llm.get_stats()["prefix_cache_hit_tokens"] > 0
                llm.close()
                results.setdefault((context, kv_cache_dtype), []).append((prefill, decode, load.others))
                print(f"[{repeat + 1}/{args.repeats}] context {context}, {kv_cache_dtype}: prefill {prefill:.2f} s, "
                      f"decode {decode:.0f} tok/s, others {load.others:.2f}", flush=True)
    print(f"\n{args.model}, {args.dtype}; {args.context_tokens} context tokens per case, {args.output_len} output "
          f"tokens each; best of {args.repeats}")
    print("| context | kv_cache_dtype | sequences | prefill s | decode tok/s | decode vs auto | others (max) |")
    print("|---|---|---|---|---|---|---|")
    for (context, kv_cache_dtype), runs in results.items():
        prefill, decode = min(r[0] for r in runs), max(r[1] for r in runs)
        auto = max(r[1] for r in results[(context, "auto")])
        print(f"| {context} | {kv_cache_dtype} | {max(1, args.context_tokens // context)} | {prefill:.2f} | "
              f"{decode:.0f} | {decode / auto:.2f}x | {max(r[2] for r in runs):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["accuracy", "throughput"], required=True)
    parser.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--dataset", help="JSONL of prompts (default: the shared AlpacaEval 805)")
    parser.add_argument("--num-prompts", type=int, default=805)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--contexts", default="256,1024,4096")
    parser.add_argument("--context-tokens", type=int, default=16384, help="prompt tokens per throughput case")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--throughput-dtypes", default="fp8_e4m3", help="fp8 formats timed against auto")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    args.model = args.model or default_model_path()
    accuracy(args) if args.mode == "accuracy" else throughput(args)


if __name__ == "__main__":
    main()
