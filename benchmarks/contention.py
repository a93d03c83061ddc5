"""Throughput on a quiet machine and with one busy neighbour, per OpenMP wait setting, in one run.

Each setting runs in its own process (libgomp reads its environment when torch loads it): chat
prompts through ``LLM.chat`` quietly, then again while a single-threaded busy loop runs beside it.
The table gives both rates, loaded / quiet, and each setting's quiet rate against pagedlm's default;
``others`` is the other processes' CPU (cores) during the quiet run.

    python benchmarks/contention.py                 # SmolLM2 bf16, 48 prompts x 64 tokens, 2 repeats
    python benchmarks/contention.py --repeats 3 --num-prompts 96
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# name -> (environment, worker flags)
SETTINGS = {
    "pagedlm default": ({}, []),  # OMP_WAIT_POLICY=passive, set by `import pagedlm` (pagedlm/openmp.py)
    "pagedlm, enforce_eager": ({}, ["--enforce-eager"]),  # no replayed decode steps (worker/step_graph.py)
    "libgomp default": ({"GOMP_SPINCOUNT": "300000"}, []),
    "GOMP_SPINCOUNT=3000": ({"GOMP_SPINCOUNT": "3000"}, []),
}
TOPICS = ["the sea", "a mountain", "bread", "a library", "rain", "a train", "the moon", "coffee", "a violin",
          "glaciers", "owls", "maps"]


def worker(args: argparse.Namespace) -> None:
    from jobs import Load  # other processes' CPU over a region

    from pagedlm import LLM, SamplingParams, default_model_path

    llm = LLM(args.model or default_model_path(), dtype=args.dtype, enforce_eager=args.enforce_eager)
    conversations = [[{"role": "user", "content": f"Write about {TOPICS[i % len(TOPICS)]} (note {i})."}]
                     for i in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.chat(conversations[:4], params, use_tqdm=False)

    def rate() -> tuple[float, float]:
        with Load() as load:
            start = time.perf_counter()
            outs = llm.chat(conversations, params, use_tqdm=False)
            wall = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outs) / wall, load.others

    quiet, others = rate()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        loaded, _ = rate()
    finally:
        busy.kill()
    print(json.dumps({"quiet": quiet, "loaded": loaded, "others": others}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--enforce-eager", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    names = list(SETTINGS)
    for repeat in range(args.repeats):
        # Interleaved, each repeat starting one setting later: the machine's noise, and whatever
        # running first costs, hit every setting alike.
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            env, flags = SETTINGS[name]
            clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
            cmd = [sys.executable, __file__, "--worker", "--dtype", args.dtype, "--num-prompts", str(args.num_prompts),
                   "--max-tokens", str(args.max_tokens), *flags] + (["--model", args.model] if args.model else [])
            out = subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            results[name].append(result)
            print(f"[{repeat + 1}/{args.repeats}] {name}: quiet {result['quiet']:.0f} tok/s, loaded "
                  f"{result['loaded']:.0f} tok/s, others {result['others']:.2f} cores", flush=True)

    base = max(r["quiet"] for r in results["pagedlm default"])
    print("\n| setting | quiet tok/s (best) | loaded tok/s (best) | loaded / own quiet | quiet vs pagedlm default "
          "| others (cores, max) |\n|---|---|---|---|---|---|")
    for name, runs in results.items():
        quiet, loaded = max(r["quiet"] for r in runs), max(r["loaded"] for r in runs)
        print(f"| {name} | {quiet:.0f} | {loaded:.0f} | {loaded / quiet:.2f} | {quiet / base:.2f} "
              f"| {max(r['others'] for r in runs):.2f} |")


if __name__ == "__main__":
    main()
