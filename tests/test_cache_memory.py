"""The CPU KV cache's memory: sized within the process's memory cgroup, and its pages mapped when it
is allocated (pagedlm/worker/prefault.py), contents left as they were; the cache still works where
the kernel cannot map them ahead."""

import ctypes
import mmap
import os
import sys

import pytest
import torch

from pagedlm import LLM, SamplingParams, config
from pagedlm.worker import prefault
from pagedlm.worker.prefault import MADV_POPULATE_WRITE, populate

PAGE = os.sysconf("SC_PAGE_SIZE")
SHAPE = (1024, 4, 16, 64)  # 8 MiB in bf16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def _populate_supported() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    probe = torch.empty(PAGE // 4, dtype=torch.float32)
    start = probe.data_ptr() - probe.data_ptr() % PAGE
    return _libc.madvise(start, PAGE, MADV_POPULATE_WRITE) == 0


needs_populate = pytest.mark.skipif(not _populate_supported(), reason="needs Linux >= 5.14 (MADV_POPULATE_WRITE)")


def resident_share(t: torch.Tensor) -> float:
    """Share of the pages under ``t`` that are mapped (mincore)."""
    start = t.data_ptr() - t.data_ptr() % PAGE
    length = t.data_ptr() + t.numel() * t.element_size() - start
    pages = (length + PAGE - 1) // PAGE
    vec = ctypes.create_string_buffer(pages)
    assert _libc.mincore(start, length, vec) == 0, os.strerror(ctypes.get_errno())
    return sum(b & 1 for b in vec.raw) / pages


def fresh_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """A bf16 tensor on a new anonymous mapping, none of its pages mapped yet (torch.empty may reuse
    memory the process has touched)."""
    numel = 1
    for n in shape:
        numel *= n
    return torch.frombuffer(mmap.mmap(-1, 2 * numel), dtype=torch.bfloat16).view(shape)


@needs_populate
def test_maps_every_page_and_keeps_what_was_written():
    tensors = [fresh_tensor(SHAPE) for _ in range(3)]
    assert all(resident_share(t) == 0.0 for t in tensors)  # so the test can fail
    for i, t in enumerate(tensors):
        t[-1].fill_(i + 1.5)
        t[3].fill_(-(i + 0.25))
    assert populate(tensors, threads=2)
    assert all(resident_share(t) == 1.0 for t in tensors)
    for i, t in enumerate(tensors):
        assert torch.equal(t[-1], torch.full_like(t[-1], i + 1.5))
        assert torch.equal(t[3], torch.full_like(t[3], -(i + 0.25)))


@needs_populate
def test_llm_cache_is_mapped_at_start(llama_dir):
    llm = LLM(llama_dir, dtype="bfloat16", num_kv_blocks=40_000)
    cache_engine = llm.llm_engine.model_runner.cache_engine
    caches = cache_engine.key_caches + cache_engine.value_caches
    assert cache_engine.populated
    assert all(resident_share(c) == 1.0 for c in caches)


@needs_populate
def test_without_populate_the_cache_faults_in_and_outputs_are_the_same(llama_dir, monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10]}, {"prompt_token_ids": list(range(20, 60))}]
    expected = [o.outputs[0].token_ids for o in LLM(llama_dir, dtype="bfloat16").generate(prompts, params, use_tqdm=False)]
    monkeypatch.setattr(prefault, "MADV_POPULATE_WRITE", -1)  # an advice no kernel takes: EINVAL
    llm = LLM(llama_dir, dtype="bfloat16")
    assert not llm.llm_engine.model_runner.cache_engine.populated
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected


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


def test_available_ram_takes_the_cgroup_limit(monkeypatch):
    monkeypatch.setattr(config, "_cgroup_memory_left", lambda: 5 << 20)
    assert config._available_ram() == 5 << 20
    monkeypatch.setattr(config, "_cgroup_memory_left", lambda: None)
    assert config._available_ram() > 5 << 20
