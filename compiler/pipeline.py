"""The ordered passes from an imported model to a quantized Relax module ready for codegen.

Order, each step optional per recipe:

1. Layer selection, on the float model: ``ignore`` patterns stay float, ``keep`` patterns and the
   ``keep=autoN`` most sensitive layers (:mod:`lowbit.passes.sensitivity`, as ``lowbit analyze``
   ranks them) become int8 per-channel RTN.
2. SmoothQuant smoothing (:mod:`lowbit.passes.smoothquant`) and AWQ scaling and clipping
   (:mod:`lowbit.passes.awq`, for ``awq`` and ``awq-gptq``): parameter transforms that fold
   per-channel scales into the previous op; they rescale the calibration statistics they change,
   so later steps see the new inputs (GPTQ's Hessians included).
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

from .calibration import Calibration
from .errors import LowbitError
from .model_ir import ENTRY_FUNCTIONS, ModelIR, sync_params


@dataclasses.dataclass
class PipelineResult:
    ir: ModelIR
    layers: dict[str, str]  # weight name -> format and reason
    kept: list[str]  # layers kept in int8 by the recipe's keep option, most sensitive first


def run_pipeline(ir: ModelIR, recipe, chip, calibration: Calibration | None = None, progress=None) -> PipelineResult:
    """Apply ``recipe`` to ``ir`` for ``chip``; returns a new :class:`ModelIR` and a per-layer report.

    ``calibration`` feeds the methods that need it; its statistics are changed in place by
    smoothing and by GPTQ's stages (give each run a :meth:`Calibration.copy`). GPTQ in stages
    needs its ``recalibrate``; ``keep=autoN`` ranks by its ``output_kl`` where given. ``progress``
    (a tqdm bar) advances once per weight quantized. ``ir`` itself is not changed.
    """
    params = dict(ir.params)
    prefill = ir.mod["prefill"]
    linears = check_layer_patterns(recipe, ir)
    if recipe.needs_calibration and calibration is None:
        raise LowbitError(f"recipe {recipe.name} needs calibration statistics")
    statistics = None if calibration is None else calibration.statistics
    kept = _kept_layers(recipe, linears, params, calibration)
    notes: dict[str, str] = {}
    if recipe.smoothing is not None:
        from lowbit.passes.smoothquant import apply_smoothquant

        notes.update(apply_smoothquant(prefill, params, statistics, recipe.smoothing.alpha,
                                       recipe.activations.granularity))
    if recipe.weights is not None and recipe.weights.scales_by_awq:
        from lowbit.passes.awq import apply_awq

        notes.update(apply_awq(prefill, params, statistics, recipe.weights))
    quantize = QuantizeWeights(recipe, params, tile=chip.linear_tile, statistics=statistics, kept=kept,
                               progress=progress)
    if recipe.weights is not None and recipe.weights.stages > 1:
        if calibration.recalibrate is None:
            raise LowbitError(f"recipe {recipe.name}: GPTQ in stages needs to run calibration again, "
                              "and this calibration cannot")
        _quantize_in_stages(quantize, linears, params, statistics, calibration.recalibrate, recipe.weights.stages)
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


def check_layer_patterns(recipe, ir: ModelIR) -> dict:
    """Raise if a recipe's ``ignore`` / ``keep`` pattern matches no linear layer of ``ir`` or
    ``keep=autoN`` asks for more layers than there are; returns the linear layers."""
    linears = find_linears(ir.mod["prefill"])
    if recipe.keep.auto > len(linears):
        raise LowbitError(f"recipe {recipe.name}: keep=auto{recipe.keep.auto} asks for more layers than the "
                          f"model's {len(linears)} linear layers")
    for option, patterns in (("ignore", recipe.ignore), ("keep", recipe.keep.patterns)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in linears):
                examples = ", ".join(list(linears)[:3])
                raise LowbitError(f"recipe {recipe.name}: {option} pattern {pattern!r} matches no linear layer "
                                  f"(layers are named like {examples})")
    return linears


def _kept_layers(recipe, linears, params, calibration) -> list[str]:
    """Layers ``keep`` names, then the ``keep=autoN`` most sensitive others as ``lowbit analyze``
    ranks them: on the float model, before smoothing or AWQ change it."""
    kept = [name for name in linears if recipe.is_kept(name)]
    if recipe.keep.auto:
        from lowbit.passes.sensitivity import rank_layers

        ranking = rank_layers(linears, params, calibration.statistics, recipe, calibration.output_kl)
        kept += [entry.layer for entry in ranking if entry.layer not in kept][: recipe.keep.auto]
    return kept
