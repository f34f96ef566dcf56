"""Instrument a Relax function so that it returns the input activations of every linear layer.

Requires: an entry function of a :class:`~lowbit.passes.model_ir.ModelIR` (``num_input``
attribute, weights as named trailing parameters), before weight quantization.

Guarantees: a new function ``calibrate`` with the same parameters that returns, for each distinct
activation feeding one or more linear layers (q/k/v share one), that activation as ``[tokens, K]``,
and no logits: dead code elimination then drops what only the logits needed (the final ``lm_head``
matmul). ``sites`` lists, per returned tensor, the weight names that read it. The caller reduces
each call's activations to running statistics (``X^T X``, per-channel max and mean ``|x|``) with
BLAS and drops them, so memory stays at one sample's activations. One mechanism for both frontends:
the activations come out of the compiled graph, never from framework hooks.
"""

from __future__ import annotations

import dataclasses

import tvm
from tvm import relax

from .linear_match import match_linear


@dataclasses.dataclass
class CalibrationSite:
    weights: list[str]
    width: int


def instrument_linear_inputs(func: relax.Function) -> tuple[relax.Function, list[CalibrationSite]]:
    """Return ``(calibrate_func, sites)``; see the module docstring."""
    func = relax.transform.ToNonDataflow()(tvm.IRModule({"f": func}))["f"]
    collector = _SiteCollector(func)
    collector.visit_expr(func.body)
    sites = list(collector.sites.values())
    bb = relax.BlockBuilder()
    with bb.function("calibrate", list(func.params), attrs={"num_input": func.attrs["num_input"]}, pure=True):
        outputs = []
        for block in func.body.blocks:
            for binding in block.bindings:
                bb.emit_normalized(binding)
        for var in collector.sites:
            outputs.append(_rows(bb, var))
        bb.emit_func_output(relax.Tuple(outputs))
    calibrate = bb.finalize()["calibrate"]
    return calibrate, sites


@relax.expr_functor.visitor
class _SiteCollector(relax.PyExprVisitor):
    def __init__(self, func):
        super().__init__()
        self.var2val = relax.analysis.get_var2val(func)
        self.weights = {p.name for p in func.params[int(func.attrs["num_input"]):]}
        self.sites: dict = {}

    def visit_call_(self, call):  # noqa: D401 - TVM visitor hook
        use = match_linear(call, self.var2val, self.weights)
        if use is not None:
            x = call.args[0]
            width = int(x.ty.shape[-1])
            self.sites.setdefault(x, CalibrationSite([], width)).weights.append(use.name)
        super().visit_call_(call)


def _rows(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
    return bb.emit(relax.op.reshape(x, relax.ShapeExpr([-1, x.ty.shape[-1]])))
