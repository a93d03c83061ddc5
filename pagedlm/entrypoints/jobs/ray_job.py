"""``pagedlm run --ray``: the same job over Ray Data, for inputs and outputs every node can read
(shared paths, or URIs such as ``s3://``: ``storage``).

``JsonLinesDatasource`` (JSONL as lines, so that a bad line is one error row) or read_parquet → the pagedlm processor (one
``LLM`` per actor) → one file per block in the output directory. Resume skips the ids the
directory's files already hold (Ray Data's own ``CheckpointConfig`` filters rows by an id column at
read time, which needs ``read_json``: one bad line would fail the whole read).
"""

import contextlib
import dataclasses
import json
import os
import signal
import socket
from collections.abc import Iterator

import pyarrow as pa
import ray
import ray.data
from ray.data.datasource import FileBasedDatasource
from ray.data.datasource.file_datasink import BlockBasedFileDatasink

from pagedlm.entrypoints.jobs import storage
from pagedlm.entrypoints.jobs.files import (
    JSONL_SUFFIXES, PARQUET_SUFFIXES, JobInput, blank_line, file_kind, id_text, input_schema, read_rows,
    resolve_input,
)
from pagedlm.entrypoints.jobs.plain_rows import PlainFormat
from pagedlm.entrypoints.jobs.progress import JobStats, say
from pagedlm.entrypoints.jobs.runner import (
    JobConfig, JobInterrupted, check_column_types, check_input_file, check_output_outside, check_record,
    check_result_columns, check_served_model_names, exclusive_run, job_engine_kwargs, job_record, read_input,
    signals_deferred, signals_interrupt, write_record,
)
from pagedlm.integrations.ray import PagedLMProcessorConfig, Processor
from pagedlm.transformers_utils.hub import is_hub_model_id
from pagedlm.utils import deferred_signals


def run_ray_job(config: JobConfig, address: str | None = None, num_actors: int = 1,
                torch_threads: int | None = None, cpus_per_actor: float | None = None) -> tuple[JobStats, int | None]:
    """Run the job on Ray (``address``: a running cluster, "auto" the one ``ray start`` left on this
    machine; None: the one this process already joined, else the one ``RAY_ADDRESS`` names, else a
    new local one, never a cluster found on the machine, as Ray's own ``ray.init()`` would) with
    ``num_actors`` actors of ``torch_threads`` threads, each reserving ``cpus_per_actor`` CPUs (default ``torch_threads``, else 1; threads default to the
    CPUs reserved, rounded down). ``config.input`` (a file, or a directory of them: ``input_files``)
    and ``config.output`` are paths every node reads or URIs (``s3://...``: ``storage``); the output
    is a directory of ``.jsonl`` or ``.parquet`` files, in its suffix's format, else the input's.
    Returns ``(stats, the signal or None)``: SIGINT/SIGTERM stop the run, keeping the files
    already written (``--resume`` continues).

    Raises:
        ValueError: before Ray starts: a bad option, a missing model or input, OpenAI batch rows
            (the Ray path runs plain rows), actors that would leave less than one CPU of a known
            cluster free, an unreachable ``address``, an output that exists without ``resume``,
            other settings than the job's, or another run of the job holding ``OUT.lock`` (a local
            output's; a URI's storage has none).
    """
    # The workers of a cluster that `ray start` began open paths from their own working directory (a hunt).
    config = dataclasses.replace(config, input=storage.absolute(config.input), output=storage.absolute(config.output))
    job_input = resolve_input(config.input)
    out_kind = file_kind(config.output, "--output") if config.output.lower().endswith(
        JSONL_SUFFIXES + PARQUET_SUFFIXES) else job_input.kind
    for name, value in (("--num-actors", num_actors), ("--threads-per-actor", torch_threads),
                        ("--max-in-flight", config.max_in_flight)):
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if cpus_per_actor is not None and not cpus_per_actor > 0:
        raise ValueError(f"--cpus-per-actor must be > 0, got {cpus_per_actor!r}")
    if not (storage.is_file(config.input) or storage.is_dir(config.input)):
        raise ValueError(f"--input {config.input!r} is not a file or a directory")
    check_output_outside(config.input, config.output)
    check_input_file(job_input)
    if config.model is not None and not (os.path.exists(config.model) or is_hub_model_id(config.model)):
        raise ValueError(f"--model {config.model!r} does not exist (every node must read the same path)")
    if read_input(config, job_input)[0] == "openai":
        raise ValueError("--ray runs plain rows (id + prompt/messages/prompt_token_ids); OpenAI batch rows run "
                         "without --ray")
    check_served_model_names(config, "plain")
    check_result_columns(job_input)
    check_column_types(job_input, PlainFormat)
    input_schema(job_input)  # shards whose types do not join fail Ray's read (found by a hunt)
    if storage.is_file(config.output):
        raise ValueError(f"--output {config.output!r} is a file; with --ray it is a directory of files")
    processor_config = PagedLMProcessorConfig(
        model_source=config.model, engine_kwargs=job_engine_kwargs(config), sampling_params=dict(config.sampling),
        concurrency=num_actors, batch_size=config.max_in_flight or 256,
        num_cpus=cpus_per_actor if cpus_per_actor is not None else torch_threads, torch_threads=torch_threads,
        trust_request_chat_template=config.trust_request_chat_template,
    )
    flag = "--ray-address"
    if address is None and not ray.is_initialized() and os.environ.get("RAY_ADDRESS"):
        address, flag = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if address not in (None, "auto", "local"):
        _check_reachable(address, flag)
    if ray.is_initialized() or address in (None, "local"):
        # The nodes of the cluster this process joined, or the local one it will start.
        nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]] if ray.is_initialized() \
            else [os.cpu_count() or 1]
        reserved = processor_config.num_cpus
        if reserved is not None and reserved > max(nodes, default=0):
            flag = "--cpus-per-actor" if cpus_per_actor is not None else "--threads-per-actor"  # the one given
            raise ValueError(f"{flag} {reserved:g} is more than the {max(nodes, default=0)} CPUs of the "
                             "largest Ray node: no actor could be placed")
        if not processor_config.leaves_a_cpu(sum(nodes)):
            raise ValueError(f"--num-actors {num_actors} actors of {reserved or 1} CPUs each (--cpus-per-actor, else "
                             f"--threads-per-actor, else 1) leave less than one of the {sum(nodes)} CPUs of the Ray "
                             "cluster free, and Ray's read and write tasks need one: the job would wait forever; "
                             "use fewer actors or CPUs per actor")
    # The driver holds OUT.lock where the output is a local path (flock has no form for a URI's storage).
    with contextlib.nullcontext() if storage.is_uri(config.output) else exclusive_run(config.output):
        return _run_ray_locked(config, processor_config, address, flag, job_input, out_kind)


def _run_ray_locked(config: JobConfig, processor_config: PagedLMProcessorConfig, address: str | None, flag: str,
                    job_input: JobInput, out_kind: str) -> tuple[JobStats, int | None]:
    """``run_ray_job`` once its options are checked (and the driver holds the output)."""
    record, started = job_record(config, "plain"), storage.is_dir(config.output)
    check_record(config, record, started)
    own_ray = not ray.is_initialized()
    if own_ray:
        try:
            # An interrupt waits for ray.init (found by a hunt: a Ctrl-C landing inside it left Ray half
            # connected, and its exit hook crashed the process: SIGSEGV), then ends the run before it starts.
            with deferred_signals():
                # "local" where none is given: ray.init() would join a cluster ray start left on the
                # machine, or wait minutes on a stale record of one (found by a docs walkthrough).
                ray.init(address=address or "local")
        except (KeyboardInterrupt, SystemExit):  # SystemExit: Ray's own SIGTERM handler, which it sets first
            ray.shutdown()
            raise
        except ConnectionError as exc:
            # Ray's own words name its flag (--address) for "auto": say it in pagedlm's
            why = ("no running Ray cluster was found on this machine (start one with `ray start --head`, or leave "
                   "--ray-address out to start a local one)") if address == "auto" else exc
            raise ValueError(f"{flag} {address!r}: {why}") from None
    if not started:
        write_record(config, record)
    stats, interrupted = JobStats(), None
    earlier: dict[str, list] = {}  # the ids in each of the output's files from earlier runs
    # A signal stops the rows (signals_interrupt), never the counting and the summary after them.
    with signals_deferred():
        try:
            with signals_interrupt():  # after ray.init, which sets handlers of its own
                if config.resume and started:
                    earlier = _earlier_ids(config.output, out_kind)
                done_ids = sorted({id_text(i) for ids in earlier.values() for i in ids if i is not None})
                json_lines = job_input.kind == "jsonl"
                processor = Processor(processor_config, json_lines_in=json_lines,
                                      json_lines_out=out_kind == "jsonl", done_ids=done_ids,
                                      json_fields=_json_fields(job_input) if json_lines and out_kind == "parquet" else None)
                ds = processor(_read_input(job_input))
                if out_kind == "jsonl":
                    ds.write_datasink(JsonLinesDatasink(config.output))
                else:
                    ds.write_parquet(config.output)
        except (JobInterrupted, KeyboardInterrupt) as exc:
            interrupted = exc.signum if isinstance(exc, JobInterrupted) else signal.SIGINT
            say(f"[pagedlm run] {signal.Signals(interrupted).name}: stopped; the files written are kept and "
                "--resume continues the job")
            if own_ray:
                ray.shutdown()  # ends the write tasks still running, before the files are counted
        if interrupted is None and not storage.is_dir(config.output):
            storage.make_dir(config.output)  # no rows, no files (found by a hunt: no output, and no job to resume)
        if storage.is_dir(config.output):
            _count_outputs(stats, config.output, out_kind, earlier)
        storage.write_text(config.output.rstrip("/") + ".summary.json",
                           json.dumps({**stats.summary(interrupted is not None), "output": config.output}, indent=2))
    return stats, interrupted


def _read_input(job_input: JobInput) -> "ray.data.Dataset":
    """The input's rows, a dataset of each file's joined: Ray resolves the paths
    of one read in threads that import fsspec's HTTP filesystem at once, and where aiohttp is
    missing one of them fails with an ImportError Ray does not catch (found by a test run)."""
    def read(file: str) -> "ray.data.Dataset":
        if job_input.kind == "jsonl":
            return ray.data.read_datasource(JsonLinesDatasource(file))
        # No hive partitioning: a directory named "prompt=x" must not add or replace columns.
        return ray.data.read_parquet(file, partitioning=None,
                                     file_extensions=[suffix.lstrip(".") for suffix in PARQUET_SUFFIXES])

    first, *others = map(read, job_input.files)
    return first.union(*others) if others else first


def _check_reachable(address: str, flag: str) -> None:
    """A quick TCP connect to ``host:port`` (ray.init would retry for minutes); ``flag`` names where
    the address came from."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{flag} {address!r}: no Ray cluster answers there ({exc})") from None


def _count_outputs(stats: JobStats, directory: str, kind: str, earlier: dict[str, list]) -> None:
    """This run's counts, from the whole output files it added (an interrupt can leave one torn,
    which the next ``--resume`` moves aside); ``skipped``: the rows with ids that the files of
    earlier runs hold (a row without an id runs again)."""
    rows = [row for path in _output_files(directory, kind) if path not in earlier
            for row in _whole_rows(path, kind, ("error", "prompt_tokens", "completion_tokens")) or ()]
    stats.skipped = sum(i is not None for ids in earlier.values() for i in ids)
    stats.rows = stats.skipped + len(rows)
    stats.errors = sum(error is not None for error, _, _ in rows)
    stats.completed = len(rows) - stats.errors
    stats.prompt_tokens = sum(n or 0 for _, n, _ in rows)
    stats.completion_tokens = sum(n or 0 for _, _, n in rows)


def _json_fields(job_input: JobInput) -> list[str]:
    """The top-level fields of a JSONL input's objects, in the order they first appear (one pass
    over its files in this process, before any row runs)."""
    fields: dict[str, None] = {}
    for _, row, _ in read_rows(job_input):  # a line that is not JSON has no fields of its own
        if isinstance(row, dict):
            fields.update(dict.fromkeys(row))
    return list(fields)


def _output_files(directory: str, kind: str) -> list[str]:
    return storage.list_files(directory, (".jsonl",) if kind == "jsonl" else (".parquet",))


def _earlier_ids(directory: str, kind: str) -> dict[str, list]:
    """The ids in each of the output's files, once those that a kill left torn or unreadable are
    moved aside (``*.damaged``): their rows run again."""
    earlier = {}
    for path in _output_files(directory, kind):
        rows = _whole_rows(path, kind, ("id",))
        if rows is None:
            storage.move(path, path + ".damaged")
        else:
            earlier[path] = [key for (key,) in rows]
    return earlier


def _whole_rows(path: str, kind: str, names: tuple[str, ...]) -> list[tuple] | None:
    """The ``names`` columns of an output file's rows, or None when the file does not read to its
    end: Parquet without its footer, JSONL with a torn line or one that is not an output row."""
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            table = pq.read_table(path, columns=list(names))
            return list(zip(*(table.column(name).to_pylist() for name in names)))
        rows = []
        with storage.open_input(path) as f:
            for line in f:
                if not line.endswith(b"\n"):
                    return None
                if blank_line(line):  # as the local resume skips them
                    continue
                row = json.loads(line)
                rows.append(tuple(row[name] for name in names))
        return rows
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None


class JsonLinesDatasource(FileBasedDatasource):
    """A JSONL file's lines that are not blank, as bytes in a ``text`` column, split on newlines only:
    ``read_text`` splits on every Unicode line break (a U+2028 inside a JSON string cut its row in
    two) and decodes the whole file at once (one bad byte failed the job). Each line is decoded
    where it is parsed, so a bad one is its row's error, as in the local runner."""

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        lines = [line for line in f.readall().split(b"\n") if not blank_line(line)]
        yield pa.table({"text": pa.array(lines, pa.binary())})


class JsonLinesDatasink(BlockBasedFileDatasink):
    """Writes each block's ``line`` column (output rows already serialized) as one ``.jsonl`` file."""

    def __init__(self, path: str) -> None:
        super().__init__(path, file_format="jsonl")

    def write_block_to_file(self, block, file) -> None:
        lines = block.to_arrow().column("line").to_pylist()
        file.write("".join(line + "\n" for line in lines).encode("utf-8"))
