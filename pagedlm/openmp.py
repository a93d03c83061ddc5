"""OpenMP settings that only take effect in the environment before torch loads libgomp.

A waiting libgomp thread spins ``GOMP_SPINCOUNT`` times (300,000 by default) before it sleeps. A
decode step runs hundreds of short parallel regions (every linear, norm and attention call); when
another busy process shares a core, the spinning threads take time slices from the descheduled one
that every region then waits for, and throughput collapses (48 chat prompts on SmolLM2, 2 threads,
one busy-loop neighbour: 0.31-0.37 of the quiet rate). Spinning 1,000 times keeps short waits
cheap and yields the core soon after (0.57-0.65 of quiet, quiet rate unchanged within this
machine's noise; ``benchmarks/contention.py``).
"""

import os
import sys

GOMP_SPINCOUNT = "1000"


def set_openmp_defaults() -> bool:
    """Set ``GOMP_SPINCOUNT`` unless the user set it or ``OMP_WAIT_POLICY``; returns whether it is in
    effect (False when torch was imported before pagedlm: libgomp has read its environment)."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    if "torch" in sys.modules:
        return False
    os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    return True
