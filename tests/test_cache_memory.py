"""The CPU KV cache's default size stays within the process's memory cgroup (a container's limit,
which /proc/meminfo does not show)."""

import pytest

from pagedlm import config


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_limit_caps_the_memory_plan(tmp_path, version):
    proc = tmp_path / "proc_cgroup"
    root = tmp_path / "cgroup"
    gib = 1 << 30
    if version == "v2":
        _write(proc, "0::/jobs/run1\n")
        _write(root / "memory.max", "max\n")
        _write(root / "memory.current", str(9 * gib))
        _write(root / "jobs" / "memory.max", str(6 * gib))  # the tighter ancestor
        _write(root / "jobs" / "memory.current", str(2 * gib))
        _write(root / "jobs" / "run1" / "memory.max", str(8 * gib))
        _write(root / "jobs" / "run1" / "memory.current", str(1 * gib))
    else:
        _write(proc, "5:cpu,cpuacct:/jobs/run1\n4:memory:/jobs/run1\n0::/\n")
        _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
        _write(root / "memory" / "memory.usage_in_bytes", str(9 * gib))
        _write(root / "memory" / "jobs" / "run1" / "memory.limit_in_bytes", str(3 * gib))
        _write(root / "memory" / "jobs" / "run1" / "memory.usage_in_bytes", str(1 * gib))
    assert config._cgroup_memory_left(str(root), str(proc)) == (4 if version == "v2" else 2) * gib


def test_no_cgroup_limit_leaves_meminfo(tmp_path):
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/\n")
    _write(tmp_path / "cgroup" / "memory.max", "max\n")
    _write(tmp_path / "cgroup" / "memory.current", "123\n")
    assert config._cgroup_memory_left(str(tmp_path / "cgroup"), str(proc)) is None
    assert config._cgroup_memory_left(str(tmp_path / "missing"), str(tmp_path / "missing_proc")) is None
    _write(tmp_path / "cgroup" / "memory.max", "garbage\n")
    assert config._cgroup_memory_left(str(tmp_path / "cgroup"), str(proc)) is None


def test_available_ram_takes_the_cgroup_limit(monkeypatch):
    monkeypatch.setattr(config, "_cgroup_memory_left", lambda: 5 << 20)
    assert config._available_ram() == 5 << 20
    monkeypatch.setattr(config, "_cgroup_memory_left", lambda: None)
    assert config._available_ram() > 5 << 20
