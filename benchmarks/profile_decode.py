"""Where pagedlm's decode time goes: ``--num-seqs`` requests decoding together, profiled by phase.

The requests are evenly spaced alpaca prompts (synthetic ones with ``--synthetic``), each
generating ``--output-len`` tokens, so after the first few (prefill) steps every step decodes one
token for each of the ``--num-seqs`` sequences. A first pass times the steps; a second pass runs
``torch.profiler`` over ``--steps`` decode steps after skipping ``--skip``, with the engine's
phases (schedule, input preparation, model forward, LM head, sampler) and the model's leaf modules
(Linear, Attention, RMSNorm, ...) wrapped in ``record_function`` ranges. Each range reports its
wall time, the self time of the ops directly inside it, and the rest (Python, dispatch, allocation).
Decode steps are replayed from their recording (``worker/step_graph.py``), as ``LLM`` runs them by
default, so they run no module code: ``--enforce-eager`` runs them op by op and fills the module table.

    python benchmarks/profile_decode.py                    # bf16, 64 sequences
    python benchmarks/profile_decode.py --dtype float32
    py-spy record -o decode.svg -- python benchmarks/profile_decode.py --no-profiler   # Python view

Phases are found by attribute name (``LLMEngine.scheduler.schedule``, ``LLMEngine._seq_group_metadata``,
``prepare_model_input`` in ``pagedlm.worker.model_runner``, ``model.forward``, ``model.compute_logits``
or ``model.greedy_tokens`` (a plain greedy step's LM head with its argmax), ``sampler.forward``); one
that is missing is skipped.

``--roofline`` instead times the decode steps of each of ``--batch-sizes`` (no profiler) and sets
each against its roofline: its linears (every layer's projections and the LM head, M = batch rows)
timed alone on the model's own ``Linear`` modules (the kernel a step runs: pagedlm's AMX or FMA
kernel where ``Linear`` packed its weight, else oneDNN), each layer's own so that they come from
memory as in the step (fastest of 8 passes before the steps and 8 after: a slow spell of a shared
machine during one burst would otherwise inflate the term, and flatter the ratio), plus
the K/V bytes its attention reads at the copy bandwidth measured in the same run (a 1 GiB
``tensor.copy_``, read + write). A small step is also set against one read of the linears'
weights at that bandwidth. Only steps that decode the whole batch (no prefill chunk) count.

    python benchmarks/profile_decode.py --roofline --batch-sizes 1,8,64,256
"""

import argparse
import functools
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.autograd.profiler_util import FunctionEvent

from jobs import Load
from kernel_bench import copy_bandwidth, timeit
from pagedlm import LLM, SamplingParams, default_model_path
from pagedlm.model_executor.layers.linear import Linear
from pagedlm.worker import model_runner as model_runner_module
from pagedlm.worker.cache_engine import block_bytes

DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval_805.jsonl"
STEP = "engine step"
FORWARD = "model forward"
LM_HEAD = "lm head"
BETWEEN = "(between modules)"


def prompts_for(llm: LLM, args: argparse.Namespace) -> list[dict]:
    tokenizer = llm.get_tokenizer()
    if args.synthetic or not DATASET.exists():
        return [{"prompt_token_ids": [(7 * i + j) % 1000 + 100 for j in range(args.prompt_len)]} for i in range(args.num_seqs)]
    records = [json.loads(line) for line in DATASET.read_text().splitlines()]
    picks = [records[i * len(records) // args.num_seqs]["prompt"] for i in range(args.num_seqs)]
    return [
        {"prompt_token_ids": list(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                                add_generation_prompt=True, tokenize=True)["input_ids"])}
        for p in picks
    ]


def wrap(obj: object, attr: str, label: str) -> bool:
    """Run ``obj.attr`` inside a ``record_function(label)`` range; False when it does not exist."""
    fn = getattr(obj, attr, None)
    if fn is None:
        return False

    @functools.wraps(fn)
    def wrapped(*a, **kw):
        with torch.profiler.record_function(label):
            return fn(*a, **kw)

    setattr(obj, attr, wrapped)
    return True


def instrument(llm: LLM) -> tuple[list[str], set[str]]:
    """Wrap the engine step, its phases and the model's leaf modules and linears (labelled by class
    name; a ``GateUpLinear`` holds its activation) in profiler ranges; the phase labels and module
    labels installed."""
    engine = llm.llm_engine
    runner = engine.model_runner
    modules = set()
    inside_linears = {id(m) for linear in runner.model.modules() if isinstance(linear, Linear)
                      for m in linear.modules() if m is not linear}
    for module in runner.model.modules():
        leaf = (next(module.children(), None) is None and id(module) not in inside_linears) or isinstance(module, Linear)
        if leaf and wrap(module, "forward", type(module).__name__):
            modules.add(type(module).__name__)
    phases = [
        (engine.scheduler, "schedule", "schedule"),
        (engine, "_seq_group_metadata", "step metadata"),
        (model_runner_module, "prepare_model_input", "prepare inputs"),
        (runner, "_prepare_inputs", "prepare inputs"),  # before the engine/worker seam (issue 12)
        (runner.model, "forward", FORWARD),
        (runner.step_graphs, "forward", FORWARD),  # a replayed decode step (worker/step_graph.py)
        (runner.model, "compute_logits", LM_HEAD),
        (runner.model, "greedy_tokens", LM_HEAD),
        (runner.sampler, "forward", "sampler"),
    ]
    wrap(engine, "step", STEP)
    return list(dict.fromkeys(label for obj, attr, label in phases if wrap(obj, attr, label))), modules


def after_each_step(llm: LLM, hook) -> None:
    """Call ``hook(seconds)`` after every engine step with the step's wall time."""
    step = llm.llm_engine.step

    def timed_step():
        start = time.perf_counter()
        out = step()
        hook(time.perf_counter() - start)
        return out

    llm.llm_engine.step = timed_step


def innermost_range(event: FunctionEvent, ranges: set[str]) -> str | None:
    parent = event.cpu_parent
    while parent is not None and parent.name not in ranges:
        parent = parent.cpu_parent
    return parent.name if parent is not None else None


@dataclass
class Row:
    span: float = 0.0  # microseconds inside the range
    ops: float = 0.0  # self time of the ops directly inside it (not inside a nested range)
    top: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def breakdown(events: list[FunctionEvent], phases: list[str], modules: set[str]) -> tuple[dict[str, Row], dict[str, Row]]:
    """Time by engine phase, and time inside the model forward by module class. An op belongs to
    its innermost range; a module range outside the forward (the tied LM head) counts as its phase."""
    ranges = set(phases) | modules | {STEP}
    by_phase: dict[str, Row] = defaultdict(Row)
    by_module: dict[str, Row] = defaultdict(Row)
    for e in events:
        in_forward = innermost_range(e, {FORWARD}) == FORWARD
        if e.name in ranges:
            if e.name not in modules:
                by_phase[e.name].span += e.time_range.elapsed_us()
            elif in_forward:
                by_module[e.name].span += e.time_range.elapsed_us()
            continue
        owner = innermost_range(e, ranges)
        if owner is None:
            continue
        rows = [by_phase[FORWARD], by_module[owner if owner in modules else BETWEEN]] if in_forward else []
        if not in_forward:
            rows.append(by_phase[owner if owner not in modules else innermost_range(e, set(phases) | {STEP})])
        for row in rows:
            row.ops += e.self_cpu_time_total
            row.top[e.name] += e.self_cpu_time_total
    by_module[BETWEEN].span = by_phase[FORWARD].span - sum(r.span for name, r in by_module.items() if name != BETWEEN)
    nested = sum(by_phase[p].span for p in phases)
    step = by_phase.pop(STEP)
    by_phase["rest of step (outputs, stop checks, ...)"] = Row(step.span - nested, step.ops, step.top)
    return by_phase, by_module


def print_rows(title: str, rows: dict[str, Row], steps: int, step_us: float) -> None:
    print(f"\n{title:<40} {'ms/step':>8} {'% step':>7} {'ops ms':>7} {'other ms':>9}  top ops (ms/step)")
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1].span):
        top = ", ".join(f"{op.removeprefix('aten::')} {t / steps / 1e3:.1f}" for op, t in
                        sorted(r.top.items(), key=lambda kv: -kv[1])[:4])
        print(f"{name:<40} {r.span / steps / 1e3:8.2f} {100 * r.span / step_us:6.1f}% {r.ops / steps / 1e3:7.2f} "
              f"{(r.span - r.ops) / steps / 1e3:9.2f}  {top}")


def start(args: argparse.Namespace, model: str, num_seqs: int) -> tuple[LLM, list[dict], SamplingParams]:
    """The engine after a short warm-up, ``num_seqs`` prompts and their sampling parameters."""
    llm = LLM(model, dtype=args.dtype, max_num_seqs=num_seqs, block_size=args.block_size, enforce_eager=args.enforce_eager)
    prompts = prompts_for(llm, argparse.Namespace(**{**vars(args), "num_seqs": num_seqs}))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    return llm, prompts, params


@dataclass
class DecodeSteps:
    seconds: list[float]  # each step of the window
    context: float  # mean cached tokens per sequence that the window's attention reads
    others: float  # other processes' CPU (cores) during the whole generate


def time_decode(llm: LLM, prompts: list[dict], params: SamplingParams, skip: int, steps: int) -> DecodeSteps:
    """Generate, timing each engine step; the window is the first ``steps`` steps after ``skip``
    that decode every sequence and prefill nothing."""
    recorded: list[tuple[float, int, int]] = []  # seconds, decodes, cached tokens read
    shape = [0, 0]
    prepare = model_runner_module.prepare_model_input

    def record_shape(*args, **kwargs):
        meta = (model_input := prepare(*args, **kwargs)).attn_metadata
        shape[:] = (-1, 0) if meta.num_prefill_tokens else (len(meta.decode_seq_lens), int(meta.decode_seq_lens.sum()))
        return model_input

    model_runner_module.prepare_model_input = record_shape
    after_each_step(llm, lambda seconds: recorded.append((seconds, *shape)))
    try:
        with Load() as load:
            llm.generate(prompts, params, use_tqdm=False)
    finally:
        model_runner_module.prepare_model_input = prepare
    window = [r for r in recorded[skip:] if r[1] == len(prompts)][:steps]
    return DecodeSteps([r[0] for r in window], sum(r[2] for r in window) / len(window) / len(prompts), load.others)


def linear_seconds(linears: list[Linear], rows: int) -> float:
    """Fastest of 8 passes over ``linears`` (after 2), each on ``rows`` input rows."""
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=m.weight.dtype) for m in linears}
    with torch.inference_mode():
        return timeit(lambda: [m(inputs[m.in_features]) for m in linears], torch.device("cpu"), iters=8, warmup=2)


def roofline(args: argparse.Namespace, model: str) -> None:
    """One row per batch size: its decode step against its roofline and against one weight read."""
    bandwidth = copy_bandwidth(torch.device("cpu"), iters=5)
    print(f"{args.dtype}, {args.threads} threads; copy bandwidth (1 GiB tensor.copy_, read + write, best of 5): "
          f"{bandwidth / 1e9:.1f} GB/s; mean of up to {args.steps} full-batch decode steps after {args.skip}")
    print(f"{'batch':>5} {'context':>7} {'step ms':>8} {'matmul ms':>9} {'KV ms':>6} {'roofline ms':>11} "
          f"{'/roofline':>9} {'weights ms':>10} {'/weights':>8} {'others':>6}")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        llm, prompts, params = start(args, model, batch)
        runner = llm.llm_engine.model_runner
        linears = [m for m in runner.model.modules() if isinstance(m, Linear)]
        before = linear_seconds(linears, batch)
        run = time_decode(llm, prompts, params, args.skip, args.steps)
        matmul_ms = 1e3 * min(before, linear_seconds(linears, batch))
        token_bytes = block_bytes(runner.model_config, runner.cache_config) / runner.cache_config.block_size
        kv_ms = 1e3 * batch * run.context * token_bytes / bandwidth
        weights_ms = 1e3 * sum(m.weight.numel() * m.weight.element_size() for m in linears) / bandwidth
        step_ms = 1e3 * sum(run.seconds) / len(run.seconds)
        print(f"{batch:>5} {run.context:7.0f} {step_ms:8.2f} {matmul_ms:9.2f} {kv_ms:6.2f} {matmul_ms + kv_ms:11.2f} "
              f"{step_ms / (matmul_ms + kv_ms):8.2f}x {weights_ms:10.2f} {step_ms / weights_ms:7.2f}x "
              f"{run.others:6.2f}", flush=True)
        llm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (8, 16 or 32)")
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=192)
    parser.add_argument("--skip", type=int, default=16, help="steps before the profiled window (prefill)")
    parser.add_argument("--steps", type=int, default=128, help="decode steps to profile")
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--prompt-len", type=int, default=64, help="synthetic prompt length")
    parser.add_argument("--no-profiler", action="store_true", help="only time the steps (for py-spy)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--roofline", action="store_true", help="decode steps against their roofline, no profiler")
    parser.add_argument("--batch-sizes", default="1,8,64,256", help="with --roofline")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run every step op by op from Python (LLM's enforce_eager); the by-module table needs it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or default_model_path()
    if args.roofline:
        roofline(args, model)
        return

    llm, prompts, params = start(args, model, args.num_seqs)
    run = time_decode(llm, prompts, params, args.skip, args.steps)
    step_ms = 1e3 * sum(run.seconds) / len(run.seconds)
    print(f"{args.num_seqs} sequences, {args.dtype}, {args.threads} threads: {len(run.seconds)} decode steps "
          f"of {step_ms:.1f} ms = {args.num_seqs / step_ms * 1e3:.0f} tok/s (no profiler; other processes "
          f"kept {run.others:.2f} cores busy meanwhile)")
    if args.no_profiler:
        return

    phases, modules = instrument(llm)
    active = args.steps - 2
    schedule = torch.profiler.schedule(wait=args.skip, warmup=2, active=active, repeat=1)
    engine_steps = 0

    def next_step(seconds: float) -> None:
        nonlocal engine_steps
        engine_steps += 1
        prof.step()

    with Load() as load, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule) as prof:
        after_each_step(llm, next_step)
        llm.generate(prompts, params, use_tqdm=False)
    # The run may end before the window does (a short --output-len).
    steps = min(active, engine_steps - args.skip - 2)
    if steps <= 0:
        raise SystemExit(f"only {engine_steps} engine steps: raise --output-len above --skip + 2")
    by_phase, by_module = breakdown(prof.events(), phases, modules)
    step_us = sum(r.span for r in by_phase.values())
    print(f"\nwith torch.profiler: {step_us / steps / 1e3:.1f} ms per decode step (profiler overhead included; other "
          f"processes kept {load.others:.2f} cores busy); 'other ms' = span minus op self-time: Python, dispatch, allocation")
    print_rows("engine phase", by_phase, steps, step_us)
    overhead = step_us - by_phase[FORWARD].span - by_phase[LM_HEAD].span
    print(f"per-step engine overhead (schedule + prepare inputs + sampler + outputs, detokenisation, stop "
          f"checks): {overhead / steps / 1e3:.2f} ms = {100 * overhead / step_us:.1f}% of the step")
    if any(name != BETWEEN for name in by_module):
        print_rows("model forward, by module class", by_module, steps, step_us)
    else:
        print("(no module ranges: replayed decode steps run no module code; --enforce-eager shows them)")


if __name__ == "__main__":
    main()
