"""One converted checkpoint per source file, kept while the file holds the same bytes.

`cached_conversion(source, root, convert, version)` keeps the conversion of `source` in one
directory under `root`, named after the file and its absolute path. Beside the converted files,
`source.json` records what was converted: the file's path, its identity when it was read (size,
mtime, ctime, inode), the sha256 of its bytes, and the converter's format version.

- The identity matches: the conversion is used without reading the file.
- Only the identity changed (a `touch`, a `cp` of the same bytes, a re-download): the file is
  hashed; the same sha256 keeps the conversion and records the new identity (where the cache can
  be written).
- Anything else (other bytes, another format version, no record): the file is converted again and
  the new directory replaces the old one, so a path never holds more than one conversion.

ctime is part of the identity because no user can set it: `cp -p` or `rsync -t` give another
file the old size and mtime, never the old ctime. A conversion is built in a staging directory
whose lock file its process holds (`flock`) until the result is renamed into place. Whenever a
conversion is written, two kinds of leftovers are removed: staging directories whose lock nobody
holds (a conversion killed midway), and directories of the naming before the record existed
(`<name>-<12 hex digits>` holding a `config.json`, no `source.json` and no `.gguf`). Nothing else
under `root` is touched.
"""

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable

logger = logging.getLogger("pagedlm")

_RECORD = "source.json"
_LOCK = ".lock"  # in a staging directory, held by the process converting there
_STAGING = ".staging-"
_LEGACY_NAME = re.compile(r".+-[0-9a-f]{12}")
# A staging directory younger than this is left alone (its process may not hold its lock yet).
_STAGING_GRACE_SECONDS = 60


def _identity(st: os.stat_result) -> dict:
    # Not st_dev: one file on a shared (NFS) mount has another device number on each host.
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


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


def _holds_source(out_dir: str, source: str, version: int) -> bool:
    """Whether `out_dir` holds this converter version's conversion of `source`'s current bytes;
    where only the file's identity changed, the new one is recorded (when the cache is writable)."""
    record = _read_record(out_dir)
    if record is None or record.get("version") != version or record.get("path") != source:
        return False
    if "files" in record and record["files"] != _files(out_dir):  # a hunt: a cut or deleted file was trusted
        logger.warning("the conversion of %s at %s is damaged (its files differ from its record): converting again",
                       source, out_dir)
        return False
    identity = _identity(os.stat(source))
    recorded = record.get("identity") or {}
    if recorded == identity:
        return True
    if recorded.get("size") != identity["size"] or record.get("sha256") != _sha256(source):
        return False
    try:
        _write_record(out_dir, {**record, "identity": identity})
    except OSError:
        pass  # a read-only cache: the same bytes are hashed again next time
    return True


def _files(out_dir: str) -> dict[str, int]:
    """A conversion's files and their sizes in bytes, its record (and a record being written) left out."""
    return {entry.name: entry.stat().st_size for entry in os.scandir(out_dir)
            if entry.is_file() and entry.name != _RECORD and not entry.name.startswith(".")}


def _abandoned_staging(path: str) -> bool:
    """Whether a staging directory's conversion is over: old enough, and nobody holds its lock."""
    try:
        if time.time() - os.stat(path).st_mtime < _STAGING_GRACE_SECONDS:
            return False
        with open(os.path.join(path, _LOCK), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return False
    return True


def _legacy_conversion(path: str) -> bool:
    """Whether a directory is a conversion of the naming before ``source.json`` (nothing finds it)."""
    names = set(os.listdir(path))
    return (_LEGACY_NAME.fullmatch(os.path.basename(path)) is not None and "config.json" in names
            and _RECORD not in names and not any(n.endswith(".gguf") for n in names))


def _remove_leftovers(root: str, keep: str) -> None:
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if path == keep or not os.path.isdir(path):
            continue
        staging = name.startswith(".") and _STAGING in name
        if (staging and _abandoned_staging(path)) or (not name.startswith(".") and _legacy_conversion(path)):
            logger.info("removing %s, %s", path, "a conversion killed midway" if staging else
                        "a conversion from before source.json")
            shutil.rmtree(path, ignore_errors=True)


def unwritable_cache(exc: OSError, what: str) -> OSError:
    """``exc`` (its type and errno) saying that ``what``, under ``PAGEDLM_CACHE``, cannot be written."""
    return type(exc)(exc.errno, f"cannot write {what} ({exc.strerror}); it lies under PAGEDLM_CACHE (default "
                                "~/.cache/pagedlm): set that to a writable directory")


def cached_conversion(source: str, root: str, convert: Callable[[str, str], object], version: int,
                      check: Callable[[str], object] | None = None) -> str:
    """Return the directory holding `convert(source, out_dir)`'s output for `source`'s current bytes,
    converting only when no conversion of those bytes by this `version` of the converter exists.
    `check(source)`, when given, runs before the file is hashed (a whole read): a file that cannot
    be converted is refused without it.

    `convert` must create `out_dir` (which does not exist yet) with everything in it; the record is
    added after it returns, and the finished directory is renamed into place, so readers never see
    a partial conversion. Concurrent callers may convert the same file twice; one result stays.
    Raises whatever `convert` raises, and OSError where `root` cannot be written (naming `root`,
    before the file is hashed).
    """
    source = os.path.abspath(source)
    stem = os.path.splitext(os.path.basename(source))[0]
    out_dir = os.path.join(root, f"{stem}-{hashlib.sha256(source.encode()).hexdigest()[:12]}")
    if os.path.isdir(out_dir) and _holds_source(out_dir, source, version):
        logger.debug("using the earlier conversion of %s at %s", source, out_dir)
        return out_dir

    if check is not None:
        check(source)
    try:
        os.makedirs(root, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}{_STAGING}", dir=root)
    except OSError as exc:  # a hunt: the staging path's error, after a hash of the whole file
        raise unwritable_cache(exc, f"the conversion cache {root!r}") from None
    converted = os.path.join(staging, "checkpoint")
    try:
        with open(os.path.join(staging, _LOCK), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held until the result is in place
            record = {"path": source, "identity": _identity(os.stat(source)), "sha256": _sha256(source),
                      "version": version}
            logger.info("converting %s to an HF checkpoint at %s", source, out_dir)
            convert(source, converted)
            _write_record(converted, {**record, "files": _files(converted)})
            _move_into_place(converted, out_dir, staging, source, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _remove_leftovers(root, keep=out_dir)
    return out_dir


def _move_into_place(converted: str, out_dir: str, staging: str, source: str, version: int) -> None:
    """Rename `converted` to `out_dir`, moving a conversion of other bytes there aside first; keep
    one that another process finished first for the same bytes."""
    for attempt in range(3):
        try:
            os.rename(converted, out_dir)
            return
        except OSError:
            if not os.path.isdir(out_dir):
                raise
        if _holds_source(out_dir, source, version):
            return
        logger.info("replacing the conversion of %s's earlier contents", source)
        try:
            os.rename(out_dir, os.path.join(staging, f"superseded-{attempt}"))
        except FileNotFoundError:
            pass
    raise OSError(f"could not put the conversion of {source} in place at {out_dir}: other processes kept "
                  "replacing it")
