"""``pagedlm run``: a file of prompts in, a file of completions out, resumable, one error per bad row.

Rows stream from the input through ``LLM.generate_as_completed`` (a bounded window of requests in
the engine) and each output row is written as soon as its request finishes, so the output is in
completion order. Resume works by id: a run skips the rows whose ids the output already holds.
"""

import dataclasses
import fcntl
import inspect
import json
import logging
import math
import os
import re
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from itertools import chain, islice, tee
from typing import Any

from pagedlm.entrypoints.jobs import storage
from pagedlm.entrypoints.jobs.files import (
    JsonlWriter, OutputWriteError, OutputWriter, ParquetWriter, Position, count_rows, file_kind, file_schema,
    JobInput, file_rows, input_schema, output_keys, read_rows, resolve_input,
)
from pagedlm.entrypoints.jobs.openai_batch import OpenAIBatchFormat
from pagedlm.entrypoints.jobs.plain_rows import PROMPT_COLUMNS, RESULT_COLUMNS, PlainFormat, output_schema
from pagedlm.entrypoints.jobs.progress import JobStats, Progress, say
from pagedlm.entrypoints.jobs.rows import (
    JOB_MAX_LOGPROBS, SAMPLING_FIELDS, JobFormat, JobRow, RowError, RowKey, check_thinking_budget, engine_has_reasoning,
    field_error, parse_row, sampling_defaults, unwritable_row,
)
from pagedlm.config import DTYPE_ALIASES, MODEL_CACHE_DTYPES, load_chat_template
from pagedlm.engine.reasoning_gate import ReasoningParser
from pagedlm.entrypoints.llm import LLM
from pagedlm.sampling_params import SamplingParams
from pagedlm.transformers_utils.gguf import DEFAULT_MODEL_NAME, default_model_path

logger = logging.getLogger("pagedlm")

INPUT_FORMATS = ("auto", "openai", "plain")


@dataclass
class JobConfig:
    """What ``pagedlm run`` was asked to do.

    ``sampling`` holds the job's sampling defaults from the command line (``SamplingParams``
    fields), over the model's generation config and under each row's own; ``engine`` the
    ``LLM(...)`` keyword arguments. A resumed run must give the same ``model``, ``sampling`` and
    generation config as the run that started the job.
    """

    input: str
    output: str
    model: str | None = None
    resume: bool = False
    input_format: str = "auto"
    served_model_names: list[str] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    max_in_flight: int | None = None
    progress_interval: float = 10.0
    sync_interval: float = 2.0
    # A row's own chat_template is taken (vLLM's --trust-request-chat-template): a template is code
    # the job runs, and a loop in one can hold the job; else such a row is its error.
    trust_request_chat_template: bool = False


class JobInterrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` swallows it
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_job(config: JobConfig, tty: bool | None = None, llm: LLM | None = None) -> tuple[JobStats, int | None]:
    """Run the job to the end of the input, or until SIGINT/SIGTERM: ``(stats, the signal or None)``.

    ``tty`` forces the progress display (default: a bar when stderr is a terminal). ``llm`` runs the
    job on a model already loaded (a notebook's), which stays open; ``config.model`` and
    ``config.engine`` must then be unset.

    Raises:
        ValueError: before any model is loaded or row is run: a bad option, an output that exists
            without ``resume``, a resume whose settings differ from the job's record, or another
            run writing the same output.
        OutputWriteError: the output's storage refused a write (the rows synced before stay).
    """
    if llm is not None and (config.model is not None or config.engine):
        raise ValueError("run_job(llm=...) runs on that LLM: leave JobConfig.model and JobConfig.engine unset")
    if config.model is not None and (not isinstance(config.model, str) or not config.model.strip()):
        raise ValueError(f"--model must be a checkpoint directory, a .gguf file or a Hub id (leave it out for "
                         f"the embedded model), got {config.model!r}")
    for flag, path in (("--input", config.input), ("--output", config.output)):
        if storage.is_uri(path):
            raise ValueError(f"{flag} {path!r}: URIs are read and written by --ray jobs; a local job takes local paths")
    job_input = resolve_input(config.input)
    out_kind = file_kind(config.output, "--output")
    _check_paths(config, job_input)
    if config.max_in_flight is not None and (type(config.max_in_flight) is not int or config.max_in_flight < 1):
        raise ValueError(f"--max-in-flight must be a positive integer, got {config.max_in_flight!r}")
    interval = config.progress_interval
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval < math.inf:
        raise ValueError(f"--progress-interval must be a finite number of seconds >= 0 (0: a line per row), "
                         f"got {interval!r}")
    unknown = sorted(set(config.sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise ValueError(f"unknown sampling field(s) {', '.join(unknown)}; allowed: {', '.join(SAMPLING_FIELDS)}")
    defaults = SamplingParams(**config.sampling)  # a bad flag fails here, naming itself
    has_reasoning = llm.llm_engine.reasoning_tokens is not None if llm is not None else \
        engine_has_reasoning(config.engine)
    check_thinking_budget(defaults, has_reasoning, "--thinking-token-budget needs the model's reasoning strings: "
                                                   "--reasoning-parser (LLM's reasoning_parser or reasoning_config "
                                                   "from Python)")
    with exclusive_run(config.output):
        return _run_locked(config, tty, llm, job_input, out_kind)


def _run_locked(config: JobConfig, tty: bool | None, llm: LLM | None, job_input: JobInput,
                out_kind: str) -> tuple[JobStats, int | None]:
    """``run_job`` once the run holds its output: the checks that read the input and the job's
    record, then the rows."""
    fmt_name, rows = read_input(config, job_input)
    check_served_model_names(config, fmt_name)
    if fmt_name == "plain":
        check_result_columns(job_input)
    fmt_class = PlainFormat if fmt_name == "plain" else OpenAIBatchFormat
    check_column_types(job_input, fmt_class)
    if fmt_name == "openai" and out_kind != "jsonl":
        raise ValueError("OpenAI batch rows are written as JSONL: --output must end in .jsonl, .json or .ndjson")
    model = llm.llm_engine.model_config.model if llm is not None else config.model or default_model_path()
    # A loaded LLM of the embedded model serves its names, as the job that loads it does.
    given = model if llm is not None and model != default_model_path(download=False) else None
    names = served_model_names(config, config.model or given) if fmt_name == "openai" else None
    started = os.path.exists(config.output) or (out_kind == "parquet" and os.path.isdir(config.output + ".parts"))
    record = job_record(config, fmt_name, model, names)
    check_record(config, record, started)

    stats = JobStats()
    interrupted = finished = None
    own_llm = llm is None
    writer = progress = None
    # A signal stops the rows (signals_interrupt), never the writing of those that finished.
    with signals_deferred():
        try:
            with signals_interrupt():
                if started:  # what the output holds is read (and a damaged one refused) before the model loads
                    writer = _writer(out_kind, config, fmt_class, job_input)
                if own_llm:
                    llm = LLM(model, **job_engine_kwargs(config))
                if not started:  # once the engine settings have proved valid
                    write_record(config, record)
                    writer = _writer(out_kind, config, fmt_class, job_input)
                fmt = _job_format(fmt_name, config, names, llm, job_input.kind == "parquet")
                progress = Progress(stats, count_rows(job_input), config.progress_interval, tty)
                _Job(llm, fmt, writer, stats, progress).run(rows, config.max_in_flight)
                finished = True
        except JobInterrupted as exc:  # out of signals_interrupt: another signal only prints its note
            interrupted = exc.signum
            say(f"[pagedlm run] {exc}: writing what has finished and stopping; --resume continues the job")
        finally:
            try:
                if writer is not None:
                    writer.close(finished=bool(finished))
            finally:
                if progress is not None:
                    progress.close()
                if own_llm and llm is not None:
                    llm.close()
        summary = {**stats.summary(interrupted is not None), "output": config.output}
        try:
            storage.write_text(config.output + ".summary.json", json.dumps(summary, indent=2))
        except OSError as exc:  # the rows are written; only the summary is lost
            say(f"[pagedlm run] could not write {config.output}.summary.json ({exc.strerror or exc}); the output "
                "is complete")
    return stats, interrupted


@contextmanager
def exclusive_run(output: str) -> Iterator[None]:
    """Hold ``OUT.lock`` (``flock``) while the run writes ``output``: a second run of the same job
    (a scheduler that requeued it while the first still runs) is refused instead of writing the
    same rows again. The kernel drops the lock with the process, so a killed run leaves none. (A
    Ray job's output directory named with a trailing "/" locks beside it, as its record is.)"""
    path = output.rstrip("/") + ".lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ValueError(f"--output {output!r}: cannot create {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"--output {output!r}: another run of this job is writing it (it holds {path}); "
                             "let it finish or stop it first") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # locked a file the run before unlinked on its way out: lock the one at path now
    try:
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


def _check_paths(config: JobConfig, job_input: JobInput) -> None:
    if not (os.path.isfile(config.input) or os.path.isdir(config.input)):
        raise ValueError(f"--input {config.input!r} is not a file or a directory")
    out_dir = os.path.dirname(os.path.abspath(config.output))
    if not os.path.isdir(out_dir):
        why = "is not a directory" if os.path.exists(out_dir) else "does not exist"
        raise ValueError(f"--output {config.output!r}: the directory {out_dir!r} {why}")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--output {config.output!r}: the directory {out_dir!r} is not writable")
    if os.path.isdir(config.output):
        raise ValueError(f"--output {config.output!r} is a directory; name the output file")
    parts = config.output + ".parts"
    if os.path.lexists(parts) and not os.path.isdir(parts):
        raise ValueError(f"--output {config.output!r}: {parts!r}, where a Parquet output keeps its parts, is not a "
                         "directory; move it away")
    if os.path.abspath(config.input) == os.path.abspath(config.output):
        raise ValueError("--input and --output are the same file")
    check_output_outside(config.input, config.output)
    check_input_file(job_input)


def check_output_outside(input_path: str, output: str) -> None:
    """Refuse an output directly in a directory input: a later run (``--resume``) would read it, or
    the ``.job.json`` and ``.summary.json`` written beside it, as input (``files.input_files``
    leaves out subdirectories and names beginning with ``.`` or ``_``).

    Raises:
        ValueError: naming both.
    """
    real = (lambda path: path) if storage.is_uri(input_path) else os.path.realpath  # a symlinked directory too
    parent, name = os.path.split(real(storage.absolute(output)).rstrip("/"))
    if storage.is_dir(input_path) and parent == real(storage.absolute(input_path)).rstrip("/") \
            and not name.startswith((".", "_")):
        raise ValueError(f"--output {output!r} is in the --input directory {input_path!r}, whose files a later run "
                         "(--resume) would read as input, the output's own .job.json and .summary.json among them: "
                         "write it elsewhere")


def check_input_file(job_input: JobInput) -> None:
    """Refuse an input file (a directory's each) that is not JSON Lines
    (``check_json_lines``) or a Parquet file whose footer cannot be read, before any row runs.

    Raises:
        ValueError: naming the file and why.
    """
    if job_input.kind == "jsonl":
        for file in job_input.files:
            check_json_lines(file)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in job_input.files:
        try:
            pq.ParquetFile(storage.parquet_source(file))
        except (OSError, pa.ArrowException) as exc:
            why = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise ValueError(f"--input {file!r} is not a readable Parquet file ({why})") from None


def check_json_lines(path: str) -> None:
    """Refuse a JSON file that is not UTF-8 JSON Lines before any row runs, which would give an
    error row for every line (and a resume would count those rows as done): see
    ``_not_json_lines``. Only the start of the file is read; a first row that is merely bad JSON
    (or nested too deep) is left to be that row's error.

    Raises:
        ValueError: the file is not JSON Lines (the message names ``--input`` and what to do).
    """
    with storage.open_input(path) as f:
        sample = f.read(_JSON_LINES_SAMPLE)
    problem = _not_json_lines(sample, cut=len(sample) == _JSON_LINES_SAMPLE)
    if problem:
        raise ValueError(f"--input {path!r} {problem}")


def _is_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


_JSON_LINES_SAMPLE = 1 << 20  # bytes check_json_lines reads


def _not_json_lines(raw: bytes, cut: bool = False) -> str | None:
    """What makes a file starting with ``raw`` something other than UTF-8 JSON Lines, or None;
    ``cut``: the file goes on after ``raw``, so a first line without its end is not judged as a
    whole line (found by a hunt: a valid first row over 1 MiB was refused as copied out of an array
    or as ended by CR, by where the sample cut it)."""
    if raw.startswith(b"\x1f\x8b"):
        return "is gzip data; pagedlm run reads JSON Lines: decompress it first (gunzip)"
    if raw.startswith(b"PAR1"):  # found by a hunt: read as Latin-1 text, with iconv's advice
        return "is a Parquet file; pagedlm run reads a file by its name: name it .parquet"
    # UTF-16/32 without a byte-order mark: NUL bytes around the first character (a NUL in a later
    # line is only that line's error).
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\0" in raw.lstrip(b" \t\r\n")[:4]:
        return "is UTF-16 or UTF-32 text (a byte-order mark or NUL bytes); pagedlm run reads UTF-8: save it as UTF-8"
    # Another encoding (Latin-1, cp1252): two or more of the sample's whole lines hold bytes that are
    # not UTF-8 and none a UTF-8 character beyond ASCII. One such line is only that row's error.
    lines = raw.split(b"\n")[:-1]  # the last one may be cut by the sample's end
    bad = [i for i, line in enumerate(lines) if not _is_utf8(line)]
    if len(bad) >= 2 and not re.search("[^\x00-\x7f\ufffd]", raw.decode("utf-8", "replace")):
        byte = next(b for b in lines[bad[0]] if b >= 0x80)
        return (f"is not UTF-8 (byte 0x{byte:02x} on line {bad[0] + 1}, and {len(bad) - 1} more line(s) in its first "
                "MiB: Latin-1 or Windows-1252 text, most likely); pagedlm run reads UTF-8: save it as UTF-8, e.g. "
                "iconv -f cp1252 -t utf-8")
    head = raw.lstrip(b"\xef\xbb\xbf \t\r\n").decode("utf-8", "replace")
    first, _, rest = head.partition("\n")
    first_parses = _parses(first)
    # A whole line that is an array, with a line that is not one after it, is a bad row of JSON Lines
    # (found by a hunt: refused as an array file); a line of an array each is a batched dump.
    second = next((line for line in rest.split("\n") if line.strip()), "")
    if head.startswith("[") and not (first_parses and second and not second.lstrip().startswith("[")):
        return "holds a JSON array; pagedlm run reads JSON Lines (one object per line), e.g. jq -c '.[]' writes them"
    if first_parses:
        return None
    if cut and "\n" not in head:  # the first line goes on past the sample: only CR endings can be told
        return _CR_ENDINGS if "\r" in head and _parses(head.partition("\r")[0]) else None
    if "\r" in head and "\n" not in head:
        return _CR_ENDINGS
    if first.strip().endswith("},"):
        return ("holds lines copied out of a JSON array (its first line ends in '},'); pagedlm run reads JSON Lines "
                "(one object per line): remove the commas after the objects")
    try:
        _, end = json.JSONDecoder().raw_decode(head)
    except (ValueError, RecursionError):
        return None
    if end <= len(first):
        return None
    return "holds JSON spread over several lines (pretty-printed); pagedlm run reads JSON Lines (one object per line)"


_CR_ENDINGS = ("has lines ended by CR alone (old Mac line endings); pagedlm run reads JSON Lines: end them with LF "
               "(\\n), e.g. tr '\\r' '\\n'")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        return False


def job_engine_kwargs(config: JobConfig) -> dict[str, Any]:
    """``LLM``'s keyword arguments for a job: its engine settings, with the job's logprobs limit."""
    return {"max_logprobs": JOB_MAX_LOGPROBS, **config.engine}


def check_column_types(job_input: JobInput, fmt: type[JobFormat]) -> None:
    """Refuse a Parquet input with a column whose type makes an error of every row that sets it, as
    the model would only find row by row (and a resume would count those rows done): an id column
    (``fmt.key_field``) of ids the format does not take (float64, which pandas writes for an integer
    column with a missing value; integers as OpenAI's ``custom_id``), a request-fields column
    (``fmt.fields_column``) that is no object (JSON text), one of its integer fields stored as
    floats (pandas' integers with a missing value again), and a column of ``fmt.column_kinds``
    of another kind (a conversation as JSON text, token ids as floats); or with a column name
    twice (a row holds one value of a field).

    Raises:
        ValueError: naming the column, its type and the types allowed.
    """
    if job_input.kind != "parquet":
        return
    for file in job_input.files:
        _check_file_column_types(file, fmt)


def _check_file_column_types(path: str, fmt: type[JobFormat]) -> None:
    schema = file_schema(path)
    twice = sorted({name for name in schema.names if schema.names.count(name) > 1})
    if twice:
        raise ValueError(f"--input {path!r}: column(s) {', '.join(map(repr, twice))} appear more than once; a row "
                         "holds one value of each field: rename or drop the others")
    if fmt.key_field in schema.names:
        _check_id_type(path, fmt, schema.field(fmt.key_field).type)
    if fmt.fields_column in schema.names:
        _check_fields_type(path, fmt, schema.field(fmt.fields_column).type)
    for name, kind in fmt.column_kinds.items():
        if name in schema.names and not _is_kind(schema.field(name).type, kind):
            raise ValueError(f"--input {path!r}: column {name!r} is {schema.field(name).type}; it must hold "
                             f"{_KIND_WORDS[kind]}, or be null where a row has none")


_KIND_WORDS = {"text": "strings", "object": "objects (a struct or map column)", "list": "lists",
               "integer list": "lists of integers", "bool": "booleans"}


def _is_kind(typ: Any, kind: str) -> bool:
    """Whether a Parquet column's Arrow type holds values of ``kind`` (nulls only: any)."""
    import pyarrow as pa

    typ = typ.value_type if pa.types.is_dictionary(typ) else typ
    is_string_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow 16's (and Polars') strings
    is_list_view = getattr(pa.types, "is_list_view", lambda _: False)  # pyarrow 16's (a hunt: refused)
    is_large_list_view = getattr(pa.types, "is_large_list_view", lambda _: False)
    is_list = (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)
               or is_list_view(typ) or is_large_list_view(typ))
    return pa.types.is_null(typ) or {
        "text": lambda: pa.types.is_string(typ) or pa.types.is_large_string(typ) or is_string_view(typ),
        "object": lambda: pa.types.is_struct(typ) or pa.types.is_map(typ),
        "list": lambda: is_list,
        "integer list": lambda: is_list and (pa.types.is_integer(typ.value_type) or pa.types.is_null(typ.value_type)),
        "bool": lambda: pa.types.is_boolean(typ),
    }[kind]()


def _check_id_type(path: str, fmt: type[JobFormat], kind: Any) -> None:
    import pyarrow as pa

    key_field = fmt.key_field
    value = kind.value_type if pa.types.is_dictionary(kind) else kind
    text = not pa.types.is_null(value) and _is_kind(value, "text")
    if fmt.integer_keys and not (text or pa.types.is_integer(value)):
        raise ValueError(f"--input {path!r}: column {key_field!r} is {kind}; ids must be strings or integers (cast "
                         f"it first, e.g. pandas' df[{key_field!r}].astype('Int64') for whole numbers)")
    if not fmt.integer_keys and not text:
        raise ValueError(f"--input {path!r}: column {key_field!r} is {kind}; {key_field} must be strings (cast it "
                         f"first, e.g. pandas' df[{key_field!r}].astype(str))")


def _check_fields_type(path: str, fmt: type[JobFormat], kind: Any) -> None:
    import pyarrow as pa

    column = fmt.fields_column
    if pa.types.is_null(kind):  # null in every row: unset
        return
    if not (pa.types.is_struct(kind) or pa.types.is_map(kind)):
        raise ValueError(f"--input {path!r}: column {column!r} is {kind}; it must hold objects (a struct or map "
                         "column), as JSON text in a column is not read")
    if pa.types.is_map(kind):  # one value type for all keys: floats where a row names an integer field
        _check_map_fields(path, fmt, kind)
    children = [kind.field(i) for i in range(kind.num_fields)] if pa.types.is_struct(kind) else []
    for child in children:
        items = child.type
        while pa.types.is_list(items) or pa.types.is_large_list(items):  # prompt_logprob_token_ids: lists of lists
            items = items.value_type
        if child.name in fmt.integer_fields and pa.types.is_floating(items):
            raise ValueError(f"--input {path!r}: {column}.{child.name} is {child.type}; it must be integers (cast it "
                             f"first, e.g. pandas' Int64 for whole numbers with missing values)")
        numeric = pa.types.is_integer(items) or pa.types.is_floating(items) or pa.types.is_null(items)
        if child.name in fmt.integer_fields + fmt.number_fields and not numeric:  # a hunt: decimals, strings
            raise ValueError(f"--input {path!r}: {column}.{child.name} is {child.type}; it must be "
                             f"{'integers' if child.name in fmt.integer_fields else 'numbers'} (cast it first)")


def _check_map_fields(path: str, fmt: type[JobFormat], kind: Any) -> None:
    """A map request-fields column whose values are floats, with an integer field among its keys
    (found by a hunt: every row was that field's error, done for a resume)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    items = kind.item_type
    while pa.types.is_list(items) or pa.types.is_large_list(items):
        items = items.value_type
    if not pa.types.is_floating(items):
        return
    column = pq.ParquetFile(storage.parquet_source(path)).read(columns=[fmt.fields_column]).column(0)
    keys = set(pc.unique(pa.concat_arrays([chunk.keys for chunk in column.chunks])).to_pylist()) if column.num_chunks \
        else set()
    integers = sorted(keys & set(fmt.integer_fields))
    if integers:
        raise ValueError(f"--input {path!r}: {fmt.fields_column} is {kind}, and its rows set {', '.join(integers)}, "
                         "which must be integers: store the fields as a struct column of their own types")


def check_result_columns(job_input: JobInput) -> None:
    """Refuse plain rows from a Parquet file whose columns are named like the output's results, or
    a JSONL file whose first object holds every result field a job writes: a job's output, most
    likely, whose every row would be an error (``PlainFormat.parse``). (One JSON row with a stray
    ``error`` field is only that row's error.)

    Raises:
        ValueError: such columns (the message names them).
    """
    for file in job_input.files:
        if job_input.kind == "parquet":
            names = set(file_schema(file).names)
        else:
            first = next((row for _, row, _ in islice(file_rows(file, "jsonl"), 1000) if isinstance(row, dict)), {})
            names = set(first) if {"outputs", "prompt_tokens", "completion_tokens", "error"} <= set(first) else set()
        clash = [c for c in RESULT_COLUMNS if c in names]
        if clash:
            raise ValueError(f"--input {file!r} has column(s) {', '.join(clash)}, which the output writes (is it a "
                             "job's output?); drop or rename them in the input")


def _job_format(fmt_name: str, config: JobConfig, names: list[str] | None, llm: LLM, arrow_rows: bool) -> JobFormat:
    """The row format, with the job's sampling defaults: the model's generation config under the
    command line's. ``names``: OpenAI rows' ``served_model_names``; ``arrow_rows``: the input is Parquet."""
    defaults = sampling_defaults(llm, config.sampling)
    trusted = config.trust_request_chat_template
    if fmt_name == "plain":
        return PlainFormat(llm.get_tokenizer(), defaults, arrow_rows, trusted)
    return OpenAIBatchFormat(llm.get_tokenizer(), names, defaults, names_given=bool(config.served_model_names),
                             reasoning_parser=_reasoning_parser(llm), arrow_rows=arrow_rows,
                             trust_request_chat_template=trusted)


def served_model_names(config: JobConfig, model_name: str | None) -> list[str]:
    """The names an OpenAI row's ``body.model`` may give, the first written as the responses'
    ``model``: ``--served-model-name``'s, else the model as the user named it (``model_name``; None:
    the embedded one), with and without a trailing slash, and its directory's name."""
    if config.served_model_names:
        return config.served_model_names
    if model_name:
        names = [model_name, model_name.rstrip("/"), os.path.basename(os.path.normpath(model_name))]
    else:
        names = [DEFAULT_MODEL_NAME, "SmolLM2-135M-Instruct"]
    return list(dict.fromkeys(names))


def _reasoning_parser(llm: LLM) -> ReasoningParser | None:
    """The reasoning parser chat messages are split by: the LLM's, with ``enable_in_reasoning`` too,
    as vLLM's server splits by its parser alone (found by a hunt: the split was dropped, the parser
    taken from the engine's gate); None where there is none, or none that this tokenizer can have
    (said once: chat messages are then not split, and where the engine's grammars wait for it,
    constrained rows are refused)."""
    parser, gated = llm.llm_engine.reasoning_parser, llm.llm_engine.reasoning_gate_parser is not None
    if isinstance(parser, ValueError):
        logger.warning("%s: chat messages are written without a reasoning apart%s", parser,
                       ", and rows with response_format or a tool choice are refused" if gated else "")
    return parser if isinstance(parser, ReasoningParser) else None


def _writer(out_kind: str, config: JobConfig, fmt: type[JobFormat], job_input: JobInput) -> OutputWriter:
    keys_of = output_keys(fmt.key_of, fmt.error_of)
    try:
        if out_kind == "jsonl":
            return JsonlWriter(config.output, config.resume, keys_of, config.sync_interval)
        return ParquetWriter(config.output, config.resume, keys_of, fmt.key_field,
                             output_schema(input_schema(job_input, conflicts_as_text=True)), config.sync_interval,
                             trailing_columns=RESULT_COLUMNS)
    except OSError as exc:
        raise OutputWriteError(exc.errno, f"cannot open {config.output}: {exc.strerror or exc}") from exc


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``JobInterrupted`` (on the main thread; a signal the process was
    started ignoring stays ignored)."""
    with _signal_handlers(_raise_interrupted):
        yield


@contextmanager
def _signal_handlers(handler: Callable[[int, object], None]) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM while the block runs, on the main thread, except for a
    signal the process was started ignoring; the previous handlers after it."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) is not signal.SIG_IGN:
                previous[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise JobInterrupted(signum)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM only print a note while the block runs (on the main thread): a second
    Ctrl-C must not stop the writing of the rows that have finished, nor their summary (kill -9
    still does)."""
    with _signal_handlers(_note_deferred):
        yield


def _note_deferred(signum: int, frame: object) -> None:
    say(f"[pagedlm run] {signal.Signals(signum).name}: still writing what has finished; stopping right after")


def read_input(config: JobConfig, job_input: JobInput, limit: int = 1000) -> tuple[str, Iterator]:
    """The input's row format ("openai" or "plain") and its rows, streamed.

    The format is ``--input-format``, or (``auto``) that of the first row, among the first
    ``limit``, that looks like one (``_row_format``); rows that look like neither (bad JSON,
    ``null``, an OpenAI row without its ``custom_id``) are passed over, and become errors of
    that format. With no such row, "plain".

    Raises:
        ValueError: ``input_format`` is none of ``INPUT_FORMATS``.
    """
    if config.input_format not in INPUT_FORMATS:
        raise ValueError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, got {config.input_format!r}")
    rows = read_rows(job_input)
    if config.input_format != "auto":
        return config.input_format, rows
    head, fmt_name = [], None
    for _, item in zip(range(limit), rows):
        head.append(item)
        fmt_name = _row_format(item[1])
        if fmt_name is not None:
            break
    _log_detected_format(fmt_name, head)
    return fmt_name or "plain", chain(head, rows)


def _log_detected_format(fmt_name: str | None, head: list) -> None:
    """Say which row decided the format; a warning when rows before it were passed over (they
    will be errors of that format) or when none decided."""
    override = "--input-format openai|plain overrides this"
    if fmt_name is not None:
        level = logging.INFO if len(head) == 1 else logging.WARNING
        logger.log(level, "Input read as %s rows, from %s (the first row that looks like a row of either format); %s.",
                   fmt_name, head[-1][0], override)
    elif head:
        logger.warning("Input read as plain rows: none of its first %d rows looks like a row of either format; %s.",
                       len(head), override)


def _row_format(row: Any) -> str | None:
    """The format a row looks like: "plain" (a prompt column, which an OpenAI row holds in its
    ``body``; it may carry ``custom_id``, ``url`` or ``method`` columns of its own), "openai" (a
    ``custom_id`` and a ``method``, ``url`` or ``body``), "plain" (an ``id``), or None."""
    if not isinstance(row, dict):
        return None
    if set(PROMPT_COLUMNS) & set(row):
        return "plain"
    if "custom_id" in row and {"method", "url", "body"} & set(row):
        return "openai"
    return "plain" if "id" in row else None


def check_served_model_names(config: JobConfig, fmt_name: str) -> None:
    """``--served-model-name`` gives names to OpenAI rows' ``body.model``: refuse it for plain rows
    (where it would do nothing) and refuse an empty name."""
    names = config.served_model_names
    if names is None:
        return
    if fmt_name != "openai":
        raise ValueError("--served-model-name names the model of OpenAI batch rows (their body.model); this input "
                         "is plain rows, which name no model: leave it out")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"--served-model-name must be a non-empty name, got {name!r}")


# Engine settings that change a row's output, which a resumed run must repeat (batch sizes, budgets
# and the cache's size do not: outputs are batch-invariant, unless batch_invariant=False; the block
# size does, in attention's last bits outside the bf16 tiles). Recorded where they differ from a job's defaults
# (LLM's, and JOB_MAX_LOGPROBS), so that giving a default explicitly is the same job.
OUTPUT_ENGINE_SETTINGS = ("dtype", "device", "max_model_len", "block_size", "kv_cache_dtype", "calculate_kv_scales", "seed",
                          "tokenizer", "chat_template", "override_generation_config", "hf_overrides", "max_logprobs",
                          "batch_invariant", "reasoning_parser", "reasoning_config", "structured_outputs_config",
                          "enable_trace_replay")
_JOB_DEFAULTS = {**{p.name: p.default for p in inspect.signature(LLM.__init__).parameters.values()},
                 "max_logprobs": JOB_MAX_LOGPROBS}


def _canonical(name: str, value: Any) -> Any:
    """An engine setting by one name of its value (found by a hunt: a job started with --dtype half
    would not resume with --dtype float16, nor --kv-cache-dtype fp8 with fp8_e4m3)."""
    if name == "dtype" and isinstance(value, str):
        return DTYPE_ALIASES.get(value, value)
    if name == "kv_cache_dtype" and value == "fp8":
        return "fp8_e4m3"
    if name == "kv_cache_dtype" and isinstance(value, str) and value in MODEL_CACHE_DTYPES:
        return "auto"  # the engine takes them only where they are the model's dtype (recorded as dtype)
    return value


def _is_job_default(name: str, value: Any) -> bool:
    """Whether an engine setting is the job's default in effect: ``batch_invariant=True`` is, as
    every backend that accepts it also takes it for None (the torch reference refuses it)."""
    return value == _JOB_DEFAULTS[name] or (name == "batch_invariant" and value is True)


def job_record(config: JobConfig, fmt_name: str, model: str | None = None, names: list[str] | None = None) -> dict:
    """The settings a resumed run must repeat: paths made absolute, a chat template file read (its
    text is what renders the rows), and OpenAI rows' ``served_model_names`` as the run serves them
    (``names``; a hunt: a resume that named the model by another path served other names, and
    wrote another ``model``, than the run before it).

    Raises:
        ValueError: ``config.engine["chat_template"]`` is neither a template nor a file.
    """
    model = model or config.model or "(the embedded default model)"
    given = job_engine_kwargs(config)
    canonical = {k: _canonical(k, given[k]) for k in OUTPUT_ENGINE_SETTINGS if k in given}
    engine = {k: v for k, v in canonical.items() if not _is_job_default(k, v)}
    if isinstance(engine.get("tokenizer"), str) and os.path.exists(engine["tokenizer"]):
        engine["tokenizer"] = os.path.abspath(engine["tokenizer"])
    if "chat_template" in engine:
        engine["chat_template"] = load_chat_template(engine["chat_template"])
    overrides = engine.get("hf_overrides")
    if callable(overrides):  # recorded by name: a changed function body is not seen
        engine["hf_overrides"] = f"{overrides.__module__}.{overrides.__qualname__}"
    elif overrides is not None:  # values JSON has no form for (a torch dtype) as their repr
        engine["hf_overrides"] = json.loads(json.dumps(overrides, default=repr))
    for name in ("reasoning_config", "structured_outputs_config"):  # JSON's form of the configs
        if dataclasses.is_dataclass(engine.get(name)):
            engine[name] = dataclasses.asdict(engine[name])
    return {
        "model": os.path.abspath(model) if os.path.exists(model) else model,
        "input": storage.absolute(config.input),
        "input_format": fmt_name,
        "sampling": config.sampling,
        "generation_config": config.engine.get("generation_config", "auto"),
        "served_model_names": names or config.served_model_names,
        "engine": engine,
        "trust_request_chat_template": config.trust_request_chat_template,
    }


def _same_local_file(a: Any, b: Any) -> bool:
    return (isinstance(a, str) and isinstance(b, str) and not storage.is_uri(a) and not storage.is_uri(b)
            and os.path.exists(b) and os.path.realpath(a) == os.path.realpath(b))


def check_record(config: JobConfig, record: dict, started: bool) -> None:
    """Refuse to overwrite a started job's output, or to resume it under other settings."""
    if started and not config.resume:
        parts = config.output + ".parts"
        if os.path.isdir(parts) and not os.path.exists(config.output):
            raise ValueError(f"--output {config.output!r}: its job was started (its parts directory {parts!r} "
                             "exists, as an interrupted job leaves it); pass --resume to continue that job, or "
                             "choose another output")
        raise ValueError(f"--output {config.output!r} exists; pass --resume to continue that job, "
                         "or choose another output")
    path = _record_path(config)
    if started:
        if not storage.is_file(path):
            raise ValueError(f"cannot resume: {path} (the job's settings, written when it started) is missing")
        try:
            recorded = json.loads(storage.read_text(path))
        except (ValueError, UnicodeDecodeError) as exc:
            recorded = exc
        if not isinstance(recorded, dict):
            raise ValueError(f"cannot resume: {path} (the job's settings, written when it started) is damaged "
                             f"({recorded if isinstance(recorded, Exception) else 'not a JSON object'}); restore it "
                             "or start the job afresh")
        recorded.setdefault("engine", {})  # a job started before engine settings were recorded
        # A job started before that flag took its rows' templates: it goes on as this run says.
        recorded.setdefault("trust_request_chat_template", record["trust_request_chat_template"])
        if (recorded.get("input_format") == "openai" and recorded.get("served_model_names") is None
                and not config.served_model_names):  # started before the derived names were recorded
            recorded["served_model_names"] = record["served_model_names"]
        if isinstance(recorded["engine"], dict):  # a default recorded before it was one of the job's
            recorded["engine"] = {k: _canonical(k, v) for k, v in recorded["engine"].items()
                                  if k not in _JOB_DEFAULTS or not _is_job_default(k, v)}
        for name in ("input", "model"):  # the same file by another path (a symlink on the way)
            if _same_local_file(recorded.get(name), record[name]):
                recorded[name] = record[name]
        differ = [f"{k}: started with {recorded.get(k)!r}, now {v!r}" for k, v in record.items() if recorded.get(k) != v]
        if differ:
            raise ValueError("cannot resume: this run's settings differ from the job's:\n  " + "\n  ".join(differ))


def write_record(config: JobConfig, record: dict) -> None:
    """Record a new job's settings next to its output (``OUT.job.json``), for ``check_record``.

    Raises:
        OutputWriteError: the storage refused the write (full, read-only).
    """
    path = _record_path(config)
    try:
        storage.write_text(path, json.dumps(record, indent=2))
    except OSError as exc:
        raise OutputWriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc


def _record_path(config: JobConfig) -> str:
    return config.output.rstrip("/") + ".job.json"


class _Job:
    """One run's loop: rows to requests, finished requests and bad rows to output rows."""

    def __init__(self, llm: LLM, fmt: JobFormat, writer: OutputWriter, stats: JobStats, progress: Progress) -> None:
        self.llm = llm
        self.fmt = fmt
        self.writer = writer
        self.stats = stats
        self.progress = progress
        self.done = writer.keys  # output rows per id when the run started
        self.seen: Counter = Counter()
        self.in_flight: dict[int, tuple[str, JobRow]] = {}  # request index -> (where in the input, row)
        self.in_flight_keys: Counter = Counter()
        # Error rows of duplicate ids wait for the first row of their id, so that on resume the
        # rows of an id in the output are always its first row's, then its duplicates'.
        self.held: dict[RowKey, list[dict]] = {}

    def run(self, rows: Iterator, max_in_flight: int | None) -> None:
        requests_for_prompts, requests_for_params = tee(self._requests(rows))
        results = self.llm.generate_as_completed(
            (r.prompt for r in requests_for_prompts), (r.params for r in requests_for_params),
            max_in_flight=max_in_flight, return_errors=True,
        )
        with closing(results):
            for index, result in results:
                where, job_row = self.in_flight.pop(index)
                self.in_flight_keys[self.writer.same_key(job_row.key)] -= 1
                if isinstance(result, ValueError):
                    error = field_error(result, job_row.names)
                    self._write_error(job_row.key, job_row.row, f"{where}: {error}", error.param)
                else:
                    try:
                        row = self.fmt.result_row(job_row, result)
                    except RowError as exc:  # a result the format has no form for
                        self._write_error(job_row.key, job_row.row, f"{where}: {exc}", exc.param)
                    else:
                        self._write(row, job_row.key, tokens=(len(result.prompt_token_ids),
                                                              sum(len(c.token_ids) for c in result.outputs)))
                for held in self.held.pop(self.writer.same_key(job_row.key), ()):
                    self._write(held, job_row.key, error=True)

    def _requests(self, rows: Iterator) -> Iterator[JobRow]:
        """The rows that can run, in input order; the others' error rows are written on the way."""
        index = 0
        for where, row, read_error in rows:
            self.stats.rows += 1
            key = self.fmt.key_of(row)  # None for a row that could not be read at all
            same = self.writer.same_key(key if key is not None else Position(where))
            self.seen[same] += 1
            if self.seen[same] <= self.done[same]:
                self.stats.skipped += 1
                self._count()
                continue
            if read_error is not None:
                self._write_error(key, row, read_error)
                continue
            if key is not None and self.seen[same] > 1:
                error = self.fmt.error_row(key, row, f"{where}: duplicate id {key!r} (an earlier row has it)",
                                           self.fmt.key_field)
                if self.in_flight_keys[same]:
                    self.held.setdefault(same, []).append(error)
                else:
                    self._write(error, key, error=True)
                continue
            job_row = parse_row(self.fmt, row, key)
            if isinstance(job_row, RowError):
                self._write_error(key, row, f"{where}: {job_row}", job_row.param)
                continue
            self.in_flight[index] = where, job_row
            self.in_flight_keys[same] += 1
            index += 1
            yield job_row

    def _write_error(self, key: RowKey, row: Any, error: str, param: str | None = None) -> None:
        self._write(self.fmt.error_row(key, row, error, param), key, error=True)

    def _write(self, output_row: dict, key: RowKey, error: bool = False, tokens: tuple[int, int] = (0, 0)) -> None:
        """Write a result row (counted completed, with its prompt and completion ``tokens``) or an
        error row; a result row with a value the output cannot hold becomes an error row, and the job
        goes on. The summary's tokens are the completed rows' (a hunt: an error row's were counted)."""
        try:
            self.writer.write(output_row)
        except (TypeError, ValueError, RecursionError) as exc:
            self.writer.write(unwritable_row(self.fmt, key, exc, output_row))
            error = True
        if error:
            self.stats.errors += 1
        else:
            self.stats.completed += 1
            self.stats.prompt_tokens += tokens[0]
            self.stats.completion_tokens += tokens[1]
        self._count()

    def _count(self) -> None:
        self.progress.update()


