"""One converted checkpoint per source file, kept while the file holds the same bytes.

`cached_conversion(source, root, convert, version)` keeps the conversion of `source` in one
directory under `root`, named after the file and its absolute path. Beside the converted files,
`source.json` records what was converted: the file's path and host, its identity when it was read
(size, mtime, ctime, inode, device), the sha256 of its bytes, and the converter's format version.

- The identity matches: the conversion is used without reading the file.
- Only the identity changed (a `touch`, a `cp` of the same bytes, a re-download): the file is
  hashed; the same sha256 keeps the conversion and records the new identity.
- Anything else (other bytes, another format version, no record): the file is converted again and
  the new directory replaces the old one, so a path never holds more than one conversion.

ctime is part of the identity because no user can set it: `cp -p` or `rsync -t` give another
file the old size and mtime, never the old ctime. Whenever a conversion is written, what nothing
can use any more is removed: directories from before the record existed (no `source.json`), the
conversions of files this host recorded and no longer has, and the staging directories of
conversions on this host whose process is gone (killed mid-conversion). Another host sharing the
cache keeps what it recorded.
"""

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable

logger = logging.getLogger("pagedlm")

_RECORD = "source.json"


def _identity(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "device": st.st_dev}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_record(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, _RECORD)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_record(out_dir: str, record: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{_RECORD}.", dir=out_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
    os.replace(tmp, os.path.join(out_dir, _RECORD))


def _still_valid(out_dir: str, source: str, version: int) -> bool:
    """Whether `out_dir` holds a conversion of `source`'s current bytes, re-recording its identity
    when only that changed."""
    record = _read_record(out_dir)
    if record is None or record.get("version") != version or record.get("path") != source:
        return False
    identity = _identity(os.stat(source))
    if record.get("identity") == identity:
        return True
    if record["identity"].get("size") != identity["size"] or record.get("sha256") != _sha256(source):
        return False
    _write_record(out_dir, {**record, "identity": identity})
    return True


def _staging_prefix(out_dir: str) -> str:
    return f".{os.path.basename(out_dir)}.{socket.gethostname()}.{os.getpid()}."


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _unusable(root: str, name: str) -> bool:
    if not name.startswith("."):
        if not os.path.exists(os.path.join(root, name, _RECORD)):
            return True
        record = _read_record(os.path.join(root, name))
        return record is not None and record.get("host") == socket.gethostname() and not os.path.exists(record["path"])
    parts = name.rsplit(".", 2)  # _staging_prefix, then mkdtemp's suffix (no dots)
    return (len(parts) == 3 and parts[0].endswith(f".{socket.gethostname()}") and parts[1].isdigit()
            and int(parts[1]) != os.getpid() and _process_gone(int(parts[1])))


def _remove_unusable(root: str) -> None:
    for name in os.listdir(root):
        if os.path.isdir(os.path.join(root, name)) and _unusable(root, name):
            logger.info("removing %s, a conversion nothing can use", os.path.join(root, name))
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def cached_conversion(source: str, root: str, convert: Callable[[str, str], object], version: int) -> str:
    """Return the directory holding `convert(source, out_dir)`'s output for `source`'s current bytes,
    converting only when no conversion of those bytes by this `version` of the converter exists.

    `convert` must create `out_dir` (which does not exist yet) with everything in it; the record is
    added after it returns, and the finished directory is renamed into place, so readers never see
    a partial conversion. Concurrent callers may convert the same file twice; one result stays.
    Raises whatever `convert` raises, and OSError where `root` cannot be written.
    """
    source = os.path.abspath(source)
    stem = os.path.basename(source).removesuffix(".gguf")
    out_dir = os.path.join(root, f"{stem}-{hashlib.sha256(source.encode()).hexdigest()[:12]}")
    if os.path.isdir(out_dir) and _still_valid(out_dir, source, version):
        logger.debug("using the earlier conversion of %s at %s", source, out_dir)
        return out_dir

    os.makedirs(root, exist_ok=True)
    record = {"path": source, "host": socket.gethostname(), "identity": _identity(os.stat(source)),
              "sha256": _sha256(source), "version": version}
    staging = tempfile.mkdtemp(prefix=_staging_prefix(out_dir), dir=root)
    converted = os.path.join(staging, "checkpoint")
    try:
        logger.info("converting %s to an HF checkpoint at %s", source, out_dir)
        convert(source, converted)
        _write_record(converted, record)
        for attempt in range(3):
            try:
                os.rename(converted, out_dir)
                break
            except OSError:
                if not os.path.isdir(out_dir):
                    raise
            if _still_valid(out_dir, source, version):  # another process finished first
                break
            logger.info("replacing the conversion of %s's earlier contents", source)
            try:
                os.rename(out_dir, os.path.join(staging, f"superseded-{attempt}"))
            except FileNotFoundError:
                pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _remove_unusable(root)
    return out_dir
