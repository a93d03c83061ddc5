"""OpenMP settings: the spin count, which only takes effect in the environment before torch loads
libgomp, and a thread count within the process's CPU quota.

A waiting libgomp thread spins ``GOMP_SPINCOUNT`` times (300,000 by default) before it sleeps. A
decode step runs hundreds of short parallel regions (every linear, norm and attention call); when
another busy process shares a core, the spinning threads take time slices from the descheduled one
that every region then waits for, and throughput collapses (48 chat prompts on SmolLM2, 2 threads,
one busy-loop neighbour: 0.31-0.37 of the quiet rate). A short spin yields the core soon after;
too short, and a quiet run pays a sleep and a wake-up between regions. On the AMD EPYC of
docs/performance.md 1,000 spins kept 0.53-0.56 of quiet at no measured quiet cost; on the faster
steps of an AMX Xeon they cost 27-29% of the quiet rate, and 3,000 keeps 0.52 of quiet loaded at
10% below libgomp's default quiet rate (1,000: 0.72 at 29%; 10,000: 0.35 at 3%;
``benchmarks/contention.py``, numbers in docs/performance.md).

pagedlm's own kernels no longer wait on libgomp (they run on their own pool, csrc/cpu/thread_pool.cpp,
which adapts to contention), but torch's ops between them still open libgomp regions: with the
default 300,000 spins libgomp's threads then spin ~3.5 ms after each, beside the pool's (contention.py:
1,033 quiet tok/s against 1,333 with 3,000).
"""

import logging
import math
import os
import sys

logger = logging.getLogger("pagedlm")

GOMP_SPINCOUNT = "3000"


def set_openmp_defaults() -> None:
    """Set ``GOMP_SPINCOUNT`` unless the user set it or ``OMP_WAIT_POLICY``, or torch was imported
    before pagedlm (libgomp has read its environment then, so it would not take effect)."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return
    os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT


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


def limit_threads_to_cpu_quota() -> None:
    """Lower torch's intra-op threads to the cgroup's CPU quota when it is smaller, unless the user
    chose a count (``OMP_NUM_THREADS``)."""
    import torch

    quota = cpu_quota()
    if quota is None or "OMP_NUM_THREADS" in os.environ or torch.get_num_threads() <= quota:
        return
    logger.info("Using %d threads, the CPU quota of this process's cgroup (torch would use %d); set "
                "OMP_NUM_THREADS to choose.", quota, torch.get_num_threads())
    torch.set_num_threads(quota)
