"""OpenMP settings: the wait policy set at import, threads within a cgroup CPU quota."""

import os
import subprocess
import sys

import pytest
import torch

from pagedlm import openmp


def _run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_wait_policy_is_set_only_when_it_can_take_effect():
    show = "import os; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert _run(f"import pagedlm; {show}") == openmp.OMP_WAIT_POLICY == "passive"
    assert _run(f"import torch, pagedlm; {show}") == "None"  # libgomp has read its environment already
    assert _run(f"import pagedlm; {show}", OMP_WAIT_POLICY="active") == "active"
    assert _run(f"import pagedlm; {show}", GOMP_SPINCOUNT="5") == "None"


@pytest.mark.parametrize("files,expected", [
    ({"cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cpu_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert openmp.cpu_quota(str(tmp_path)) == expected


def test_threads_are_lowered_to_the_quota(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(openmp, "cpu_quota", lambda: 1)
    try:
        torch.set_num_threads(2)
        openmp.limit_threads_to_cpu_quota()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice stands
        openmp.limit_threads_to_cpu_quota()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
