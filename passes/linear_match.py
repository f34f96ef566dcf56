"""Find linear layers in a Relax function: ``matmul`` whose right operand is a weight parameter.

Two spellings occur: the torch frontend gives ``matmul(x, permute_dims(W))`` with ``W[N, K]``; ONNX
exports give ``matmul(x, W)`` with a pre-transposed ``W[K, N]``. Both are recognized from the graph
alone (the operand is a 2-D function parameter holding a weight), never from layer names.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import relax


@dataclasses.dataclass(frozen=True)
class LinearUse:
    """A matmul that reads weight ``name``; ``transposed`` means the weight is stored ``[N, K]``."""

    name: str
    transposed: bool


def _op_name(expr) -> str | None:
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return expr.op.name
    return None


def match_linear(call: relax.Call, var2val, weight_names: set[str]) -> LinearUse | None:
    """Return the weight a ``relax.matmul`` call reads, or ``None`` if it is not a linear layer."""
    if _op_name(call) != "relax.matmul":
        return None
    rhs = call.args[1]
    transposed = False
    bound = var2val.get(rhs) if isinstance(rhs, relax.Var) else None
    if _op_name(bound) == "relax.permute_dims":
        axes = bound.attrs.axes
        if axes is not None and [int(a) for a in axes] != [1, 0]:
            return None
        rhs, transposed = bound.args[0], True
    if not isinstance(rhs, relax.Var) or rhs.name not in weight_names:
        return None
    if len(rhs.ty.shape) != 2:
        return None
    return LinearUse(name=rhs.name, transposed=transposed)


def find_linears(func: relax.Function) -> dict[str, LinearUse]:
    """Every linear layer of an entry function (``num_input`` attribute), by weight name, in graph order."""
    var2val = relax.analysis.get_var2val(func)
    weights = {p.name for p in func.params[int(func.attrs["num_input"]):]}
    found: dict[str, LinearUse] = {}

    def visit(expr):
        if isinstance(expr, relax.Call):
            use = match_linear(expr, var2val, weights)
            if use is not None:
                found.setdefault(use.name, use)

    relax.analysis.post_order_visit(func.body, visit)
    return found


@dataclasses.dataclass(frozen=True)
class ExpertTable:
    """A 3-D weight ``name`` whose ``take(W, experts, axis=0)`` feeds batched matmuls: a mixture of
    experts' per-expert linear layers, gathered per token. ``rows_first``: stored ``[E, N, K]``
    (the gathered matrices are matmul's left operand, ``W_e @ x``); else ``[E, K, N]`` (``x @ W_e``)."""

    name: str
    rows_first: bool


def find_expert_tables(func: relax.Function) -> dict[str, ExpertTable]:
    """Every 3-D weight parameter read only through ``take(..., axis=0)`` whose results are read only
    by ``matmul``, each time as the same operand; by name. The orientation comes from that operand."""
    weights = {p.name for p in func.params[int(func.attrs["num_input"]):] if len(p.ty.shape) == 3}
    gathered: dict[relax.Var, str] = {}  # take's output -> the table it reads
    operands: dict[str, set] = {}  # table -> how its gathered matrices are used
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if not isinstance(value, relax.Call):
                continue
            table = value.args[0] if _op_name(value) == "relax.take" else None
            if isinstance(table, relax.Var) and table.name in weights:
                gathered[binding.var] = table.name
                if value.attrs.axis is None or int(value.attrs.axis) != 0:
                    operands.setdefault(table.name, set()).add("other")
                continue
            for position, arg in enumerate(value.args):
                if isinstance(arg, relax.Var) and (arg in gathered or arg.name in weights):
                    table = gathered.get(arg, arg.name)
                    use = position if _op_name(value) == "relax.matmul" and arg in gathered else "other"
                    operands.setdefault(table, set()).add(use)
    return {name: ExpertTable(name, rows_first=uses == {0}) for name, uses in operands.items()
            if uses in ({0}, {1})}
