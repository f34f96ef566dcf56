"""The CPU families' lowering pipeline and the build driver: Relax with lowbit kernels -> a library.

:func:`cpu_pipeline` is TVM's CPU pipeline (library dispatch, legalization, fusion, dataflow
lowering, finalization) with common subexpressions merged first (an imported graph recomputes what
every layer shares, e.g. the attention mask and the rotary tables, once per layer: 30 ``where``
kernels over the whole context per token in SmolLM2's decode), fast polynomial exponentials before
legalization (:mod:`lowbit.targets.fast_math`) and one scheduling step after fusion: ``dlight.ApplyDefaultSchedule`` with
the target's own rules first (lowbit's linear kernels, marked opaque so fusion leaves them whole,
and the attention products; see :mod:`lowbit.targets.simd`), then dlight's generic CPU rules for
the remaining generated kernels (norms, softmax, elementwise). A family whose targets have no rules
(CUDA today) has no pipeline, and :func:`build` refuses it.
"""

from __future__ import annotations

import tvm
from tvm import relax

from lowbit.codegen.errors import LowbitError

from .fast_math import fast_math_passes


@tvm.transform.module_pass(opt_level=0, name="lowbit.KeepUnfusableCallsApart")
def keep_unfusable_calls_apart(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Mark as opaque (unfusable) the PrimFuncs that FuseTIR cannot merge into a fused function.

    TVM 0.27's FuseTIR fails in RenewDefs when a fused callee takes a scalar argument (e.g. the
    ``arange`` that starts the rotary positions at the symbolic past length) or gets one tensor
    bound to two parameters (the rotary ``concat((freqs, freqs))``). Run after AnnotateTIROpPattern
    and before FuseOps; such kernels are still generated, just not fused with their neighbours.
    """
    call_tir = tvm.ir.Op.get("relax.call_tir")
    unfusable: set = set()

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            args = list(expr.args[1].fields)
            scalar = any(not isinstance(a.ty, relax.TensorType) for a in args)
            aliased = len({a.__hash__() for a in args}) < len(args)
            if scalar or aliased:
                unfusable.add(expr.args[0])

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    for gvar in unfusable:
        mod[gvar] = mod[gvar].with_attr("op_pattern", 8)
    return mod


def cpu_pipeline(chip) -> tvm.transform.Pass:
    """The Relax pipeline for a CPU target ``chip`` (x86, ARM); see the module docstring."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight

    target = chip.tvm()

    @tvm.transform.module_pass(opt_level=0, name="lowbit.CPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            passes = (
                [relax.transform.EliminateCommonSubexpr()]
                + cpu_generic.library_dispatch_passes(target)
                + fast_math_passes()
                + [
                    relax.transform.LegalizeOps(),
                    relax.transform.AnnotateTIROpPattern(),
                    keep_unfusable_calls_apart,
                    relax.transform.FoldConstant(),
                    relax.transform.FuseOps(),
                    relax.transform.FuseTIR(),
                    dlight.ApplyDefaultSchedule(*chip.rules, dlight.cpu.GEMV(), dlight.cpu.Reduction()),
                ]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def schedule(func, chip):
    """``func`` (a PrimFunc) scheduled by the first of ``chip``'s rules that takes it, as the pipeline
    would schedule it (for kernel tests and benchmarks); raises if none does."""
    for rule in chip.rules:
        sch = rule.apply(func, chip.tvm(), False)
        if sch is not None:
            return sch
    raise ValueError(f"no schedule rule of target {chip.name} applies to this function")


def build(mod: tvm.IRModule, chip):
    """Compile ``mod`` for ``chip`` with its family's pipeline; returns a ``tvm.runtime.Executable``."""
    if not chip.can_build:
        raise LowbitError(
            f"target {chip.name}: lowbit has no schedule rules for {chip.family} kernels yet; "
            "compile for an x86 or ARM target (see `lowbit targets`)"
        )
    return tvm.compile(mod, target=chip.tvm(), relax_pipeline=chip.pipeline(chip))
