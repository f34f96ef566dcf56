"""The target registry: a :class:`ChipTarget` is data (TVM target dict, capability flags, tile sizes)."""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
from typing import Any, Callable

from lowbit.compiler.errors import LowbitError


@dataclasses.dataclass(frozen=True)
class ChipTarget:
    """One chip family member that lowbit can compile for.

    Attributes:
        name: registry key, e.g. ``x86-avx2``.
        family: ``x86``, ``arm`` or ``cuda``; picks the schedule rules in :mod:`lowbit.codegen`.
        tvm_target: the TVM target as a dict (apache-tvm 0.27 accepts dicts only).
        capabilities: instruction-set features the kernels may rely on (``avx2``, ``vnni``, ``dotprod``...).
        vector_bytes: SIMD register width the schedules tile for.
        description: one line for ``lowbit targets``.
        host_cpu_flags: the ``/proc/cpuinfo`` flags a machine needs to run this target's code.
        schedule_linear: the rule that schedules lowbit's linear kernels,
            ``(schedule, m_is_one, tile) -> None`` (see :mod:`lowbit.codegen.kernels`).
        linear_tile: output channels per weight column tile, fixed when weights are packed.
        cross_compiler: the C++ compiler that links ``model.so`` when the target is not this
            machine's (e.g. ``aarch64-linux-gnu-g++``); ``LOWBIT_CROSS_CXX`` overrides it.
    """

    name: str
    family: str
    tvm_target: dict[str, Any]
    capabilities: tuple[str, ...]
    vector_bytes: int
    description: str
    host_cpu_flags: tuple[str, ...] = ()
    schedule_linear: Callable | None = None
    linear_tile: int = 16
    cross_compiler: str | None = None

    @property
    def can_build(self) -> bool:
        """Whether lowbit has schedule rules for this target's kernels."""
        return self.schedule_linear is not None

    def tvm(self):
        """The :class:`tvm.target.Target` for this chip."""
        from tvm.target import Target

        return Target(self.tvm_target)

    @property
    def vector_lanes_f32(self) -> int:
        return self.vector_bytes // 4

    def runs_on_this_machine(self) -> bool:
        """Whether code built for this target can execute here."""
        if self.family != "x86" or platform.machine() not in ("x86_64", "AMD64"):
            return False
        flags = _cpu_flags()
        return all(f in flags for f in self.host_cpu_flags)

    def library_compiler(self) -> Callable | None:
        """What links ``model.so`` for this target: ``None`` for the host's compiler, else TVM's
        cross compiler wrapper. Raises a :class:`LowbitError` if the cross compiler is missing."""
        if self.cross_compiler is None or self.runs_on_this_machine():
            return None
        compiler = os.environ.get("LOWBIT_CROSS_CXX", self.cross_compiler)
        if shutil.which(compiler) is None:
            raise LowbitError(
                f"target {self.name}: linking model.so for {self.tvm_target.get('mtriple', self.family)} needs the "
                f"cross compiler {compiler}, which is not on PATH; install it (Debian/Ubuntu: "
                f"apt install g++-aarch64-linux-gnu) or name another with LOWBIT_CROSS_CXX"
            )
        from tvm.support import cc

        return cc.cross_compiler(compiler)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "tvm_target": self.tvm_target,
            "capabilities": list(self.capabilities),
            "description": self.description,
            "linear_tile": self.linear_tile,
            "can_build": self.can_build,
            "runs_here": self.runs_on_this_machine(),
        }


_REGISTRY: dict[str, ChipTarget] = {}


def register_target(target: ChipTarget) -> ChipTarget:
    if target.name in _REGISTRY:
        raise ValueError(f"target {target.name!r} is registered twice")
    _REGISTRY[target.name] = target
    return target


def list_targets() -> list[ChipTarget]:
    return list(_REGISTRY.values())


def get_target(name: str) -> ChipTarget:
    """Look a target up by name; ``host`` picks the best x86 target this CPU runs."""
    if name == "host":
        runnable = [t for t in _REGISTRY.values() if t.runs_on_this_machine()]
        if not runnable:
            raise LowbitError(
                f"no registered target runs on this machine ({platform.machine()}); "
                f"name one explicitly with -t: {', '.join(sorted(_REGISTRY))}"
            )
        return max(runnable, key=lambda t: (len(t.host_cpu_flags), t.vector_bytes))
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LowbitError(
            f"unknown target {name!r}; valid targets: host, {', '.join(sorted(_REGISTRY))}"
        ) from None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
