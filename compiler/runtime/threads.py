"""How many threads lowbit's kernels run on: every core this process may use, unless told otherwise.

TVM's thread pool sizes itself once, at its first parallel kernel, from ``TVM_NUM_THREADS`` or else
half the hardware threads on x86 (it assumes two hyper-threads per core): on a VM whose vCPUs are
each a core (``thread_siblings`` of one) that is half the machine. lowbit sets ``TVM_NUM_THREADS``
to the cores in the process's CPU affinity before its first kernel runs, unless the user set it.
"""

from __future__ import annotations

import os

VARIABLE = "TVM_NUM_THREADS"


def use_available_cores() -> int:
    """Set the kernels' thread count (see the module docstring) and return it; call before any
    kernel runs in this process (a pool already started keeps its size)."""
    configured = os.environ.get(VARIABLE, "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ[VARIABLE] = str(cores)
    return cores


def kernel_threads() -> int:
    """The thread count the kernels of this process run on."""
    import tvm

    return int(tvm.runtime.num_threads())
