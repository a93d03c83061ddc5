"""``pagedlm run --ray``: the same job over Ray Data, for inputs and outputs every node can read.

read_text (JSONL, so that a bad line is one error row) or read_parquet → the pagedlm processor (one
``LLM`` per actor) → one file per block in the output directory. Resume skips the ids the
directory's files already hold (Ray Data's own ``CheckpointConfig`` filters rows by an id column at
read time, which needs ``read_json``: one bad line would fail the whole read).
"""

import json
import os
from collections.abc import Iterator

import pyarrow as pa
import ray
import ray.data
from ray.data.datasource.file_datasink import BlockBasedFileDatasink

from pagedlm.entrypoints.jobs.files import PARQUET_SUFFIXES, file_kind
from pagedlm.entrypoints.jobs.progress import JobStats
from pagedlm.entrypoints.jobs.runner import JobConfig, check_record, job_record
from pagedlm.integrations.ray import PagedLMProcessorConfig, Processor


def run_ray_job(config: JobConfig, address: str | None = None, num_actors: int = 1,
                torch_threads: int | None = None, cpus_per_actor: float | None = None) -> JobStats:
    """Run the job on Ray (``address``: a running cluster; None: the one this process already
    joined, or a new local one) with ``num_actors`` actors of ``torch_threads`` threads, each
    reserving ``cpus_per_actor`` CPUs (default ``torch_threads``, else 1). ``config.output`` is a directory of
    ``.jsonl`` or ``.parquet`` files: the output's format is its suffix's, else the input's.

    Raises:
        ValueError: before Ray starts: a bad option, OpenAI batch rows (the Ray path runs plain
            rows), an output that exists without ``resume``, or other settings than the job's.
    """
    in_kind = file_kind(config.input, "--input")
    out_kind = file_kind(config.output, "--output") if config.output.lower().endswith(
        (".jsonl", ".json", ".ndjson") + PARQUET_SUFFIXES) else in_kind
    if type(num_actors) is not int or num_actors < 1:
        raise ValueError(f"--num-actors must be a positive integer, got {num_actors!r}")
    if config.input_format == "openai":
        raise ValueError("--ray runs plain rows (id + prompt/messages/prompt_token_ids); OpenAI batch rows run "
                         "without --ray")
    if os.path.isfile(config.output):
        raise ValueError(f"--output {config.output!r} is a file; with --ray it is a directory of files")
    check_record(config, job_record(config, "plain"), started=os.path.isdir(config.output))
    processor_config = PagedLMProcessorConfig(
        model_source=config.model, engine_kwargs=dict(config.engine), sampling_params=dict(config.sampling),
        concurrency=num_actors, batch_size=config.max_in_flight or 256,
        num_cpus=cpus_per_actor if cpus_per_actor is not None else torch_threads, torch_threads=torch_threads,
    )
    if not ray.is_initialized():
        ray.init(address=address)
    done_ids = sorted(_done_ids(config.output, out_kind)) if config.resume and os.path.isdir(config.output) else []
    processor = Processor(processor_config, json_lines_in=in_kind == "jsonl", json_lines_out=out_kind == "jsonl",
                          done_ids=ray.put(done_ids))
    stats = JobStats()
    ds = ray.data.read_text(config.input) if in_kind == "jsonl" else ray.data.read_parquet(config.input)
    ds = processor(ds)
    if out_kind == "jsonl":
        ds.write_datasink(JsonLinesDatasink(config.output))
    else:
        ds.write_parquet(config.output)
    done = set(done_ids)
    run_rows = [r for r in _output_rows(config.output, out_kind) if r.get("id") is None or str(r["id"]) not in done]
    stats.skipped = len(done_ids)
    stats.rows = stats.skipped + len(run_rows)
    stats.errors = sum(1 for r in run_rows if r["error"])
    stats.completed = len(run_rows) - stats.errors
    stats.prompt_tokens = sum(r["prompt_tokens"] or 0 for r in run_rows)
    stats.completion_tokens = sum(r["completion_tokens"] or 0 for r in run_rows)
    with open(config.output.rstrip("/") + ".summary.json", "w") as f:
        json.dump({**stats.summary(False), "output": config.output}, f, indent=2)
    return stats


def _output_files(directory: str, kind: str) -> list[str]:
    suffixes = (".jsonl",) if kind == "jsonl" else (".parquet",)
    return sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(suffixes))


def _output_rows(directory: str, kind: str) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for path in _output_files(directory, kind):
        if kind == "jsonl":
            with open(path, encoding="utf-8") as f:
                yield from (json.loads(line) for line in f)
        else:
            yield from pq.read_table(path, columns=["id", "prompt_tokens", "completion_tokens", "error"]).to_pylist()


def _done_ids(directory: str, kind: str) -> set[str]:
    """The ids (as text) of the rows the output's files hold. A file a kill left unreadable or torn
    is repaired (a torn last line cut off) or moved aside, and its rows run again."""
    import pyarrow.parquet as pq

    done = set()
    for path in _output_files(directory, kind):
        try:
            if kind == "parquet":
                ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
            else:
                ids = _jsonl_ids(path)
        except (OSError, ValueError, pa.ArrowException):
            os.replace(path, path + ".damaged")
            continue
        done.update(str(i) for i in ids if i is not None)
    return done


def _jsonl_ids(path: str) -> list:
    ids, good_end = [], 0
    with open(path, "rb+") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            ids.append(json.loads(line).get("id"))
            good_end += len(line)
        f.truncate(good_end)
    return ids


class JsonLinesDatasink(BlockBasedFileDatasink):
    """Writes each block's ``line`` column (output rows already serialized) as one ``.jsonl`` file."""

    def __init__(self, path: str) -> None:
        super().__init__(path, file_format="jsonl")

    def write_block_to_file(self, block, file) -> None:
        lines = block.to_arrow().column("line").to_pylist()
        file.write("".join(line + "\n" for line in lines).encode("utf-8"))
