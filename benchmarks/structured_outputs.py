"""The cost of structured outputs: the AlpacaEval workload with a JSON-schema constraint on every
request against none, interleaved, at the default batch; plus the per-step mask time and the
compile time per distinct schema.

Both arms answer the same chat prompts, greedy, up to ``--max-tokens`` tokens each. Constrained
answers end when their JSON does, so the arms compare in generated tokens per second.

    python benchmarks/structured_outputs.py            # 805 AlpacaEval prompts from ../shared
    python benchmarks/structured_outputs.py --dataset outputs.json --num-prompts 256
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jobs import Load  # noqa: E402
from throughput import DATASET_HINT, SHARED_DATASET, read_records  # noqa: E402

from pagedlm import LLM, SamplingParams, default_model_path  # noqa: E402
from pagedlm.engine import structured_outputs  # noqa: E402
from pagedlm.sampling_params import StructuredOutputsParams  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 400}, "confidence": {"type": "number"},
                   "topics": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
    "required": ["answer", "confidence", "topics"],
    "additionalProperties": False,
}


class MaskTimer:
    """Time spent filling bitmask rows (xgrammar) per step, by wrapping the manager's method."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.rows = 0
        original = structured_outputs.StructuredOutputManager.bitmask

        def timed(manager, matcher):
            start = time.perf_counter()
            row = original(manager, matcher)
            self.seconds += time.perf_counter() - start
            self.rows += 1
            return row

        structured_outputs.StructuredOutputManager.bitmask = timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dataset", default=None, help=f"default: {SHARED_DATASET}")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    path = Path(args.dataset) if args.dataset else SHARED_DATASET
    if not path.exists():
        raise SystemExit(DATASET_HINT.format(path=path))
    records = read_records(path)[: args.num_prompts]
    conversations = [[{"role": "user", "content": r["prompt"] + "\nAnswer in JSON."}] for r in records]
    timer = MaskTimer()
    llm = LLM(args.model or default_model_path(), dtype="bfloat16")
    constraint = StructuredOutputsParams(json=SCHEMA)
    compile_start = time.perf_counter()
    llm.llm_engine.structured_outputs.compile(constraint)
    compile_s = time.perf_counter() - compile_start
    results: dict[str, list] = {"none": [], "json schema": []}
    steps: dict[str, int] = {"none": 0, "json schema": 0}
    engine = llm.llm_engine
    original_step = engine.step

    def counted_step():
        steps[arm] += 1
        return original_step()

    engine.step = counted_step
    for repeat in range(args.repeats):
        for arm in (["none", "json schema"] if repeat % 2 == 0 else ["json schema", "none"]):
            params = SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                    structured_outputs=constraint if arm == "json schema" else None)
            llm.reset_prefix_cache()
            mask_before = timer.seconds
            with Load() as load:
                outs = llm.chat(conversations, params, use_tqdm=False)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            parsed = sum(1 for o in outs if _parses(o.outputs[0].text)) if arm == "json schema" else None
            results[arm].append((tokens / load.wall, load.wall, tokens, timer.seconds - mask_before, load.others, parsed))
            print(f"  repeat {repeat} {arm:>11}: {tokens / load.wall:7.1f} gen tok/s, {load.wall:6.1f} s, "
                  f"others {load.others:.2f} cores", flush=True)
    print(f"\n{len(conversations)} AlpacaEval chat prompts, greedy, max {args.max_tokens} tokens, "
          f"{os.path.basename(llm.llm_engine.model_config.model)} bf16, {args.repeats} interleaved repeats (best)")
    print(f"| {'constraint':<11} | {'gen tok/s':>9} | {'wall s':>7} | {'tokens':>7} | {'mask s':>7} | "
          f"{'others':>6} | {'JSON parses':>11} | {'vs none':>7} |")
    print(f"|{'-' * 13}|{'-' * 11}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 8}|{'-' * 13}|{'-' * 9}|")
    base = max(results["none"])[0]
    for arm, runs in results.items():
        rate, wall, tokens, mask, others, parsed = max(runs)
        shown = "" if parsed is None else f"{parsed}/{len(conversations)}"
        print(f"| {arm:<11} | {rate:9.1f} | {wall:7.2f} | {tokens:7d} | {mask:7.2f} | {others:6.2f} | {shown:>11} | "
              f"{rate / base:7.3f} |")
    per_step = 1000 * timer.seconds / max(steps["json schema"], 1)
    print(f"\nschema compile: {1000 * compile_s:.1f} ms (once per distinct schema); bitmask fill: "
          f"{1e6 * timer.seconds / max(timer.rows, 1):.1f} us per sequence, {per_step:.2f} ms per constrained step")
    llm.close()


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
