"""OpenMP settings: the wait policy, which only takes effect in the environment before torch loads
libgomp, a thread count within the process's CPU quota, and MKL's vector math initialised before a
parallel region can first call it.

pagedlm's CPU kernels run on a thread pool of their own (csrc/cpu/thread_pool.cpp), which spins
between regions on a quiet machine and sleeps early on a busy one. On AMX, on AVX512-BF16 where
``Linear`` runs pagedlm's streaming kernel (its sums reproduced oneDNN's for the weights), on AVX2
(its FMA kernels), and in float32 on AVX-512 too (the same FMA kernels), a greedy or seeded step of
a Llama-family model (Granite, Gemma 2 and 3, Qwen3 included), log-probabilities and prompt
log-probabilities included, runs no torch op large enough to open a libgomp region
(tests/test_openmp.py; Gemma 2's float32 final soft cap excepted); oneDNN's linears (bf16 on an
AVX-512 CPU without BF16),
penalties, logits processors and beam search still do, and libgomp's waiting
threads spin ``GOMP_SPINCOUNT`` times (300,000 by default, ~3.5 ms here) after each one. Beside the
pool's workers, that took a quarter of the quiet rate (benchmarks/contention.py) and 10% of a
Qwen2-0.5B-shaped run's while the embedding lookup was torch's. With ``OMP_WAIT_POLICY=passive``
they sleep at once: as fast as 3,000 spins (the earlier default) on SmolLM2, 8% faster on the 0.5B
shape, and kinder to a busy neighbour (numbers in docs/performance.md). It cannot be set once torch
is imported, which is why the common bf16 step must not depend on it.
"""

import logging
import math
import os
import sys

logger = logging.getLogger("pagedlm")

OMP_WAIT_POLICY = "passive"
_set_here = False  # whether set_openmp_defaults set it (restore_environment removes it then)


def set_openmp_defaults() -> None:
    """Set ``OMP_WAIT_POLICY`` unless the user set it or ``GOMP_SPINCOUNT``, or torch was imported
    before pagedlm (libgomp has read its environment then, so it would not take effect). libgomp
    reads it once, when torch loads it; ``restore_environment`` then takes it out again."""
    global _set_here
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return
    os.environ["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
    _set_here = True


def restore_environment() -> None:
    """Remove the ``OMP_WAIT_POLICY`` that ``set_openmp_defaults`` set, once torch has loaded
    libgomp: child processes (a benchmark's peers, a data loader's workers, another OpenMP runtime)
    would otherwise inherit pagedlm's choice. A child that imports pagedlm sets it for itself."""
    global _set_here
    if not _set_here:
        return
    import torch  # noqa: F401  (loads libgomp, which reads its environment then)

    if os.environ.get("OMP_WAIT_POLICY") == OMP_WAIT_POLICY:
        del os.environ["OMP_WAIT_POLICY"]
    _set_here = False


def initialize_vector_math() -> None:
    """Make the process's first call into MKL's vector math library (VML, behind torch's float32
    ``tanh``, ``exp`` and others) here, on one thread. Its lazy initialisation races when the first
    call comes from an OpenMP region: with two threads, 4-9 of 20-30 fresh processes computed their
    first float32 ``torch.tanh`` with errors up to 5e-5 (3e-8 on every later call, and on every call
    with one thread or after one serial call), so a float32 Gemma 2 soft cap, ours (``ops.soft_cap``)
    or transformers', could differ between runs of the same input."""
    import torch

    torch.tanh(torch.zeros(1))


def cpu_quota(root: str = "/sys/fs/cgroup") -> int | None:
    """The CPUs the process's cgroup may use (its CFS quota / period, rounded up), or None without a
    quota. libgomp sizes its pool from the CPU affinity mask, which a container's quota does not
    shrink: 2 CPUs of quota on a 64-core host would otherwise run 64 threads."""
    for quota_file, period_file in ((f"{root}/cpu.max", None),
                                    (f"{root}/cpu/cpu.cfs_quota_us", f"{root}/cpu/cpu.cfs_period_us")):
        try:
            with open(quota_file) as f:
                fields = f.read().split()
            if period_file is not None:
                with open(period_file) as f:
                    fields.append(f.read().strip())
        except OSError:
            continue
        quota, period = fields[0], fields[1] if len(fields) > 1 else "100000"
        if quota in ("max", "-1"):
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    return None


def _threads_chosen() -> bool:
    """Whether ``OMP_NUM_THREADS`` holds a count OpenMP takes (a positive integer, or a list of
    them, one per nesting level); libgomp warns of another value and ignores it, and so does this
    (found by a hunt: "abc" or 0 turned the quota's limit off)."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip().removeprefix("+")  # strtoul's sign
    return first.isdigit() and int(first) > 0


def limit_threads_to_cpu_quota() -> None:
    """Lower torch's intra-op threads to the cgroup's CPU quota when it is smaller, unless the user
    chose a count (``OMP_NUM_THREADS``, ``_threads_chosen``)."""
    import torch

    quota = cpu_quota()
    if quota is None or _threads_chosen() or torch.get_num_threads() <= quota:
        return
    logger.info("Using %d threads, the CPU quota of this process's cgroup (torch would use %d); set "
                "OMP_NUM_THREADS to choose.", quota, torch.get_num_threads())
    torch.set_num_threads(quota)
