"""The ``pagedlm`` command: ``pagedlm run ...`` runs a job; anything else runs the demo."""

import argparse
import json
import re
import signal
import sys

from pagedlm.entrypoints import demo
from pagedlm.entrypoints.jobs.files import OutputWriteError
from pagedlm.entrypoints.jobs.progress import say
from pagedlm.entrypoints.jobs.runner import INPUT_FORMATS, JobConfig, run_job

# Command-line flags that set the job's sampling defaults: (flag, SamplingParams field, type).
SAMPLING_FLAGS = [
    ("--temperature", "temperature", float), ("--top-p", "top_p", float), ("--top-k", "top_k", int),
    ("--min-p", "min_p", float), ("--max-tokens", "max_tokens", int), ("--min-tokens", "min_tokens", int),
    ("--n", "n", int), ("--seed", "seed", int), ("--presence-penalty", "presence_penalty", float),
    ("--thinking-token-budget", "thinking_token_budget", int),
    ("--frequency-penalty", "frequency_penalty", float), ("--repetition-penalty", "repetition_penalty", float),
]


def _json_object(text: str) -> dict:
    """A flag's JSON object (vLLM's config flags take one)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


ENGINE_FLAGS = [
    ("--dtype", "dtype", str), ("--device", "device", str), ("--max-model-len", "max_model_len", int),
    ("--block-size", "block_size", int), ("--num-kv-blocks", "num_kv_blocks", int),
    ("--kv-cache-memory-bytes", "kv_cache_memory_bytes", int), ("--kv-cache-dtype", "kv_cache_dtype", str),
    ("--max-num-seqs", "max_num_seqs", int),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int), ("--generation-config", "generation_config", str),
    ("--tokenizer", "tokenizer", str), ("--chat-template", "chat_template", str),
    ("--gpu-memory-utilization", "gpu_memory_utilization", float), ("--reasoning-parser", "reasoning_parser", str),
    ("--max-logprobs", "max_logprobs", int), ("--structured-outputs-config", "structured_outputs_config", _json_object),
]

_ENGINE_HELP = {
    "--max-logprobs": "the most logprobs / prompt_logprobs a row may ask for (default 20, vLLM's; -1: the vocabulary)",
    "--reasoning-parser": "vLLM's reasoning parser of the model (qwen3, deepseek_r1, ...): thinking_token_budget's "
                          "strings, and structured outputs start after the reasoning",
    "--structured-outputs-config": "vLLM's, as a JSON object: backend, reasoning_parser, enable_in_reasoning, "
                                   "disable_any_whitespace (e.g. '{\"enable_in_reasoning\": true}': grammars hold "
                                   "from the first token; '{\"disable_any_whitespace\": true}': compact JSON)",
}


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedlm run",
        description="Complete every row of a JSONL or Parquet file into an output file, writing each row as it "
                    "finishes; a row that cannot run gets an error in its output row. Formats: docs/jobs.md.",
    )
    parser.add_argument("--model", default=None, help="checkpoint directory, .gguf file or Hugging Face Hub id "
                                                       "(from the local Hub cache; default: SmolLM2-135M-Instruct)")
    parser.add_argument("--input", required=True, help="rows to run: .jsonl, .json, .ndjson (JSON Lines) or "
                                                       ".parquet, .pq")
    parser.add_argument("--output", required=True, help="where results go: .jsonl, .json, .ndjson (JSON Lines) or "
                                                        ".parquet, .pq (Parquet for plain rows only)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the job that writes --output: skip the ids it holds, append the rest")
    parser.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                        help="openai (Batch API rows), plain (id + prompt/messages/prompt_token_ids), or auto "
                             "(the format of the first row that looks like either: plain with a prompt, messages or "
                             "prompt_token_ids column, else openai with custom_id and one of method, url, body, else "
                             "plain with id)")
    parser.add_argument("--served-model-name", action="append", dest="served_model_names", default=None,
                        help="a name OpenAI rows' body.model may give, replacing the default names (repeatable; "
                             "default: --model as given and its basename)")
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="take a row's own chat_template (vLLM's server flag): a template is code the job "
                             "runs, and a loop in one can hold the job; without it such a row is its error "
                             "(--chat-template sets the job's)")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="most requests queued in the engine at once (default: twice max_num_seqs); with "
                             "--ray, the rows of one Ray Data batch an actor runs at once (default 256)")
    parser.add_argument("--progress-interval", type=float, default=None,
                        help="seconds between progress lines when stderr is not a terminal (0: a line per row; "
                             "default 10; not with --ray, which shows Ray Data's progress)")
    distributed = parser.add_argument_group("Ray Data (docs/distributed.md; pip install 'pagedlm[ray]')")
    distributed.add_argument("--ray", action="store_true",
                             help="run on Ray Data, one LLM per actor; --output is then a directory of files")
    distributed.add_argument("--ray-address", default=None,
                             help="a running Ray cluster, or auto: the one `ray start` left on this machine "
                                  "(default: RAY_ADDRESS's, else a new local one)")
    distributed.add_argument("--num-actors", type=int, default=None, help="actors, one LLM each (default 1)")
    distributed.add_argument("--threads-per-actor", type=int, default=None,
                             help="torch threads of each actor's LLM (default: --cpus-per-actor rounded down, "
                                  "else 1)")
    distributed.add_argument("--cpus-per-actor", type=float, default=None,
                             help="CPUs Ray reserves for each actor (default: --threads-per-actor, else 1); leave "
                                  "at least one of the cluster's for Ray's read and write tasks")
    sampling = parser.add_argument_group("sampling defaults (each row's own fields win)")
    for flag, _, typ in SAMPLING_FLAGS:
        sampling.add_argument(flag, type=typ, default=None)
    sampling.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    sampling.add_argument("--ignore-eos", action="store_true", default=None)
    engine = parser.add_argument_group("engine (see LLM's arguments)")
    for flag, _, typ in ENGINE_FLAGS:
        engine.add_argument(flag, type=typ, default=None, help=_ENGINE_HELP.get(flag))
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    engine.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None)
    engine.add_argument("--calculate-kv-scales", action=argparse.BooleanOptionalAction, default=None)
    engine.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                        help="--no-batch-invariant: on CUDA, one cuBLAS product per linear; rows then depend on "
                             "the batch (CPU: refused, but for the torch-reference ops backend)")
    engine.add_argument("--enforce-eager", action="store_true", default=None,
                        help="run every step op by op, without replaying recorded decode steps")
    engine.add_argument("--trust-remote-code", action="store_true", default=None)
    engine.add_argument("--enable-trace-replay", action="store_true", default=None,
                        help="let rows force their tokens (sampling_params.trace_decode_token_ids)")
    return parser


def _naming_the_flag(message: str, values: dict[str, object]) -> str:
    """A SamplingParams or LLM error about a field a flag set ("temperature must be ...") led by
    that flag as the user typed it (``--no-batch-invariant`` for a False)."""
    for field, value in values.items():
        if re.match(rf"{field}\b", message):
            return f"--{'no-' if value is False else ''}{field.replace('_', '-')}: {message}"
    return message


def run_main(argv: list[str]) -> int:
    parser = run_parser()
    args = parser.parse_args(argv)
    sampling_fields = [field for _, field, _ in SAMPLING_FLAGS] + ["stop", "ignore_eos"]
    sampling = {field: getattr(args, field) for field in sampling_fields if getattr(args, field) is not None}
    engine_fields = [field for _, field, _ in ENGINE_FLAGS] + ["enable_prefix_caching", "enable_chunked_prefill",
                                                         "calculate_kv_scales", "batch_invariant", "enforce_eager",
                                                         "trust_remote_code", "enable_trace_replay"]
    engine = {field: getattr(args, field) for field in engine_fields if getattr(args, field) is not None}
    config = JobConfig(
        input=args.input, output=args.output, model=args.model, resume=args.resume, input_format=args.input_format,
        served_model_names=args.served_model_names, sampling=sampling, engine=engine,
        max_in_flight=args.max_in_flight, trust_request_chat_template=args.trust_request_chat_template,
        **({} if args.progress_interval is None else {"progress_interval": args.progress_interval}),
    )
    ray_flags = (args.ray_address, args.num_actors, args.threads_per_actor, args.cpus_per_actor)
    if not args.ray and any(value is not None for value in ray_flags):  # a hunt: 0 and "" were ignored
        parser.error("--ray-address, --num-actors, --threads-per-actor and --cpus-per-actor need --ray")
    if args.ray and args.progress_interval is not None:  # found by a hunt: accepted and ignored
        parser.error("--progress-interval sets the local run's progress lines; with --ray, Ray Data shows its own")
    try:
        if args.ray:
            stats, interrupted = _run_on_ray(config, args)
        else:
            stats, interrupted = run_job(config)
    except ValueError as exc:  # the flags parsed: the reason alone, not the usage before it
        parser.exit(2, f"{parser.prog}: error: {_naming_the_flag(str(exc), {**sampling, **engine})}\n")
    except OutputWriteError as exc:
        say(f"pagedlm run: error: {exc.strerror}")
        return 1
    summary = stats.summary(interrupted is not None)
    say(f"[pagedlm run] {'done' if interrupted is None else 'interrupted'}: {stats.rows} rows read, {stats.completed} "
        f"completed, {stats.errors} errors, {stats.skipped} already done; {stats.prompt_tokens} prompt + "
        f"{stats.completion_tokens} generated tokens in {summary['wall_time_s']:.1f} s "
        f"({summary['generated_tokens_per_s']} generated tok/s). Summary: {args.output}.summary.json")
    return 0 if interrupted is None else 128 + interrupted


def _run_on_ray(config: JobConfig, args: argparse.Namespace):
    try:
        from pagedlm.entrypoints.jobs.ray_job import run_ray_job
    except ImportError as exc:
        raise ValueError(f"--ray needs Ray Data: pip install 'pagedlm[ray]' ({exc})") from None
    return run_ray_job(config, args.ray_address, 1 if args.num_actors is None else args.num_actors,
                       args.threads_per_actor, args.cpus_per_actor)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        code = stopped = None
        try:
            code = run_main(argv[1:])
        except KeyboardInterrupt:  # outside the job's own handling (before it, or once it has reported)
            code, stopped = 128 + signal.SIGINT, True
        finally:
            # Only a note and the interpreter's shutdown are left: another Ctrl-C would just print a
            # traceback there.
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_IGN)
        if stopped:
            say("[pagedlm run] SIGINT: stopped")
        sys.exit(code)
    demo.main(argv)
