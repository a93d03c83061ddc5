"""The GGUF conversion cache: one conversion per path, redone exactly when the bytes change."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from pagedlm.transformers_utils.conversion_cache import cached_conversion


class Converter:
    """Writes the source's bytes into `out_dir/copy`, counting calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, source: str, out_dir: str) -> None:
        self.calls += 1
        os.makedirs(out_dir)
        shutil.copyfile(source, os.path.join(out_dir, "copy"))


def converted_bytes(out_dir: str) -> bytes:
    with open(os.path.join(out_dir, "copy"), "rb") as f:
        return f.read()


@pytest.fixture
def setup(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"A" * 100)
    return str(source), str(tmp_path / "cache"), Converter()


def test_the_same_bytes_are_converted_once(setup):
    source, root, convert = setup
    out = cached_conversion(source, root, convert, 1)
    assert cached_conversion(source, root, convert, 1) == out and convert.calls == 1
    os.utime(source, ns=(10**18, 10**18))  # touched: a new identity, the same bytes
    assert cached_conversion(source, root, convert, 1) == out and convert.calls == 1
    with open(os.path.join(out, "source.json")) as f:
        assert json.load(f)["identity"]["mtime_ns"] == 10**18


def test_a_damaged_conversion_is_converted_again(setup):
    """Found by a hunt: a cut or deleted file of a conversion was trusted (its record alone was
    read), and every later load failed in safetensors until the entry was deleted by hand."""
    source, root, convert = setup
    out = cached_conversion(source, root, convert, 1)
    with open(os.path.join(out, "copy"), "r+b") as f:
        f.truncate(10)
    assert cached_conversion(source, root, convert, 1) == out and convert.calls == 2
    assert converted_bytes(out) == b"A" * 100
    os.remove(os.path.join(out, "copy"))
    assert cached_conversion(source, root, convert, 1) == out and convert.calls == 3
    assert cached_conversion(source, root, convert, 1) == out and convert.calls == 3


def test_other_bytes_replace_the_conversion(setup):
    source, root, convert = setup
    out = cached_conversion(source, root, convert, 1)
    # `cp -p` of another file of the same size: the same inode, size and mtime; only ctime tells.
    st = os.stat(source)
    time.sleep(0.05)  # past the kernel's coarse timestamp tick
    with open(source, "r+b") as f:
        f.write(b"B" * 100)
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = os.stat(source)
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert cached_conversion(source, root, convert, 1) == out and convert.calls == 2
    assert converted_bytes(out) == b"B" * 100
    with open(source, "wb") as f:
        f.write(b"C" * 50)
    assert cached_conversion(source, root, convert, 1) == out and convert.calls == 3
    assert converted_bytes(out) == b"C" * 50
    assert os.listdir(root) == [os.path.basename(out)]


def test_a_new_converter_version_converts_again(setup):
    source, root, convert = setup
    out = cached_conversion(source, root, convert, 1)
    assert cached_conversion(source, root, convert, 2) == out and convert.calls == 2
    assert cached_conversion(source, root, convert, 2) == out and convert.calls == 2
    assert os.listdir(root) == [os.path.basename(out)]


def test_each_path_has_its_own_conversion(setup, tmp_path):
    source, root, convert = setup
    copy = tmp_path / "sub" / "model.gguf"
    copy.parent.mkdir()
    shutil.copyfile(source, copy)
    assert cached_conversion(source, root, convert, 1) != cached_conversion(str(copy), root, convert, 1)
    assert convert.calls == 2


def test_leftovers_are_removed_and_nothing_else(setup, tmp_path):
    """Found by a review: a user's directory inside the cache, and a conversion another container
    was writing, were deleted (by missing source.json, and a host name and pid taken as a process)."""
    source, root, convert = setup
    os.makedirs(root)
    legacy = os.path.join(root, "model-0123456789ab")  # the naming before source.json
    user_dirs = [os.path.join(root, "my-models"), os.path.join(root, "old-0123456789ab")]
    for path in (legacy, *user_dirs):
        os.makedirs(path)
    open(os.path.join(legacy, "config.json"), "w").close()
    open(os.path.join(user_dirs[0], "model.gguf"), "w").close()  # no config.json: not a conversion
    open(os.path.join(user_dirs[1], "config.json"), "w").close()
    open(os.path.join(user_dirs[1], "x.gguf"), "w").close()  # holds a GGUF: the user's
    gone = tmp_path / "gone.gguf"  # a conversion whose source is missing now (an unmounted drive)
    gone.write_bytes(b"D")
    gone_out = cached_conversion(str(gone), root, convert, 1)
    gone.unlink()
    killed, running, young = (os.path.join(root, f".model-0123456789ab.staging-{n}") for n in ("k", "r", "y"))
    for path in (killed, running, young):
        os.makedirs(path)
        open(os.path.join(path, ".lock"), "w").close()
    for path in (killed, running):
        os.utime(path, (time.time() - 3600,) * 2)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               os.path.join(running, ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = cached_conversion(source, root, convert, 1)
    finally:
        holder.kill()
    kept = {os.path.basename(p) for p in (out, gone_out, running, young, *user_dirs)}
    assert set(os.listdir(root)) == kept


def test_a_failed_conversion_leaves_nothing(setup):
    source, root, _ = setup

    def fail(source: str, out_dir: str) -> None:
        os.makedirs(out_dir)
        raise ValueError("unsupported")

    with pytest.raises(ValueError, match="unsupported"):
        cached_conversion(source, root, fail, 1)
    assert os.listdir(root) == []


def test_an_unwritable_cache_is_named_before_the_file_is_hashed(setup, monkeypatch):
    """A hunt: a read-only cache raised the staging path's PermissionError, after a hash of the
    whole file, without saying what to change."""
    from pagedlm.transformers_utils import conversion_cache

    source, root, convert = setup

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def hashed(path):
        raise AssertionError("hashed before the cache was known to be writable")

    monkeypatch.setattr(conversion_cache.tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(conversion_cache, "_sha256", hashed)
    with pytest.raises(PermissionError, match=f"cannot write the conversion cache '{root}' .*set that to a writable"):
        cached_conversion(source, root, convert, 1)
    assert convert.calls == 0


def test_a_conversion_finished_first_elsewhere_is_kept(setup, monkeypatch):
    """Two processes converting the same bytes: the second keeps the first's directory."""
    source, root, convert = setup
    first = Converter()

    def racing(source_path: str, out_dir: str) -> None:
        convert(source_path, out_dir)
        cached_conversion(source_path, root, first, 1)  # finishes while this one runs

    out = cached_conversion(source, root, racing, 1)
    assert first.calls == 1 and convert.calls == 1
    assert converted_bytes(out) == b"A" * 100 and os.listdir(root) == [os.path.basename(out)]


def test_pagedlm_cache_that_is_no_directory_is_refused_by_name(tmp_path, monkeypatch):
    """Found by a hunt: PAGEDLM_CACHE naming a file gave a NotADirectoryError traceback naming
    neither the variable nor what it must be; a relative one gave relative model paths."""
    from pagedlm.transformers_utils.gguf import default_model_path, download_dir

    (tmp_path / "f").write_text("")
    monkeypatch.setenv("PAGEDLM_CACHE", str(tmp_path / "f"))
    with pytest.raises(ValueError, match=r"PAGEDLM_CACHE='.*/f' is not a directory: set it to a writable directory"):
        default_model_path(download=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PAGEDLM_CACHE", "~/f")  # a review: checked before ~ was expanded
    with pytest.raises(ValueError, match=r"PAGEDLM_CACHE='~/f' is not a directory"):
        download_dir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PAGEDLM_CACHE", "cache")
    assert download_dir() == str(tmp_path / "cache")


@pytest.mark.parametrize("level, ok", [("garbage", False), ("", True), ("warn", True)])
def test_pagedlm_logging_level_names_the_variable_and_the_levels(level, ok):
    """Found by a hunt: a bad level raised logging's "Unknown level: 'GARBAGE'" at import, and an
    empty one did too instead of meaning the default."""
    result = subprocess.run([sys.executable, "-c", "import pagedlm"], capture_output=True, text=True,
                            env={**os.environ, "PAGEDLM_LOGGING_LEVEL": level})
    assert (result.returncode == 0) == ok, result.stderr
    if not ok:
        assert f"PAGEDLM_LOGGING_LEVEL='{level}': use DEBUG, INFO, WARNING, ERROR or CRITICAL" in result.stderr
