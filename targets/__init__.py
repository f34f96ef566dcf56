"""Chip targets: one module per family, one registry by name.

``get_target("host")`` resolves to the best registered target this machine can run.
"""

from .registry import ChipTarget, get_target, list_targets, register_target
from . import x86, arm, cuda  # noqa: F401  (each module registers its targets)

__all__ = ["ChipTarget", "get_target", "list_targets", "register_target"]
