"""The target registry: a :class:`ChipTarget` is data plus the family's pipeline and schedule rules."""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
from collections.abc import Callable, Mapping
from typing import Any

from lowbit.codegen.errors import LowbitError
from lowbit.codegen.formats import ROW_BLOCK, W8A8_KINDS, ColumnTiles, LinearFormat
from lowbit.codegen.host_cpu import missing_here


DOT_ACCUMULATORS = 4  # accumulator vectors per column tile of the w4a8 kernels


@dataclasses.dataclass(frozen=True)
class ChipTarget:
    """One chip that lowbit can compile for.

    Attributes:
        name: registry key, e.g. ``x86-avx2``.
        family: ``x86``, ``arm`` or ``cuda``.
        tvm_target: the TVM target as a dict (apache-tvm 0.27 accepts dicts only).
        capabilities: instruction-set features the kernels rely on (``avx2``, ``avx512_vnni``,
            ``dotprod``...): checked against the host's CPU flags before code built for this target
            runs here, and read by schedule rules that pick instructions.
        description: one line for ``lowbit targets``.
        rules: dlight ``ScheduleRule``s for lowbit's kernels, tried in order (:mod:`lowbit.targets.simd`).
        pipeline: ``chip -> relax pipeline pass`` of the family (:func:`lowbit.targets.pipeline.cpu_pipeline`),
            or ``None`` where lowbit cannot build for the family yet.
        linear_tile: output channels per column tile of the weights (:meth:`linear_layout`).
        dot_lanes: int32 lanes of the vector the byte dot product accumulates into (16 for AVX-512).
        int4_dot: the registered tensor intrinsic for the ``w4a8`` kernels' inner step
            (:mod:`lowbit.targets.dot_intrinsics`), or ``None`` to leave it to LLVM's vectorizer.
        int4_dot_gemv: the same step for the GEMV (decode), which streams every weight once (e.g.
            with the codes ahead prefetched); ``None``: ``int4_dot``.
        int8_dot, int8_dot_gemv: the same for the ``w8a8`` kernels' byte quads
            (:mod:`lowbit.targets.dot_intrinsics`).
        int8_gemm_rows: the row block the ``w8a8`` GEMMs pad their rows to
            (:attr:`~lowbit.codegen.formats.ColumnTiles.row_block`; 32 for AMX's two 16-row tiles).
        machines: ``platform.machine()`` values of hosts that run this target's code.
        cpu_flags: the host CPU flag (``/proc/cpuinfo``) that proves each capability, where its name differs.
        cross_compiler: the C++ compiler that links ``model.so`` when the target is not this
            machine's (e.g. ``aarch64-linux-gnu-g++``); ``LOWBIT_CROSS_CXX`` overrides it.
    """

    name: str
    family: str
    tvm_target: dict[str, Any]
    capabilities: tuple[str, ...]
    description: str
    rules: tuple = ()
    pipeline: Callable | None = None
    linear_tile: int = 16
    dot_lanes: int = 4
    int4_dot: str | None = None
    int4_dot_gemv: str | None = None
    int8_dot: str | None = None
    int8_dot_gemv: str | None = None
    int8_gemm_rows: int = ROW_BLOCK
    machines: tuple[str, ...] = ()
    cpu_flags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    cross_compiler: str | None = None

    @property
    def can_build(self) -> bool:
        """Whether lowbit has a pipeline and schedule rules for this target's kernels."""
        return self.pipeline is not None and bool(self.rules)

    def tvm(self):
        """The :class:`tvm.target.Target` for this chip."""
        from tvm.target import Target

        return Target(self.tvm_target)

    def linear_layout(self, fmt: LinearFormat) -> ColumnTiles:
        """The memory layout this chip's kernels want for a linear weight of format ``fmt``: for the
        byte dot product (``w4a8``, ``w8a8``), ``DOT_ACCUMULATORS`` vectors of ``dot_lanes`` channels
        per tile (independent accumulator chains hide the instruction's latency)."""
        if fmt.kind in W8A8_KINDS:
            return ColumnTiles(DOT_ACCUMULATORS * self.dot_lanes, self.int8_gemm_rows)
        if fmt.kind == "w4a8":
            return ColumnTiles(DOT_ACCUMULATORS * self.dot_lanes)
        return ColumnTiles(self.linear_tile)

    def runs_on_this_machine(self) -> bool:
        """Whether code built for this target can execute here: the machine type and every capability."""
        return not missing_here(self.machines, self.capabilities, self.cpu_flags)

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
            "machines": list(self.machines),
            "cpu_flags": {c: self.cpu_flags.get(c, c) for c in self.capabilities},
            "description": self.description,
            "linear_tile": self.linear_tile,
            "int4_dot": self.int4_dot,
            "int8_dot": self.int8_dot,
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
    """Look a target up by name; ``host`` picks the buildable target this CPU runs with the most
    capabilities."""
    if not isinstance(name, str):
        raise LowbitError(f"target must be a name, got {type(name).__name__} {name!r}")
    if name == "host":
        runnable = [t for t in _REGISTRY.values() if t.can_build and t.runs_on_this_machine()]
        if not runnable:
            raise LowbitError(
                f"no registered target runs on this machine ({platform.machine()}); "
                f"name one explicitly with -t: {', '.join(sorted(_REGISTRY))}"
            )
        return max(runnable, key=lambda t: len(t.capabilities))
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LowbitError(
            f"unknown target {name!r}; valid targets: host, {', '.join(sorted(_REGISTRY))}"
        ) from None
