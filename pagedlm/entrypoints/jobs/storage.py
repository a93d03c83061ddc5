"""Where a job's files live: a local path, or (for ``--ray`` jobs) a URI that ``pyarrow.fs`` opens
(``s3://``, ``gs://``, ``hdfs://``, ``file://``), the storage Ray Data's readers and writers take.
Credentials and endpoints come from the environment, as pyarrow and Ray read them
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...); every node of the cluster needs the same.
Local paths never import pyarrow (a local JSONL job runs without it)."""

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO


def is_uri(path: str) -> bool:
    return "://" in path


def _resolve(uri: str):
    """``(pyarrow FileSystem, path inside it)`` of a URI.

    Raises:
        ValueError: a scheme pyarrow does not know, or a URI without what it needs (a bucket).
    """
    import pyarrow.fs as pa_fs

    try:
        return pa_fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{uri!r}: pyarrow.fs cannot open this URI ({exc})") from None


def _type(uri: str):
    fs, inner = _resolve(uri)
    return fs.get_file_info(inner).type


def absolute(path: str) -> str:
    return path if is_uri(path) else os.path.abspath(path)


def is_file(path: str) -> bool:
    if not is_uri(path):
        return os.path.isfile(path)
    import pyarrow.fs as pa_fs
    return _type(path) == pa_fs.FileType.File


def is_dir(path: str) -> bool:
    """A directory, or on an object store a prefix that holds objects."""
    if not is_uri(path):
        return os.path.isdir(path)
    import pyarrow.fs as pa_fs
    return _type(path) == pa_fs.FileType.Directory


def open_input(path: str) -> BinaryIO:
    """The file for reading, buffered (its lines can be iterated)."""
    if not is_uri(path):
        return open(path, "rb")
    fs, inner = _resolve(path)
    return io.BufferedReader(fs.open_input_stream(inner))


def parquet_source(path: str):
    """What ``pyarrow.parquet.ParquetFile`` opens: a local path, or a URI's file opened for random access."""
    if not is_uri(path):
        return path
    fs, inner = _resolve(path)
    return fs.open_input_file(inner)


def read_text(path: str) -> str:
    with open_input(path) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    """The whole file, written anew; a local one all at once (written beside it, synced, renamed),
    so that a job killed meanwhile leaves the old file or the new one, never a part."""
    if not is_uri(path):
        with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        return
    fs, inner = _resolve(path)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode("utf-8"))


@contextmanager
def replacing(path: str) -> Iterator[str]:
    """A local file written whole: yields ``PATH.tmp`` to write, then syncs it and renames it over
    ``path``; where the writing fails (a full disk) the part written is removed and the error goes on."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def make_dir(path: str) -> None:
    """The directory, and its parents, where they do not exist."""
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)
        return
    fs, inner = _resolve(path)
    fs.create_dir(inner, recursive=True)


def list_files(directory: str, suffixes: tuple[str, ...]) -> list[str]:
    """The files directly in ``directory`` whose names end in ``suffixes`` (lower-case; any case
    matches, as ``files.file_kind`` reads a name), sorted, named as ``directory`` is (a path or a URI)."""
    if not is_uri(directory):
        paths = (os.path.join(directory, name) for name in os.listdir(directory))
        return sorted(p for p in paths if p.lower().endswith(suffixes) and os.path.isfile(p))
    import pyarrow.fs as pa_fs
    fs, inner = _resolve(directory)
    return sorted(f"{directory.rstrip('/')}/{info.base_name}" for info in fs.get_file_info(pa_fs.FileSelector(inner))
                  if info.type == pa_fs.FileType.File and info.base_name.lower().endswith(suffixes))


def move(source: str, destination: str) -> None:
    if not is_uri(source):
        os.replace(source, destination)
        return
    fs, inner = _resolve(source)
    fs.move(inner, _resolve(destination)[1])
