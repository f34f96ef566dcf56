"""Fast nonlinearities for the CPU pipeline: exponentials as polynomials LLVM vectorizes.

LLVM lowers a float ``exp`` to a call of libm's ``expf`` per element, even in a vectorized loop; a
prompt's softmax and SiLU then spend most of their time in those calls (measured on SmolLM2-135M,
64-token prompt, 2 threads: 14 of 115 ms in ``softmax`` and ``silu * up``). TVM's
``FastMathTransform`` replaces ``softmax``, ``exp``, ``erf`` and ``tanh`` by topi's polynomial
versions; :func:`fast_sigmoid` does the same for the two it leaves, ``sigmoid`` and ``silu``, as
``1 / (1 + fast_exp(-x))`` (times ``x`` for SiLU). ``fast_exp``'s relative error is below 1e-6 on
float32's range (its input clamped to +-88.38, where ``exp`` overflows anyway).

Requires: a Relax module before legalization (the ops still ``relax.*`` calls). Guarantees: every
float ``softmax``, ``exp``, ``erf``, ``tanh``, ``sigmoid`` and ``silu`` call becomes a ``call_tir``
of a TE function without libm calls; other calls, and integer tensors, are untouched.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, topi

_FLOATS = ("float32", "float16", "bfloat16")


def _sigmoid(x: te.Tensor) -> te.Tensor:
    negated = te.compute(x.shape, lambda *i: -x(*i), "negated")
    exp = topi.fast_exp(negated)
    one = tvm.tirx.const(1, x.dtype)
    return te.compute(x.shape, lambda *i: one / (one + exp(*i)), "sigmoid")


def _silu(x: te.Tensor) -> te.Tensor:
    sigmoid = _sigmoid(x)
    return te.compute(x.shape, lambda *i: x(*i) * sigmoid(*i), "silu")


_REPLACEMENTS = {"relax.sigmoid": _sigmoid, "relax.nn.silu": _silu}


@relax.expr_functor.mutator
class _FastSigmoid(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or call.op.name not in _REPLACEMENTS:
            return call
        ty = call.args[0].ty
        if not isinstance(ty, relax.TensorType) or str(ty.dtype) not in _FLOATS:
            return call
        return self.builder_.call_te(_REPLACEMENTS[call.op.name], call.args[0])


@tvm.transform.module_pass(opt_level=0, name="lowbit.FastSigmoid")
def fast_sigmoid(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``mod`` with float ``sigmoid`` and ``silu`` calls as fast-exp TE functions (see the module docstring)."""
    mutator = _FastSigmoid(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get()


def fast_math_passes() -> list:
    """The passes that make a module's exponentials fast, in order: TVM's, then :func:`fast_sigmoid`."""
    return [relax.transform.FastMathTransform(), fast_sigmoid]
