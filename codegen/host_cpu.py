"""What the host CPU can execute: its machine type and feature flags, read without TVM.

Both the target registry (which target ``host`` picks, whether a target's code runs here) and the
runtime (whether an artifact's code can run on this CPU before its library is loaded: a missing
instruction would otherwise kill the process with SIGILL) ask this module.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Iterable, Mapping

TILE_CAPABILITY = "amx_tile"  # code with AMX tile instructions needs the tile state (request_tile_state)
_SYS_ARCH_PRCTL = 158  # x86-64 Linux
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


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


def request_tile_state() -> None:
    """Ask Linux for the AMX tile data state, for this process and all its threads (the grant is
    per process and idempotent). Without it the first tile instruction kills the process with
    SIGILL. Raises ``OSError`` where the system refuses: another OS or machine type, or a CPU or
    kernel without AMX."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise OSError(errno.ENOSYS, f"AMX tile state exists on x86-64 Linux only (this is {platform.system()} "
                         f"on {platform.machine()})")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                    ctypes.c_long(_XFEATURE_XTILEDATA)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) failed: {os.strerror(error)}")
