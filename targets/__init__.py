"""Chip targets: one module per family, one registry by name.

Owns, per family: the TVM target, the capabilities a chip must have, the lowering pipeline
(:mod:`.pipeline`), the schedule rules for lowbit's kernels as dlight ``ScheduleRule``s
(:mod:`.simd` for the CPU families), the weight layouts its kernels want, and the cross compiler
that links its libraries. Adding a chip is one module here plus its kernels in ``lowbit.codegen``.
``get_target("host")`` resolves to the best registered target this machine can run.

May import: ``lowbit.codegen`` only.
"""

from . import arm, cuda, x86  # noqa: F401  (each module registers its targets)
from .pipeline import build, schedule
from .registry import ChipTarget, get_target, list_targets, register_target

__all__ = ["ChipTarget", "build", "get_target", "list_targets", "register_target", "schedule"]
