"""The job runner against ``LLM.generate`` on the same rows, and its memory over many rows.

1. Throughput: the same prompts through ``LLM.generate`` (a list in memory) and through
   ``pagedlm run`` (JSONL file in, JSONL file out, rows parsed, written and fsynced), interleaved
   A/B ``--repeats`` times; the table gives generated tokens/s of each and the ratio.
2. Memory: ``pagedlm run`` over ``--memory-rows`` rows on a tiny random-weight model (SmolLM2's
   tokenizer, 2 layers of width 64), as a subprocess whose RSS is sampled; the table gives its RSS
   once 10% of the rows are written and at its peak.

Both print how busy the rest of the machine was (other processes' CPU, in cores).

    python benchmarks/jobs.py                      # 256 rows x 64 tokens, SmolLM2 bf16; 100,000 rows
    python benchmarks/jobs.py --memory-rows 0      # throughput only
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import busy_cpu_seconds  # noqa: E402

from pagedlm import LLM, SamplingParams, default_model_path  # noqa: E402
from pagedlm.entrypoints.jobs.runner import JobConfig, run_job  # noqa: E402

TOPICS = ["the sea", "a mountain", "bread", "a library", "rain", "a train", "the moon", "coffee"]


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


class Load:
    """Other processes' CPU use (cores) over a timed region."""

    def __enter__(self):
        self.busy, self.own, self.start = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        self.wall = time.perf_counter() - self.start
        others = (busy_cpu_seconds() - self.busy) - (own_cpu_seconds() - self.own)
        self.others = max(0.0, others) / self.wall


def write_rows(path: Path, num_rows: int) -> list[dict]:
    rows = [{"id": i, "messages": [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]} "
                                                               f"(number {i})."}]} for i in range(num_rows)]
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def throughput(args: argparse.Namespace, tmp: Path) -> None:
    rows = write_rows(tmp / "rows.jsonl", args.rows)
    engine = {"dtype": args.dtype}
    sampling = {"temperature": 0.0, "max_tokens": args.max_tokens, "ignore_eos": True}
    results = {"LLM.generate": [], "pagedlm run": []}
    conversations = [r["messages"] for r in rows]
    for repeat in range(args.repeats):
        order = ["LLM.generate", "pagedlm run"] if repeat % 2 == 0 else ["pagedlm run", "LLM.generate"]
        for arm in order:
            # Each arm on a fresh engine whose start-up is left out: the job's run_job(llm=...).
            with LLM(args.model, **engine) as llm:
                if arm == "LLM.generate":
                    with Load() as load:
                        outs = llm.chat(conversations, SamplingParams(**sampling), use_tqdm=False)
                    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                else:
                    config = JobConfig(input=str(tmp / "rows.jsonl"), output=str(tmp / f"out{repeat}.jsonl"),
                                       sampling=sampling)
                    with Load() as load:
                        stats, _ = run_job(config, tty=False, llm=llm)
                    tokens = stats.completion_tokens
            wall = load.wall
            results[arm].append((tokens / wall, wall, load.others))
            print(f"  repeat {repeat} {arm:>12}: {tokens / wall:7.1f} generated tok/s, {wall:6.2f} s, "
                  f"others {load.others:.2f} cores", flush=True)
    print(f"\n{args.rows} rows x {args.max_tokens} tokens, {os.path.basename(args.model)} {args.dtype}, "
          f"{args.repeats} interleaved repeats (best of each)")
    print(f"| {'system':<14} | {'gen tok/s':>9} | {'wall s':>7} | {'others (cores)':>14} | {'vs generate':>11} |")
    print(f"|{'-' * 16}|{'-' * 11}|{'-' * 9}|{'-' * 16}|{'-' * 13}|")
    base = max(r[0] for r in results["LLM.generate"])
    for arm, runs in results.items():
        best = max(runs)
        print(f"| {arm:<14} | {best[0]:9.1f} | {best[1]:7.2f} | {best[2]:14.2f} | {best[0] / base:11.3f} |")


def tiny_model(tmp: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp / "tiny"
    source = default_model_path()
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(source, name), path / name)
    return str(path)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def memory(args: argparse.Namespace, tmp: Path) -> None:
    model = tiny_model(tmp)
    path = tmp / "many.jsonl"
    with open(path, "w") as f:
        for i in range(args.memory_rows):
            f.write(json.dumps({"id": f"row-{i}", "prompt": f"Row {i}: {TOPICS[i % len(TOPICS)]}",
                                "source": "bench"}) + "\n")
    out = tmp / "many_out.jsonl"
    cmd = [sys.executable, "-m", "pagedlm", "run", "--model", model, "--input", str(path), "--output", str(out),
           "--max-tokens", "2", "--temperature", "0", "--ignore-eos", "--dtype", "float32", "--kv-cache-memory-bytes",
           str(256 << 20), "--progress-interval", "30"]
    with Load() as load:
        proc = subprocess.Popen(cmd)
        at_tenth = peak = 0.0
        while proc.poll() is None:
            rss = rss_mb(proc.pid) or 0.0
            peak = max(peak, rss)
            if not at_tenth and out.exists() and out.stat().st_size > 0:
                with open(out, "rb") as f:
                    if sum(1 for _ in f) >= args.memory_rows // 10:
                        at_tenth = rss
            time.sleep(0.5)
    assert proc.returncode == 0, proc.returncode
    summary = json.load(open(str(out) + ".summary.json"))
    print(f"\npagedlm run over {args.memory_rows} rows (tiny model, 2 tokens each): {summary['wall_time_s']:.1f} s, "
          f"others {load.others:.2f} cores")
    print("| RSS at 10% of rows (MB) | peak RSS (MB) | growth (MB) |")
    print("|---|---|---|")
    print(f"| {at_tenth:.0f} | {peak:.0f} | {peak - at_tenth:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-rows", type=int, default=100_000)
    args = parser.parse_args()
    args.model = args.model or default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        if args.rows:
            throughput(args, Path(tmp))
        if args.memory_rows:
            memory(args, Path(tmp))


if __name__ == "__main__":
    main()
