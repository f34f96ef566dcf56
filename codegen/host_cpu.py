"""What the host CPU can execute: its machine type and feature flags, read without TVM.

Both the target registry (which target ``host`` picks, whether a target's code runs here) and the
runtime (whether an artifact's code can run on this CPU before its library is loaded: a missing
instruction would otherwise kill the process with SIGILL) ask this module.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping


def cpu_flags() -> set[str]:
    """The host CPU's feature flags (x86 ``flags``, AArch64 ``Features`` in ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def missing_here(machines: Iterable[str], capabilities: Iterable[str], flags: Mapping[str, str]) -> list[str]:
    """What code built for ``machines`` needing ``capabilities`` lacks on this host: the machine
    type (``platform.machine()``) if it is not among ``machines``, then each capability whose CPU
    flag (``flags`` maps a capability to its ``/proc/cpuinfo`` name where they differ) is absent."""
    if platform.machine() not in machines:
        return [f"a {'/'.join(machines)} machine (this one is {platform.machine()})"]
    present = cpu_flags()
    return [c for c in capabilities if flags.get(c, c) not in present]
