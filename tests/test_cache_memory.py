"""The CPU KV cache's default size stays within the process's memory cgroup (a container's limit,
which /proc/meminfo does not show), and its memory is advised for transparent huge pages; a CUDA
cache's is the LLM's share of the GPU."""

import mmap
import os

import pytest
import torch

from pagedlm import LLM, config
from pagedlm.worker.cache_engine import HUGE_PAGE_BYTES, empty_on_huge_pages


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


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="madvise(MADV_HUGEPAGE) is Linux's")
def test_the_cpu_kv_cache_lies_on_memory_advised_for_huge_pages(llama_dir):
    t = empty_on_huge_pages((3, 2, 16, 8), torch.float8_e5m2)
    assert t.shape == (3, 2, 16, 8) and t.dtype == torch.float8_e5m2 and t.is_contiguous()
    assert t.data_ptr() % HUGE_PAGE_BYTES == 0 and "hg" in _vm_flags(t.data_ptr())
    if os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":  # torch's own switch, which advises every large allocation
        assert "hg" not in _vm_flags(torch.empty(64 << 20, dtype=torch.uint8).data_ptr())  # what it replaces
    llm = LLM(llama_dir, dtype="float32", num_kv_blocks=64)
    for key, value in llm.llm_engine.model_runner.cache_engine.kv_caches:
        assert key.shape == value.shape == (64, *key.shape[1:]) and key.dtype == torch.float32
        assert "hg" in _vm_flags(key.data_ptr()) and "hg" in _vm_flags(value.data_ptr() + value.nbytes - 1)


def test_gpu_memory_utilization_is_each_llms_share_of_the_gpu(monkeypatch):
    """vLLM's per-instance budget (found by a hunt: the cache was the free memory less 10% of the
    total, so a second LLM on a GPU, a Ray actor sharing one, got none). Two LLMs at 0.45 on an
    80 GiB GPU: each gets 36 GiB less its own weights (2 GiB); at the default 0.9 the second is
    refused before its weights load. (Memory mocked: CI has no GPU.)"""
    gib, total = 2**30, 80 * 2**30
    free = {"now": total - gib // 2}  # CUDA's context
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["now"], total))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    cuda = torch.device("cuda")

    def start_llm(utilization):
        at_start = config.check_free_gpu_memory(cuda, utilization)
        free["now"] -= 2 * gib  # its weights
        kv = config.available_memory(cuda, utilization, at_start)
        free["now"] -= kv
        return kv

    assert [start_llm(0.45), start_llm(0.45)] == [int(0.45 * total) - 2 * gib] * 2
    free["now"] = total - gib // 2
    assert start_llm(None) == int(0.9 * total) - 2 * gib
    with pytest.raises(ValueError, match=r"gpu_memory_utilization 0.9 asks for 72.00 GiB .* only 7.50 GiB are free"):
        start_llm(None)
    assert config.check_free_gpu_memory(torch.device("cpu"), None) is None
