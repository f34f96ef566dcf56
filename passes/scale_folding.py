"""Where a per-input-channel scale can be folded away: the smoothing groups of a model.

A *smoothing group* is the set of linear layers that read one same activation ``X`` (q/k/v after a
norm; gate/up; down after ``silu(gate) * up``). Scaling ``X`` by ``1 / s`` per channel and the
group's weights by ``s`` per input channel leaves every output unchanged; it costs nothing at run
time when ``1 / s`` can be folded into the op that produces ``X``. The *fold target* is found from
the dataflow graph (a networkx view of the entry function's bindings), never from names:

* ``norm``: ``X = multiply(h, gamma)`` with ``gamma`` a 1-D weight parameter of width ``K`` read by
  nothing else (the weight of an RMSNorm/LayerNorm): ``gamma /= s``.
* ``linear``: ``X = multiply(a, y)`` (or ``X = y``) where ``y`` is, possibly through reshapes, the
  output of a linear layer whose output and weight have no other reader: that layer's output
  channels ``/= s``.
* anything else (attention output, a norm weight shared, a multiply by a non-linear term on both
  sides, a group weight read elsewhere such as a tied embedding): no target; not smoothable.

Requires: an entry function of a :class:`~lowbit.compiler.model_ir.ModelIR`, before quantization.
Guarantees: :func:`fold_scales` changes only parameters, and the function computes the same outputs
up to float rounding.
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import numpy as np
from tvm import relax

from .linear_match import LinearUse, _op_name, match_linear

_PASS_THROUGH = ("relax.reshape", "relax.astype")


@dataclasses.dataclass(frozen=True)
class FoldTarget:
    kind: str  # "norm" or "linear"
    name: str  # the parameter that absorbs 1 / s
    transposed: bool = True  # linear targets: weight stored [N, K] (True) or [K, N]


@dataclasses.dataclass(frozen=True)
class SmoothingGroup:
    linears: tuple[LinearUse, ...]  # the layers reading X
    width: int  # K, the channels of X
    target: FoldTarget | None  # where 1 / s goes; None if the group cannot be smoothed


def dataflow_graph(func: relax.Function) -> nx.DiGraph:
    """Nodes: the function's parameters and bound variables (``op`` attribute: the producing op);
    edges: variable -> the variable bound to a call that reads it."""
    graph = nx.DiGraph()
    for param in func.params:
        graph.add_node(param, op="param")
    for var, value in relax.analysis.get_var2val(func).items():
        graph.add_node(var, op=_op_name(value) or type(value).__name__)
        if isinstance(value, relax.Call):
            for arg in value.args:
                if isinstance(arg, relax.Var):
                    graph.add_edge(arg, var)
    return graph


def find_smoothing_groups(func: relax.Function) -> list[SmoothingGroup]:
    """Every activation read by linear layers, its layers and its fold target (see module docstring)."""
    var2val = relax.analysis.get_var2val(func)
    weights = {p.name: p for p in func.params[int(func.attrs["num_input"]):]}
    graph = dataflow_graph(func)
    readers: dict = {}
    for var, value in var2val.items():
        if isinstance(value, relax.Call):
            use = match_linear(value, var2val, set(weights))
            if use is not None:
                readers.setdefault(value.args[0], []).append((use, var))
    linear_of_output = {out: use for uses in readers.values() for use, out in uses}
    groups = []
    for x, uses in readers.items():
        width = int(x.ty.shape[-1])
        target = None
        if all(_single_reader(graph, weights[use.name]) for use, _ in uses):  # e.g. not a tied embedding
            target = _fold_target(x, width, var2val, weights, graph, linear_of_output)
        groups.append(SmoothingGroup(tuple(use for use, _ in uses), width, target))
    return groups


def _single_reader(graph: nx.DiGraph, var) -> bool:
    return graph.out_degree(var) == 1


def _fold_target(x, width, var2val, weights, graph, linear_of_output) -> FoldTarget | None:
    value = var2val.get(x)
    if _op_name(value) != "relax.multiply":
        return _linear_target(x, var2val, weights, graph, linear_of_output)
    for own, other in (value.args, value.args[::-1]):
        param = weights.get(getattr(own, "name", None))
        if param is not None and own.same_as(param) and len(param.ty.shape) == 1:
            if int(param.ty.shape[0]) == width and _single_reader(graph, param):
                return FoldTarget("norm", param.name)
    for operand in value.args:
        target = _linear_target(operand, var2val, weights, graph, linear_of_output)
        if target is not None:
            return target
    return None


def _linear_target(var, var2val, weights, graph, linear_of_output) -> FoldTarget | None:
    """``var`` is (reshapes of) a linear layer's output, read only along this path."""
    while isinstance(var, relax.Var) and _single_reader(graph, var):
        if var in linear_of_output:
            use = linear_of_output[var]
            return FoldTarget("linear", use.name, use.transposed) if _single_reader(graph, weights[use.name]) else None
        value = var2val.get(var)
        if _op_name(value) not in _PASS_THROUGH:
            return None
        var = value.args[0]
    return None


def weight_nk(params: dict[str, np.ndarray], use: LinearUse) -> np.ndarray:
    """A linear layer's weight in ``[N, K]`` layout, float32."""
    return np.asarray(params[use.name] if use.transposed else params[use.name].T, np.float32)


def fold_scales(params: dict[str, np.ndarray], group: SmoothingGroup, s: np.ndarray) -> None:
    """``X' = X / s``: the target absorbs ``1 / s``, the group's weights ``s`` (new float32 arrays)."""
    if group.target is None:
        raise ValueError("fold_scales: the group has no fold target")
    s = s.astype(np.float32)
    target = group.target
    if target.kind == "norm":
        params[target.name] = (params[target.name] / s).astype(np.float32)
    elif target.transposed:  # [N, K]: output channels are rows
        params[target.name] = (params[target.name] / s[:, None]).astype(np.float32)
    else:
        params[target.name] = (params[target.name] / s[None, :]).astype(np.float32)
    for use in group.linears:
        weight = params[use.name]
        params[use.name] = (weight * s[None, :] if use.transposed else weight * s[:, None]).astype(np.float32)


def rescale_statistics(statistics, s: np.ndarray) -> None:
    """Statistics of ``X`` -> statistics of ``X / s`` (in place)."""
    s64 = s.astype(np.float64)
    statistics.xtx /= np.outer(s64, s64)
    statistics.heldout_xtx /= np.outer(s64, s64)
    statistics.absmax = (statistics.absmax / s).astype(np.float32)
    statistics.abssum /= s64
    statistics.sample = (statistics.sample / s).astype(np.float32)
