"""Lower a Relax module with lowbit kernels to a runnable library for a chip target.

The pipeline is TVM's CPU pipeline with one step added after fusion: lowbit's linear kernels are
scheduled by the target's own rule (they are marked opaque, so fusion leaves them whole); the
attention products get :class:`lowbit.targets.cpu_rules.BatchMatmul`, and the remaining generated
kernels (norms, softmax, elementwise) dlight's CPU rules where they apply.
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx

from lowbit.compiler.errors import LowbitError

from .kernels import GEMV_ATTR, KERNEL_ATTR


def schedule_kernels(chip) -> tvm.transform.Pass:
    """Schedule every PrimFunc tagged ``lowbit.kernel`` with ``chip.schedule_linear``."""

    @tvm.transform.module_pass(opt_level=0, name="lowbit.ScheduleKernels")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gvar, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc) or KERNEL_ATTR not in func.attrs:
                continue
            sch = s_tir.Schedule(func)
            chip.schedule_linear(sch, bool(func.attrs[GEMV_ATTR]), chip.linear_tile)
            mod[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        return mod

    return _pass


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


def _cpu_fallback_rules():
    from tvm.s_tir import dlight

    from lowbit.targets.cpu_rules import BatchMatmul

    return dlight.ApplyDefaultSchedule(BatchMatmul(), dlight.cpu.GEMV(), dlight.cpu.Reduction())


def _legalize_and_fuse(target):
    return [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        keep_unfusable_calls_apart,
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def relax_pipeline(chip) -> tvm.transform.Pass:
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    target = chip.tvm()

    @tvm.transform.module_pass(opt_level=0, name="lowbit.Pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            passes = (
                cpu_generic.library_dispatch_passes(target)
                + _legalize_and_fuse(target)
                + [schedule_kernels(chip), _cpu_fallback_rules()]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def build(mod: tvm.IRModule, chip):
    """Compile ``mod`` for ``chip``; returns a ``tvm.runtime.Executable``."""
    if chip.family == "cuda" or chip.schedule_linear is None:
        raise LowbitError(
            f"target {chip.name}: lowbit has no schedule rules for {chip.family} kernels yet; "
            "compile for an x86 or ARM target (see `lowbit targets`)"
        )
    return tvm.compile(mod, target=chip.tvm(), relax_pipeline=relax_pipeline(chip))
