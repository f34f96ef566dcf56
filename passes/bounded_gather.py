"""Make every gather (``relax.take``) clip its indices into range instead of trusting them.

Frontends import embedding lookups and position-table reads as ``take`` in TVM's ``fast`` mode,
whose kernels read out of bounds (and crash the process) on an index past the table; TVM warns
about it on every build. The runtime checks token ids at the API boundary, so indices are in range
there; clipping makes the kernels safe whatever reaches them, for one ``min``/``max`` per index.

Requires: a Relax module. Guarantees: the same module with every ``take`` in ``clip`` mode; results
are unchanged for in-range indices.
"""

from __future__ import annotations

import tvm
from tvm import relax

_TAKE = tvm.ir.Op.get("relax.take")


@relax.expr_functor.mutator
class _ClipTake(relax.PyExprMutator):
    def visit_call_(self, call):  # noqa: D401 - TVM visitor hook
        call = super().visit_call_(call)
        if isinstance(call, relax.Call) and call.op.same_as(_TAKE) and call.attrs.mode != "clip":
            axis = None if call.attrs.axis is None else int(call.attrs.axis)
            return relax.op.take(call.args[0], call.args[1], axis, mode="clip")
        return call


@tvm.transform.module_pass(opt_level=0, name="lowbit.BoundedGather")
def bounded_gather(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gvar] = _ClipTake().visit_expr(func)
    return mod
