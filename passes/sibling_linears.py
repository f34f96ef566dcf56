"""Sibling linear layers: linears that read the same input, run as one wider kernel.

In a transformer block the query, key and value projections read the same normalized hidden state,
and so do the gate and up projections of the MLP. Found from the dataflow graph (matmuls whose left
operand is one and the same variable), never from layer names. Stacking their packed weights along
the output channels turns three (two) small GEMVs into one: one kernel launch and one pass of the
thread pool per group instead of one per layer, which is what a decode step's time goes to on a
small model.

Requires: the linears' weights packed in column tiles (:class:`~lowbit.codegen.formats.ColumnTiles`).
Guarantees: a group is merged only when every member has the same scheme, format, layout and input
width, every member's channel count is a whole number of tiles (so a member's channels are a
contiguous run of tiles: no padding inside the stack), and every tensor the scheme keeps per layer
(not per tile, e.g. a static activation scale) is equal across members. The merged kernel computes
exactly what the members compute (the same codes, scales and arithmetic per output channel); a
weight read by more than one matmul is never merged.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np
from tvm import relax

from .linear_match import LinearUse, match_linear


@dataclasses.dataclass(frozen=True)
class SiblingGroup:
    """Linears reading one input, in graph order; ``name`` is the stacked weight's name."""

    members: tuple[LinearUse, ...]

    @property
    def name(self) -> str:
        return merged_name([use.name for use in self.members])


def sibling_groups(func: relax.Function) -> list[SiblingGroup]:
    """The groups of two or more linears of ``func`` that read the same variable, in graph order."""
    var2val = relax.analysis.get_var2val(func)
    weights = {p.name for p in func.params[int(func.attrs["num_input"]):]}
    by_input: dict = collections.defaultdict(list)
    uses: collections.Counter = collections.Counter()

    def visit(expr):
        if isinstance(expr, relax.Call):
            use = match_linear(expr, var2val, weights)
            if use is not None:
                uses[use.name] += 1
                if isinstance(expr.args[0], relax.Var):
                    by_input[expr.args[0]].append(use)

    relax.analysis.post_order_visit(func.body, visit)
    groups = []
    for members in by_input.values():
        members = [use for use in members if uses[use.name] == 1]
        if len(members) > 1 and len({use.transposed for use in members}) == 1:
            groups.append(SiblingGroup(tuple(members)))
    return groups


def merged_name(names: list[str]) -> str:
    """One readable name for stacked weights: ``a.b.q_proj.weight`` + ``a.b.k_proj.weight`` ->
    ``a.b.q_proj+k_proj.weight`` (the common dotted prefix and suffix kept once)."""
    parts = [name.split(".") for name in names]
    prefix = os.path.commonprefix(parts)
    suffix = os.path.commonprefix([p[len(prefix):][::-1] for p in parts])[::-1]
    middles = [".".join(p[len(prefix):len(p) - len(suffix)]) for p in parts]
    if any(not m for m in middles):
        return "+".join(names)
    return ".".join([*prefix, "+".join(middles), *suffix])


def stack_packed(entries: list, shared_tensors: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The members' packed tensors stacked along the column tiles (axis 0), or ``None`` when the
    group cannot be merged (see the module docstring); ``entries`` are
    :class:`~lowbit.passes.quantize_linears.PackedLinear`\\ s."""
    first = entries[0]
    for entry in entries:
        if (type(entry.scheme) is not type(first.scheme) or entry.fmt != first.fmt or entry.layout != first.layout
                or entry.k != first.k or entry.n % entry.layout.tile or entry.tensors.keys() != first.tensors.keys()):
            return None
    stacked = {}
    for suffix in first.tensors:
        arrays = [entry.tensors[suffix] for entry in entries]
        if suffix in shared_tensors:
            if not all(np.array_equal(arrays[0], array) for array in arrays[1:]):
                return None
            stacked[suffix] = arrays[0]
        else:
            stacked[suffix] = np.concatenate(arrays, axis=0)
    return stacked
