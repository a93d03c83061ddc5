"""The CPU kernels' own thread pool (csrc/cpu/thread_pool.cpp): errors raised in a worker's task, a
forked child, and torch's thread count."""

import os
import time

import numpy
import pytest
import torch

from pagedlm import ops
from pagedlm.ops import reference

pytestmark = pytest.mark.skipif(ops.backend_for("cpu") != "cpu", reason="needs the CPU kernels of pagedlm._C")


def silu_rows(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A silu_and_mul big enough to split over every thread, and its reference result."""
    x = torch.randn(rows, 2 * 1024, generator=torch.Generator().manual_seed(rows))
    expect = torch.empty(rows, 1024)
    reference.silu_and_mul(expect, x)
    return x, expect


def run_silu(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], x.shape[1] // 2)
    ops.silu_and_mul(out, x)
    return out


def test_an_error_in_a_worker_task_reaches_the_caller():
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: no worker")
    heads, head_size, tokens, num_blocks, block_size = 8, 128, 256, 32, 16
    key_cache = torch.zeros(num_blocks, heads, block_size, head_size)
    value_cache = torch.zeros_like(key_cache)
    key = torch.randn(tokens, heads, head_size)
    slots = torch.arange(tokens)
    slots[-1] = num_blocks * block_size + 5  # in the last task's rows, not the caller's
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.reshape_and_cache(key, key, key_cache, value_cache, slots, 1.0, 1.0)
    # The pool is still usable afterwards.
    x, expect = silu_rows(4096)
    torch.testing.assert_close(run_silu(x), expect)


def test_a_forked_child_gets_a_pool_of_its_own():
    x, expect = silu_rows(4096)
    torch.testing.assert_close(run_silu(x), expect)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if the kernel ran and gave the right values
        # Compared in numpy: torch's own parallel ops hang in a forked child of a process whose
        # libgomp team has started (libgomp is not fork-safe; torch documents this).
        ok = numpy.allclose(run_silu(x).numpy(), expect.numpy(), rtol=1.3e-6, atol=1e-5)
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("the forked child's kernel call did not return within 60 s")


def test_torch_thread_count_bounds_the_tasks():
    before = torch.get_num_threads()
    x, expect = silu_rows(4096)
    try:
        for threads in (1, before):
            torch.set_num_threads(threads)
            torch.testing.assert_close(run_silu(x), expect)
    finally:
        torch.set_num_threads(before)
