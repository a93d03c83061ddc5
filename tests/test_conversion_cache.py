"""The GGUF conversion cache: one conversion per path, redone exactly when the bytes change."""

import json
import os
import shutil
import socket
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


def test_what_nothing_can_use_is_removed(setup, tmp_path):
    source, root, convert = setup
    os.makedirs(os.path.join(root, "model-0123456789ab", "sub"))  # the naming before source.json
    gone, remote = tmp_path / "gone.gguf", tmp_path / "remote.gguf"
    for path in (gone, remote):
        path.write_bytes(b"D")
    gone_out = cached_conversion(str(gone), root, convert, 1)
    remote_out = cached_conversion(str(remote), root, convert, 1)
    with open(os.path.join(remote_out, "source.json")) as f:
        record = json.load(f)
    with open(os.path.join(remote_out, "source.json"), "w") as f:
        json.dump({**record, "host": "another-host"}, f)
    gone.unlink()
    remote.unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = os.path.join(root, f".model-0123456789ab.{socket.gethostname()}.{dead.stdout.strip()}.x1y2")
    elsewhere = os.path.join(root, f".model-0123456789ab.another-host.{dead.stdout.strip()}.x1y2")
    alive = os.path.join(root, f".model-0123456789ab.{socket.gethostname()}.{os.getppid()}.x1y2")
    for path in (killed, elsewhere, alive):
        os.makedirs(path)
    out = cached_conversion(source, root, convert, 1)
    assert sorted(os.listdir(root)) == sorted(os.path.basename(p) for p in (out, remote_out, elsewhere, alive))
    assert not os.path.exists(gone_out)


def test_a_failed_conversion_leaves_nothing(setup):
    source, root, _ = setup

    def fail(source: str, out_dir: str) -> None:
        os.makedirs(out_dir)
        raise ValueError("unsupported")

    with pytest.raises(ValueError, match="unsupported"):
        cached_conversion(source, root, fail, 1)
    assert os.listdir(root) == []


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
