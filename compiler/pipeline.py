"""The ordered passes from an imported model to a quantized Relax module ready for codegen.

Order, each step optional per recipe:

1. SmoothQuant smoothing (:mod:`lowbit.passes.smoothquant`) and AWQ scaling and clipping
   (:mod:`lowbit.passes.awq`, for ``awq`` and ``awq-gptq``): parameter transforms that fold
   per-channel scales into the previous op; they rescale the calibration statistics they change,
   so later steps see the new inputs (GPTQ's Hessians included).
2. Layer selection: ``ignore`` patterns stay float, ``keep`` patterns and the ``keep=autoN`` most
   sensitive layers (:mod:`lowbit.passes.sensitivity`) become int8 per-channel RTN.
3. GPTQ in stages (recipe option ``stages``): the linear layers, in graph order, are quantized
   stage by stage; before each stage after the first the calibration is run again with every
   earlier layer replaced by the float weight its codes stand for, so a layer's Hessian comes
   from the inputs it will see in the quantized model (GPTQ's sequential mode, at the cost of
   one calibration pass per stage).
4. Weight (and activation) quantization (:class:`~lowbit.passes.quantize_weights.QuantizeWeights`)
   -> dead code elimination -> parameter sync (every entry function takes exactly the live weights).
"""

from __future__ import annotations

import dataclasses
import fnmatch

from tvm import relax

from lowbit.passes.linear_match import find_linears
from lowbit.passes.quantize_weights import QuantizeWeights

from .errors import LowbitError
from .model_ir import ENTRY_FUNCTIONS, ModelIR, sync_params


@dataclasses.dataclass
class PipelineResult:
    ir: ModelIR
    layers: dict[str, str]  # weight name -> format and reason
    kept: list[str]  # layers kept in int8 by the recipe's keep option, most sensitive first


def run_pipeline(ir: ModelIR, recipe, chip, statistics=None, progress=None, recalibrate=None) -> PipelineResult:
    """Apply ``recipe`` to ``ir`` for ``chip``; returns a new :class:`ModelIR` and a per-layer report.

    ``statistics`` (from :meth:`lowbit.compiler.calibration.Calibrator.collect`) feeds the methods
    that need calibration; it is changed in place by smoothing and by GPTQ's stages.
    ``recalibrate(params, layers)`` (e.g. ``Calibrator.collect``) is needed by GPTQ recipes with
    more than one stage. ``progress`` (a tqdm bar) advances once per weight quantized. ``ir``
    itself is not changed.
    """
    params = dict(ir.params)
    prefill = ir.mod["prefill"]
    linears = find_linears(prefill)
    _check_patterns(recipe, linears)
    if recipe.needs_calibration and statistics is None:
        raise LowbitError(f"recipe {recipe.name} needs calibration statistics")
    notes: dict[str, str] = {}
    if recipe.smoothing is not None:
        from lowbit.passes.smoothquant import apply_smoothquant

        notes.update(apply_smoothquant(prefill, params, statistics, recipe.smoothing.alpha,
                                       recipe.activations.granularity))
    if recipe.weights is not None and recipe.weights.scales_by_awq:
        from lowbit.passes.awq import apply_awq

        notes.update(apply_awq(prefill, params, statistics, recipe.weights))
    kept = _kept_layers(recipe, linears, params, statistics)
    quantize = QuantizeWeights(recipe, params, tile=chip.linear_tile, statistics=statistics, kept=kept,
                               progress=progress)
    if recipe.weights is not None and recipe.weights.stages > 1:
        if recalibrate is None:
            raise LowbitError(f"recipe {recipe.name}: GPTQ in stages needs to run calibration again; "
                              "pass recalibrate")
        _quantize_in_stages(quantize, linears, params, statistics, recalibrate, recipe.weights.stages)
    mod = quantize(ir.mod)
    mod = relax.transform.DeadCodeElimination(list(ENTRY_FUNCTIONS))(mod)
    mod, params = sync_params(mod, params)
    layers = {name: f"{fmt}; {notes[name]}" if name in notes else fmt for name, fmt in quantize.report.items()}
    return PipelineResult(dataclasses.replace(ir, mod=mod, params=params), layers, kept)


def _quantize_in_stages(quantize: QuantizeWeights, linears, params, statistics, recalibrate, stages: int) -> None:
    """Quantize ``linears`` in ``stages`` contiguous runs of graph order, recalibrating before each
    run after the first with the runs so far replaced by their dequantized weights."""
    names = list(linears)
    bounds = [round(i * len(names) / stages) for i in range(stages + 1)]
    simulated = dict(params)  # the float weights, with the quantized layers' codes dequantized
    for index in range(stages):
        stage = names[bounds[index]:bounds[index + 1]]
        if index > 0 and stage:
            statistics.update(recalibrate(simulated, stage))
        for name in stage:
            use = linears[name]
            packed = quantize.packed(name, use.transposed)
            if packed.quantized is not None:
                weight = packed.quantized.dequantize()
                simulated[name] = weight if use.transposed else weight.T.copy()


def _check_patterns(recipe, linears) -> None:
    for option, patterns in (("ignore", recipe.ignore), ("keep", recipe.keep.patterns)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in linears):
                examples = ", ".join(list(linears)[:3])
                raise LowbitError(f"recipe {recipe.name}: {option} pattern {pattern!r} matches no linear layer "
                                  f"(layers are named like {examples})")


def _kept_layers(recipe, linears, params, statistics) -> list[str]:
    kept = [name for name in linears if recipe.is_kept(name)]
    if recipe.keep.auto:
        from lowbit.passes.sensitivity import rank_layers

        ranked = [entry.layer for entry in rank_layers(linears, params, statistics, recipe) if entry.layer not in kept]
        kept += ranked[: recipe.keep.auto]
    return kept
