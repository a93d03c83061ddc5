"""Job files: input rows streamed from JSONL or Parquet, output rows appended as they finish.

Both writers survive a kill: a JSONL output is flushed and fsynced every ``sync_interval`` seconds
and a torn last line is dropped on resume; a Parquet output is written as parts (each renamed
into place whole) that are merged into the output file when the job ends.
"""

import base64
import datetime
import decimal
import json
import math
import os
import re
import shutil
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from pagedlm.entrypoints.jobs import storage

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


def file_kind(path: str, what: str) -> str:
    """"jsonl" or "parquet", from the file name.

    Raises:
        ValueError: another suffix (the message names ``what`` and the allowed suffixes).
    """
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        _import_pyarrow()
        return "parquet"
    raise ValueError(f"{what} {path!r}: the file name must end in one of "
                     f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}")


def input_files(path: str) -> list[str]:
    """The files an input is: ``path`` itself, or a directory's files (an object store prefix's)
    that end in a JSONL or Parquet suffix in any case, in name order: a dataset's shards. Hidden
    ones (``.``, ``_``: Spark's ``_SUCCESS``) and subdirectories are left out.

    Raises:
        ValueError: a directory without such files, or with files of both kinds.
    """
    if not storage.is_dir(path):
        return [path]
    names = JSONL_SUFFIXES + PARQUET_SUFFIXES
    files = [f for f in storage.list_files(path, names) if not os.path.basename(f).startswith((".", "_"))]
    if not files:
        raise ValueError(f"--input {path!r} is a directory without files ending in one of {', '.join(names)}")
    if len({file_kind(f, "--input") for f in files}) > 1:
        raise ValueError(f"--input {path!r} holds JSONL and Parquet files; a job reads files of one kind")
    return files


@dataclass(frozen=True)
class JobInput:
    """A job's input resolved once (``resolve_input``): ``path`` as given, the ``files`` it is
    (``input_files``) and their ``kind``, "jsonl" or "parquet". Every check and the read take it,
    so that they all see the same files, however a directory's listing changes during the run (a
    producer adding a shard), and an object store's prefix is listed once."""

    path: str
    files: tuple[str, ...]
    kind: str


def resolve_input(path: str) -> JobInput:
    """``path``'s files (``input_files``) and their kind, a file's from its name.

    Raises:
        ValueError: as ``file_kind`` and ``input_files``.
    """
    files = input_files(path)
    return JobInput(path, tuple(files), file_kind(files[0], "--input"))


def _import_pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ValueError("Parquet files need pyarrow: pip install 'pagedlm[parquet]'") from None


# (where the row is: "line N" of a JSONL file or "row N" of a Parquet one, the row (with an error:
# the columns of it that could be read, or None), why it could not be read or None)
InputRow = tuple[str, Any, str | None]


def count_rows(job_input: JobInput) -> int | None:
    """Rows in the input (non-blank lines of JSONL files), for progress and ETA."""
    if job_input.kind == "parquet":
        import pyarrow.parquet as pq
        return sum(pq.ParquetFile(file).metadata.num_rows for file in job_input.files)
    count = 0
    for file in job_input.files:
        with open(file, "rb") as f:
            for line in f:
                count += not blank_line(line)
    return count


def blank_line(line: bytes) -> bool:
    """A JSONL line with no row: whitespace, or a byte-order mark alone (an editor's empty first line)."""
    return not line.strip().removeprefix(b"\xef\xbb\xbf").strip()


def read_rows(job_input: JobInput) -> Iterator[InputRow]:
    """The input's rows, streamed, a directory's file after file (where a row is and its error
    then name its file): a JSONL line that is not valid UTF-8 JSON, or a Parquet row of a row group
    that cannot be read, comes as an error."""
    if job_input.files == (job_input.path,):
        yield from file_rows(job_input.path, job_input.kind)
        return
    for file in job_input.files:
        name = os.path.basename(file)
        for where, row, error in file_rows(file, job_input.kind):
            yield f"{name} {where}", row, error and f"{name}: {error}"


def file_rows(path: str, kind: str) -> Iterator[InputRow]:
    """One input file's rows, as ``read_rows``, where a row is named within the file."""
    if kind == "parquet":
        yield from _parquet_rows(path)
        return
    with storage.open_input(path) as f:
        for number, line in enumerate(f, 1):
            if blank_line(line):
                continue
            try:  # a byte-order mark (Notepad, PowerShell) is not part of the first row
                row = loads_row(line.decode("utf-8").removeprefix("\ufeff"))
            except UnreadValue as exc:
                yield f"line {number}", None, f"line {number}: {exc}"
                continue
            except UnicodeDecodeError as exc:
                # No id: once the file is mended, a resume runs the row (one with an id would stay done).
                yield (f"line {number}", None, f"line {number} is not UTF-8 (byte 0x{line[exc.start]:02x} at byte "
                       f"{exc.start + 1} of the line): save the file as UTF-8")
                continue
            except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
                # json's own "line 2 column 1" counts within the row's text, whose end is a newline.
                where = f"{exc.msg} at character {exc.pos + 1} of the line" if isinstance(exc, json.JSONDecodeError) else exc
                yield f"line {number}", None, f"line {number} is not valid JSON: {where}"
                continue
            yield f"line {number}", row, None


class UnreadValue(ValueError):
    """JSON that a row cannot be read from, though valid: a key twice in one object (RFC 8259
    leaves which one counts open; json.loads took the last, found by a hunt: a second "id" renamed
    the row, a second "method" overrode the first), an integer beyond Python's 4,300 digits."""


def loads_row(text: str) -> Any:
    """A JSON line's value, as ``json.loads`` reads it.

    Raises:
        UnreadValue: a key twice in one object, or an integer beyond 4,300 digits.
        ValueError: the text is no JSON (``json.JSONDecodeError``).
        RecursionError: it nests deeper than Python's recursion limit.
    """
    return json.loads(text, object_pairs_hook=_object, parse_int=_integer)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    row = dict(pairs)
    if len(row) < len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise UnreadValue(f"an object holds the key {key!r} twice (which one counts is not defined): give it once")
    return row


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UnreadValue(f"an integer of {len(text.lstrip('-'))} digits, beyond the 4,300 Python reads") from None


def _parquet_rows(path: str) -> Iterator[InputRow]:
    """A Parquet file's rows, one row group at a time: the rows of a row group that cannot be read
    (a corrupt page) come as errors, and the row groups after it are still read; so does a row
    with a value Python has no form for (``batch_rows``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(storage.parquet_source(path))
    groups = parquet.num_row_groups
    start = 0  # rows before this row group
    for group in range(groups):
        size = parquet.metadata.row_group(group).num_rows
        read = 0
        try:
            for batch in parquet.iter_batches(batch_size=1024, row_groups=[group]):
                for row, error in batch_rows(batch):
                    read += 1
                    yield f"row {start + read}", row, error and f"row {start + read}: {error}"
        except (OSError, pa.ArrowException) as exc:
            why = " ".join(f"{type(exc).__name__}: {exc}".split())  # pyarrow's messages span lines
            for number in range(start + read + 1, start + size + 1):
                yield (f"row {number}", None,
                       f"row {number}: row group {group + 1} of {groups} of the input cannot be read: {why}")
        start += size


# What pyarrow raises for a value Python has no form for: a date past the year 9999
# (OverflowError), a map keyed by structs or lists (TypeError: unhashable).
_CONVERSION_ERRORS = (OverflowError, TypeError, ValueError)


def batch_rows(batch) -> Iterator[tuple[dict, str | None]]:
    """An Arrow record batch's (or table's) rows as dicts (a map as JSON's object: a logit_bias),
    each with None; a row that cannot be converted comes as the columns that can (its id, for
    its error row) with an error naming the others."""
    try:
        rows = batch.to_pylist(maps_as_pydicts="lossy")
    except _CONVERSION_ERRORS:
        rows = None
    if rows is not None:
        yield from ((row, None) for row in rows)
        return
    for i in range(batch.num_rows):
        one = batch.slice(i, 1)
        try:
            yield one.to_pylist(maps_as_pydicts="lossy")[0], None
        except _CONVERSION_ERRORS as exc:
            values, bad = {}, []
            for name, column in zip(one.schema.names, one.columns):
                try:
                    values[name] = column.to_pylist(maps_as_pydicts="lossy")[0]
                except _CONVERSION_ERRORS:
                    bad.append(name)
            yield values, (f"column(s) {', '.join(map(repr, bad))} hold a value Python cannot represent "
                           f"({type(exc).__name__}: {exc})")


def input_schema(job_input: JobInput, conflicts_as_text: bool = False):
    """The Parquet input's Arrow schema (carried columns keep their types; a directory's files'
    joined, a column's types promoted as pyarrow's permissive ``unify_schemas`` promotes them,
    dictionaries read as their values), else None. ``conflicts_as_text``: a column whose files'
    types no type holds together is text (the local runner's output; its rows are read file by
    file), else refused (Ray reads the files as one dataset).

    Raises:
        ValueError: without ``conflicts_as_text``, two files' types of a column that no type holds
            together.
    """
    if job_input.kind != "parquet":
        return None
    import pyarrow as pa

    schemas = [file_schema(file) for file in job_input.files]
    if len(schemas) == 1:
        return schemas[0]
    # A dictionary column (pandas' categorical) is its values, as its rows read.
    schemas = [pa.schema([f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in schema])
               for schema in schemas]
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowException, NotImplementedError) as exc:
        if not conflicts_as_text:
            raise ValueError(f"--input {job_input.path!r}: its files' columns have types that do not join "
                             f"({' '.join(str(exc).split())}); cast them to one type") from None
    fields = {}
    for schema in schemas:
        for f in schema:
            try:  # a hunt: int64 in one shard and string in another failed the job once the model had loaded
                fields[f.name] = pa.unify_schemas([pa.schema([fields.get(f.name, f)]), pa.schema([f])],
                                                  promote_options="permissive").field(0)
            except (pa.ArrowException, NotImplementedError):
                fields[f.name] = pa.field(f.name, pa.string())
    return pa.schema(list(fields.values()))


def file_schema(path: str):
    """A Parquet file's Arrow schema (a --ray job's input may be a URI)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(storage.parquet_source(path)).schema_arrow


def to_json(row: Any) -> str:
    """One JSONL line; Arrow values JSON lacks become text (dates and times ISO 8601, decimals as
    written, bytes base64, UUIDs in their canonical form), and NaN or an infinity (a pandas
    column's missing value, a ``-inf`` logprob) null, as strict JSON parsers read nothing else."""
    try:
        return json.dumps(row, ensure_ascii=False, default=_json_default, allow_nan=False)
    except (ValueError, TypeError):  # a float JSON has no literal for, a map's key JSON has none for
        return json.dumps(_jsonable(row), ensure_ascii=False, default=_json_default, allow_nan=False)


def _jsonable(value: Any) -> Any:
    """``value`` with its non-finite floats null and its map keys text (found by a hunt: a Parquet
    map's binary keys lost the row's result)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k if isinstance(k, (str, int, bool)) or k is None or isinstance(k, float) and math.isfinite(k)
                else str(k) if isinstance(k, float) else _json_default(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, uuid.UUID):  # an Arrow uuid column's values
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays (a Ray tensor column) and scalars
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def read_output_lines(path: str) -> Iterator[dict]:
    """The rows of a JSONL output written by a job, streamed, blank lines skipped; once they are all
    read, a torn last line (left by a kill) is cut off the file, and that row runs again.

    Raises:
        ValueError: a complete line is not a JSON object (the file is not one a job wrote).
    """
    good_end = 0
    with open(path, "rb+") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break
            if blank_line(line):  # an editor's, or between two outputs joined
                good_end += len(line)
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}: line {number} is not valid JSON ({exc}); cannot resume into this file") from None
            if not isinstance(row, dict):  # every row a job writes is an object (found by a hunt: null counted as one)
                raise ValueError(f"{path}: line {number} is {json.dumps(row, ensure_ascii=False)[:40]}, not a row "
                                 "(a JSON object); cannot resume into this file")
            good_end += len(line)
            yield row
        f.truncate(good_end)


class OutputWriteError(OSError):
    """The output's storage refused a write (full, read-only, gone): the job stops; the rows synced
    before stay, and ``--resume`` continues once the storage is mended."""


class OutputWriter:
    """Appends output rows to a file and makes them durable every ``sync_interval`` seconds.

    A daemon thread calls ``_sync`` when rows were written since the last one, so the rows that
    finished before a long wait reach the disk without waiting for the next row. ``keys`` counts
    the rows per id that the output held when it was opened (resume). Once a file write fails
    with an ``OSError``, or a sync fails with anything, ``write`` and ``close`` raise it as an
    ``OutputWriteError``.
    """

    def __init__(self, path: str, sync_interval: float) -> None:
        self.path = path
        self.keys: Counter = Counter()
        self._lock = threading.Lock()
        self._dirty = False
        self._error: OutputWriteError | None = None
        self._started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sync_every, args=(sync_interval,), daemon=True)

    def _sync_every(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with self._lock:
                if self._dirty and self._error is None:
                    self._guarded(self._sync)
                    self._dirty = False

    def _guarded(self, action: Callable, *args: Any, errors: tuple[type[BaseException], ...] = (Exception,)) -> None:
        """Run ``action``; an error of ``errors`` stops the writer (``_error``)."""
        try:
            action(*args)
        except errors as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            self._error = OutputWriteError(getattr(exc, "errno", None), f"cannot write {self.path}: {why}; the rows "
                                           "synced before are kept, and --resume continues the job once that is mended")

    def same_key(self, key: Any) -> Any:
        """The form of an id under which this output tells ids apart (and counts them in ``keys``)."""
        return key

    def write(self, row: dict) -> None:
        """Raises: OutputWriteError; TypeError or ValueError: a value this output cannot hold."""
        with self._lock:
            if self._error is None:
                self._guarded(self._append, row, errors=(OSError,))  # a TypeError is the row's
            if self._error is not None:
                raise self._error
            self._dirty = True
            if not self._started:
                self._thread.start()
                self._started = True

    def close(self, finished: bool = True) -> None:
        """Sync what is written; ``finished`` says the job reached the end of its input.

        Raises:
            OutputWriteError: a write, now or before, failed (the file is closed all the same).
        """
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            if self._error is None:
                self._guarded(self._sync)
            if self._error is None:
                self._guarded(self._finish, finished)
            if self._error is not None:
                self._abandon()
                raise self._error

    def _append(self, row: dict) -> None:
        raise NotImplementedError

    def _sync(self) -> None:
        raise NotImplementedError

    def _finish(self, finished: bool) -> None:
        raise NotImplementedError

    def _abandon(self) -> None:
        """Release what is open after a failed write, writing nothing more."""


class JsonlWriter(OutputWriter):
    """Output rows as JSONL lines, flushed and fsynced every ``sync_interval`` seconds.

    Args:
        path: the output file. With ``resume`` it may exist: its keys are read and a torn last
            line, left by a kill, is cut off.
        keys_of: an output row's keys for resume (``output_keys``).

    Raises:
        ValueError: a line other than the last is not valid JSON (the file is not one we wrote).
    """

    def __init__(self, path: str, resume: bool, keys_of: Callable[[dict], list], sync_interval: float = 2.0) -> None:
        super().__init__(path, sync_interval)
        if resume and os.path.exists(path):
            for row in read_output_lines(path):
                self.keys.update(keys_of(row))
        # A lone surrogate (a JSON input's "\\ud800") is written as its JSON escape, not refused.
        self._file = open(path, "a", encoding="utf-8", errors="backslashreplace")

    def _append(self, row: dict) -> None:
        self._file.write(to_json(row) + "\n")

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def _finish(self, finished: bool) -> None:
        self._file.close()

    def _abandon(self) -> None:
        try:
            self._file.close()
        except OSError:  # the buffered rest of a line that could not be written
            pass


MERGED_ROW_GROUP_ROWS = 65_536
_PART_NAME = re.compile(r"part-(\d+)\.parquet")


def _part_number(path: str) -> int:
    return int(_PART_NAME.fullmatch(os.path.basename(path)).group(1))


def _ids_and_errors(path: str, key_field: str) -> Iterator[tuple[Any, str | None]]:
    """Each row's id, and its error where it has none, of the Parquet output ``path``. Every page is
    decoded (the merge reads them all: a damaged one is refused now, not after the run), a row group
    at a time (a whole output's text would not fit in memory). Raises what pyarrow raises for a
    damaged file."""
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    for group in range(file.num_row_groups):
        table = file.read_row_group(group)
        ids = table.column(key_field).to_pylist() if key_field in names else [None] * table.num_rows
        errors = table.column("error") if None in ids and "error" in names else None
        for i, key in enumerate(ids):
            yield key, errors[i].as_py() if key is None and errors is not None else None


class ParquetWriter(OutputWriter):
    """Output rows to a Parquet file, through parts.

    Every ``sync_interval`` seconds (or ``part_rows`` rows) the rows written since are written as
    one part file in ``<path>.parts/`` (to a temporary name, fsynced, renamed). When the job
    finished, the parts are merged into ``path``; an interrupted job keeps them for ``--resume``.

    Args:
        path: the output file.
        resume: read the keys of the parts (and of ``path``, which becomes the first part once
            this run writes a row or finishes). A part that cannot be read raises ValueError, naming it.
        keys_of: an output row's keys for resume (``output_keys``).
        key_field: the column that holds an id; resume reads it, and ``error`` where it is null.
        schema: Arrow types for known columns (the results', and the Parquet input's); other
            columns' types are inferred and unified across parts.
        trailing_columns: columns the merged file puts after all others, in this order (the
            results after the input's columns, even where the first part holds only rows whose
            input could not be read).
    """

    def __init__(self, path: str, resume: bool, keys_of: Callable[[dict], list], key_field: str, schema,
                 sync_interval: float = 2.0, part_rows: int = 10_000, trailing_columns: Sequence[str] = ()) -> None:
        import pyarrow as pa

        super().__init__(path, sync_interval)
        self.parts_dir = path + ".parts"
        self._schema = schema
        self._trailing_columns = trailing_columns
        self._rows: list[dict] = []
        self._part_rows = part_rows
        if os.path.exists(path) and os.path.isdir(self.parts_dir):
            # A kill between the merge's rename and the parts' removal: the output holds their rows.
            shutil.rmtree(self.parts_dir)
        # A resumed output becomes the first part once this run writes (_adopt): a run that writes
        # nothing (its model failed to load, say) leaves it where it was.
        self._resumed = path if resume and os.path.exists(path) else None
        for part in [*([path] if self._resumed else []), *self._parts()]:
            try:
                for key, error in _ids_and_errors(part, key_field):
                    self.keys.update(map(self.same_key, keys_of({key_field: key, "error": error})))
            except (pa.ArrowException, OSError) as exc:  # parts are renamed into place whole: damaged since
                raise ValueError(f"{part} cannot be read ({' '.join(str(exc).split())}); cannot resume into it: "
                                 "restore it, or move it aside and its rows run again") from None
        # After the highest part there is: with a part moved aside, their count would name a kept one.
        self._next_part = max((_part_number(p) for p in self._parts()), default=0) + 1

    def same_key(self, key: Any) -> Any:
        return key if isinstance(key, Position) else id_text(key)

    def _part_path(self, number: int) -> str:
        return os.path.join(self.parts_dir, f"part-{number:06d}.parquet")

    def _parts(self) -> list[str]:
        """The parts this writer wrote (``_part_path``'s names), in their order."""
        if not os.path.isdir(self.parts_dir):
            return []
        names = [p for p in os.listdir(self.parts_dir) if _PART_NAME.fullmatch(p)]
        return [os.path.join(self.parts_dir, p) for p in sorted(names, key=_part_number)]

    def _adopt(self) -> None:
        """Make the parts directory, the resumed output its first part."""
        os.makedirs(self.parts_dir, exist_ok=True)
        if self._resumed is not None:
            os.replace(self._resumed, self._part_path(0))
            self._resumed = None

    def _append(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= self._part_rows:
            self._guarded(self._sync)

    def _sync(self) -> None:
        import pyarrow.parquet as pq

        if not self._rows:
            return
        self._adopt()
        path = self._part_path(self._next_part)
        with storage.replacing(path) as tmp:
            pq.write_table(rows_to_table(self._rows, self._schema), tmp)
        self._next_part += 1
        self._rows = []

    def _finish(self, finished: bool) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not finished:
            return
        self._adopt()
        parts = self._parts()
        schema = _unify(parts, self._trailing_columns) if parts else rows_to_table([], self._schema).schema
        with storage.replacing(self.path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
            # Parts of a slow job hold a few rows each (one every sync_interval): merged into row
            # groups of MERGED_ROW_GROUP_ROWS, not one group each.
            group, rows = [], 0
            for i, part in enumerate(parts):
                group.append(_conform(pq.read_table(part), schema))
                rows += group[-1].num_rows
                if rows >= MERGED_ROW_GROUP_ROWS or i == len(parts) - 1:
                    writer.write_table(pa.concat_tables(group))
                    group, rows = [], 0
        shutil.rmtree(self.parts_dir)


def _conversion_errors() -> tuple[type[BaseException], ...]:
    """What pyarrow raises for values a column cannot hold: no common type (ArrowInvalid,
    ArrowTypeError), an int beyond int64 (OverflowError), a lone surrogate (UnicodeError), a
    conversion it lacks (NotImplementedError: a fixed-shape tensor with a permutation)."""
    import pyarrow as pa

    return pa.ArrowException, OverflowError, ValueError, TypeError, NotImplementedError


def _typed_array(values: list, typ):
    """``values`` as an Arrow array of ``typ``; an extension type (Arrow's canonical ones: a
    fixed-shape tensor, bool8) that pyarrow does not build from Python values directly, from its
    storage or by a cast of what it infers (found by a hunt: a carried fixed-shape tensor column
    failed every write of the output, a bool8 one became text)."""
    import pyarrow as pa

    try:
        return pa.array(values, type=typ)
    except _conversion_errors():
        if typ is None:
            raise
        storage = _storage_type(typ)
        if storage == typ:
            raise
    try:
        if not isinstance(typ, pa.BaseExtensionType):  # one inside a list, struct or map (a hunt: written as text)
            return pa.array(values, type=storage).cast(typ)
        return pa.ExtensionArray.from_storage(typ, pa.array(values, type=typ.storage_type))
    except _conversion_errors():
        return pa.array(values).cast(typ)


def _storage_type(typ):
    """``typ`` with every extension type in it (nested in lists, structs and maps too) its storage type."""
    import pyarrow as pa

    if isinstance(typ, pa.BaseExtensionType):
        return _storage_type(typ.storage_type)
    if pa.types.is_struct(typ):
        return pa.struct([typ.field(i).with_type(_storage_type(typ.field(i).type)) for i in range(typ.num_fields)])
    if pa.types.is_map(typ):
        return pa.map_(typ.key_field.with_type(_storage_type(typ.key_type)),
                       typ.item_field.with_type(_storage_type(typ.item_type)), typ.keys_sorted)
    for is_kind, make in ((pa.types.is_list, pa.list_), (pa.types.is_large_list, pa.large_list)):
        if is_kind(typ):
            return make(typ.value_field.with_type(_storage_type(typ.value_type)))
    if pa.types.is_fixed_size_list(typ):
        return pa.list_(typ.value_field.with_type(_storage_type(typ.value_type)), typ.list_size)
    return typ


def rows_to_table(rows: list[dict], schema):
    """An Arrow table of ``rows``: columns in first-seen order, known ones typed by ``schema``.

    A column whose values no Arrow type holds together (JSON rows may hold an int in one row and a
    string in the next, or an int beyond int64), or whose type Parquet cannot store or read back
    (``_storable``), is written as text (``as_text``: strings as they are, other values as JSON),
    so one odd row never fails the part, nor the job when its parts are read again. A column name
    with lone surrogates (a JSON input's key ``"\\ud800"``) is written with their escapes.
    """
    import pyarrow as pa

    names = list(dict.fromkeys(name for row in rows for name in row)) or list(schema.names)
    arrays, fields = [], []
    for name in names:
        values = [row.get(name) for row in rows]
        typ = schema.field(name).type if name in schema.names else None
        try:
            array = _typed_array(values, typ)
        except UnicodeEncodeError:  # a lone surrogate inside a value: the column keeps its type
            array = _with_escapes(values, typ)
        except _conversion_errors():
            array = None
        if array is None or not _storable(array.type):
            array = _as_json_text(values)
        arrays.append(array)
        fields.append(pa.field(as_text(name), array.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


# Parquet readers refuse a schema nested deeper (pyarrow: "Parquet schema too deeply nested"): a
# struct is one level, a list or a map two.
_MAX_PARQUET_DEPTH = 98


def _storable(typ) -> bool:
    """Whether Parquet can store an Arrow type and read it back: no struct without fields, and no
    deeper nesting than ``_MAX_PARQUET_DEPTH`` (JSON rows can hold either)."""
    return not _has_empty_struct(typ) and _parquet_depth(typ) <= _MAX_PARQUET_DEPTH


def _has_empty_struct(typ) -> bool:
    """Whether an Arrow type holds a struct without fields."""
    import pyarrow as pa

    if pa.types.is_struct(typ):
        return typ.num_fields == 0 or any(_has_empty_struct(typ.field(i).type) for i in range(typ.num_fields))
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        return _has_empty_struct(typ.value_type)
    if pa.types.is_map(typ):
        return _has_empty_struct(typ.key_type) or _has_empty_struct(typ.item_type)
    return False


def _parquet_depth(typ) -> int:
    """The levels of nested groups Parquet stores an Arrow type in."""
    import pyarrow as pa

    if pa.types.is_struct(typ):
        return 1 + max((_parquet_depth(typ.field(i).type) for i in range(typ.num_fields)), default=0)
    if pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ):
        return 2 + _parquet_depth(typ.value_type)
    if pa.types.is_map(typ):
        return 2 + max(_parquet_depth(typ.key_type), _parquet_depth(typ.item_type))
    return 0


def _with_escapes(values: list, typ):
    """``values`` as ``_typed_array`` types them, every string inside them (dict keys too) with
    its lone surrogates as their escapes, as ``as_text`` writes a string (found by a hunt: one
    surrogate in a nested value made text of the whole column, in every part); None where they do
    not convert so either."""
    def escaped(value: Any) -> Any:
        if isinstance(value, str):
            return as_text(value)
        if isinstance(value, dict):
            return {as_text(k) if isinstance(k, str) else k: escaped(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [escaped(v) for v in value]
        return value

    try:
        return _typed_array([escaped(v) for v in values], typ)
    except (RecursionError, *_conversion_errors()):
        return None


def as_text(value: Any) -> str | None:
    """A value for a text column or line: a string as it is, anything else as JSON; lone
    surrogates (from a JSON input's escapes) as their escapes, which UTF-8 can hold."""
    if value is None:
        return None
    text = value if isinstance(value, str) else to_json(value)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Position:
    """Where an input row without a usable id is (its ``where``: ``"line 3"``, ``"row 7"``, a
    directory input's ``"b.jsonl line 2"``). It stands for the row's id on resume, matched to the
    position its error row's message begins with, so that a line mended since (its error row
    stays, without an id) or a row appended does not count another row's error as its own (found
    by a hunt: counted by number, a mended line made a later row without an id count as done, and
    its error was lost)."""

    where: str


_PLACE = re.compile(r"(?:line|row) \d+(?=[: ]|$)")
_NAMED_WITHIN = 400  # characters of a message that may hold its position (a file name is at most 255)


def named_positions(message: str) -> list[Position]:
    """The positions an error message may begin with: its text up to each ``line N`` or ``row N``
    followed by ``:`` or a space, near its start; a read error's ``"b.jsonl: line 2 is ..."`` also
    as ``"b.jsonl line 2"``, its row's ``where``. Several where a file name itself holds ``line N``
    (the row's own is among them)."""
    found = []
    for match in islice(_PLACE.finditer(message, 0, _NAMED_WITHIN), 4):
        head, place = message[:match.start()], match.group()
        found.append(Position(head + place))
        if head.endswith(": "):
            found.append(Position(head[:-2] + " " + place))
    return found


def output_keys(key_of: Callable[[Any], Any], error_of: Callable[[dict], str | None]) -> Callable[[dict], list]:
    """An output row's keys for resume: its id, else the positions its error names
    (``named_positions``; none where it names none)."""

    def keys(row: dict) -> list:
        found = key_of(row)
        return [found] if found is not None else named_positions(error_of(row) or "")

    return keys


def id_text(key: Any) -> str | None:
    """A row id as a Parquet output holds it, which resume compares: a column of ids of mixed types
    is written as text (``rows_to_table``), a string with lone surrogates with their escapes
    (``as_text``)."""
    return None if key is None else as_text(key) if isinstance(key, str) else str(key)


def _as_json_text(values: list):
    import pyarrow as pa

    return pa.array([as_text(v) for v in values], pa.string())


def _unify(parts: list[str], trailing_columns: Sequence[str]):
    """One schema for all parts: each column's types promoted (int64 + float64 -> float64, null +
    any -> any), or text where they cannot be, or where a part's values do not convert exactly (an
    int beyond 2**53 to float64, in a column or a struct's field: as one part's rows of both would
    be written, ``rows_to_table``); then ``_conform`` writes its values as JSON. The columns in the
    order they first appear, ``trailing_columns`` last."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = [pq.read_schema(p) for p in parts]
    types: dict[str, list] = {}
    for schema in schemas:
        for f in schema:
            types.setdefault(f.name, []).append(f.type)
    names = [name for name in types if name not in trailing_columns] + [n for n in trailing_columns if n in types]
    unified = {}
    for name in names:
        try:
            unified[name] = pa.unify_schemas([pa.schema([pa.field(name, t)]) for t in types[name]],
                                             promote_options="permissive").field(name).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            unified[name] = pa.string()
    for part, schema in zip(parts, schemas):
        promoted = [f.name for f in schema if f.type != unified[f.name] and unified[f.name] != pa.string()]
        table = pq.read_table(part, columns=promoted) if promoted else None
        for name in promoted:
            try:
                table.column(name).cast(unified[name])
            except _conversion_errors():
                unified[name] = pa.string()
    return pa.schema([pa.field(name, unified[name]) for name in names])


def _conform(table, schema):
    """``table`` with ``schema``'s columns, in its order (missing ones null) and types: a text
    column's other values as JSON (``as_text``), as ``rows_to_table`` writes them."""
    import pyarrow as pa

    columns = []
    for f in schema:
        if f.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, f.type))
            continue
        column = table.column(f.name)
        if f.type == pa.string() and column.type != pa.string():
            columns.append(_as_json_text(column.to_pylist()))
        else:
            columns.append(column.cast(f.type))  # _unify made sure it converts
    return pa.Table.from_arrays(columns, schema=schema)
