"""The job runner locally and on Ray Data (one and two actors) over the same file.

On one 2-core machine Ray cannot add speed, only overhead; this measures how much: rows/s and
generated tokens/s of each, Ray's start-up (``ray.init``) and the whole wall time, with how busy
the rest of the machine was.

    python benchmarks/distributed.py                 # 128 chat rows x 32 tokens, SmolLM2 bf16
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jobs import Load, write_rows  # noqa: E402

import ray  # noqa: E402

from pagedlm import default_model_path  # noqa: E402
from pagedlm.entrypoints.jobs.ray_job import run_ray_job  # noqa: E402
from pagedlm.entrypoints.jobs.runner import JobConfig, run_job  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    model = args.model or default_model_path()
    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens, "ignore_eos": True}
    engine = {"dtype": "bfloat16"}
    cores = os.cpu_count()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_rows(tmp / "rows.jsonl", args.rows)
        for name, actors in [("local runner", 0), ("Ray, 1 actor", 1), ("Ray, 2 actors", 2)]:
            config = JobConfig(input=str(tmp / "rows.jsonl"), output=str(tmp / f"out{actors}.jsonl"), model=model,
                               engine=engine, sampling=sampling)
            with Load() as load:
                start = time.perf_counter()
                init = 0.0
                if actors == 0:
                    stats, _ = run_job(config, tty=False)
                else:
                    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
                    init = time.perf_counter() - start
                    threads = max(1, cores // actors)
                    stats = run_ray_job(config, None, actors, threads, cpus_per_actor=threads / 2)
                wall = time.perf_counter() - start
            if actors:
                ray.shutdown()
            results.append((name, args.rows / wall, stats.completion_tokens / wall, init, wall, load.others))
            print(f"  {name}: {wall:.1f} s", flush=True)
    print(f"\n{args.rows} rows x {args.max_tokens} tokens, {os.path.basename(model)} bf16, {cores} cores; wall time "
          "includes loading the model (in each actor) and, for Ray, ray.init")
    print(f"| {'runner':<14} | {'rows/s':>7} | {'gen tok/s':>9} | {'ray.init s':>10} | {'wall s':>7} | "
          f"{'others (cores)':>14} | {'vs local':>8} |")
    print(f"|{'-' * 16}|{'-' * 9}|{'-' * 11}|{'-' * 12}|{'-' * 9}|{'-' * 16}|{'-' * 10}|")
    base = results[0][1]
    for name, rows_s, tok_s, init, wall, others in results:
        print(f"| {name:<14} | {rows_s:7.2f} | {tok_s:9.1f} | {init:10.1f} | {wall:7.1f} | {others:14.2f} | "
              f"{rows_s / base:8.3f} |")
    print(json.dumps([dict(zip(["runner", "rows_s", "tok_s", "init_s", "wall_s", "others"], r)) for r in results]))


if __name__ == "__main__":
    main()
