"""The pipeline: an ordered list of steps from an imported model to a quantized Relax module.

:func:`build_steps` makes the list from a recipe; each :class:`Step` says what it requires, what it
guarantees and whether it needs calibration (``lowbit compile --explain`` prints them). In order,
each present only when the recipe asks for it:

1. :class:`KeepLayers`: ``keep`` patterns and the ``keep=autoN`` most sensitive layers
   (:mod:`lowbit.passes.sensitivity`, as ``lowbit analyze`` ranks them, on the float model) are
   kept in int8.
2. :class:`SmoothActivations` (SmoothQuant) and :class:`ScaleForWeights` (AWQ's scaling and
   clipping): parameter transforms that fold per-channel scales into the previous op and return
   the statistics of the new inputs, so later steps (GPTQ's Hessians) see them.
3. :class:`RoundInStages` (GPTQ's ``stages``): the linear layers, in graph order, are rounded stage
   by stage; each stage after the first is calibrated again with every earlier layer replaced by
   the float weight its codes stand for.
4. :class:`QuantizeLinears`: every linear becomes its scheme's kernel call.
5. :class:`CacheInPlace` (every recipe): the KV cache becomes a preallocated one written in place,
   stored as the recipe's KV scheme says (float, ``+kv8``, ``+kv4``), decode's attention one kernel
   over it (:mod:`lowbit.passes.kv_cache`).
6. :class:`LastPositionEntry` (every recipe): ``prefill_last``, the prompt entry that runs the
   output head on the last position only (:mod:`lowbit.passes.last_position`).
7. :class:`Finalize`: dead code elimination and parameter sync (every entry function takes exactly
   the live weights).

Steps never change the caller's :class:`ModelIR`, params or statistics: each returns a new state.
"""

from __future__ import annotations

import dataclasses
import fnmatch

from tvm import relax

from lowbit.codegen.entry_points import ENTRY_FUNCTIONS
from lowbit.codegen.errors import LowbitError
from lowbit.passes.awq import apply_awq
from lowbit.passes.kv_cache import cache_in_place
from lowbit.passes.linear_match import LinearUse, find_linears
from lowbit.passes.last_position import add_last_position_entry
from lowbit.passes.model_ir import ModelIR, sync_params
from lowbit.passes.quantize_linears import PackedLinear, QuantizeLinears, pack_linear
from lowbit.passes.recipe import Recipe
from lowbit.passes.schemes import kv_scheme, linear_scheme
from lowbit.passes.sensitivity import rank_layers
from lowbit.passes.smoothquant import apply_smoothquant

from .calibration import Calibration


@dataclasses.dataclass(frozen=True)
class PipelineState:
    """What flows from step to step: the model, the statistics of its linear inputs, the layers
    kept in int8, weights already packed (by GPTQ's stages) and a note per layer."""

    ir: ModelIR
    statistics: dict | None
    kept: tuple[str, ...] = ()
    packed: dict[str, PackedLinear] = dataclasses.field(default_factory=dict)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    layers: dict[str, str] = dataclasses.field(default_factory=dict)  # weight name -> format and reason
    cache: dict = dataclasses.field(default_factory=dict)  # what CacheInPlace did (for the manifest)

    def linears(self) -> dict[str, LinearUse]:
        return find_linears(self.ir.mod["prefill"])

    def with_params(self, params: dict, **changes) -> "PipelineState":
        return dataclasses.replace(self, ir=dataclasses.replace(self.ir, params=params), **changes)


@dataclasses.dataclass(frozen=True)
class PipelineContext:
    """What steps may use besides the state: the recipe, the chip the weights are laid out for,
    the calibration's measurements (run on the host) and a progress bar for quantization."""

    recipe: Recipe
    chip: object
    calibration: Calibration | None = None
    progress: object = None
    merge_siblings: bool = True  # linears reading one input run as one kernel


class Step:
    """One pipeline step; subclasses set the three descriptions and implement :meth:`run`."""

    requires: str
    guarantees: str
    needs_calibration: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def run(self, state: PipelineState, context: PipelineContext) -> PipelineState:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"step": self.name, "requires": self.requires, "guarantees": self.guarantees,
                "needs_calibration": self.needs_calibration}


class KeepLayers(Step):
    requires = "the float model; with keep=autoN, calibration and its output probe"
    guarantees = "the layers keep= names, then the N most sensitive others, are marked to stay in int8"

    def __init__(self, recipe: Recipe):
        self.needs_calibration = recipe.keep.auto > 0

    def run(self, state, context):
        recipe = context.recipe
        linears = state.linears()
        kept = [name for name in linears if recipe.is_kept(name)]
        if recipe.keep.auto:
            ranking = rank_layers(linears, state.ir.params, state.statistics, recipe, context.calibration.output_kl)
            kept += [entry.layer for entry in ranking if entry.layer not in kept][: recipe.keep.auto]
        return dataclasses.replace(state, kept=tuple(kept))


class _ParameterTransform(Step):
    """A step that changes parameters from calibration statistics and returns the new statistics."""

    needs_calibration = True

    def transform(self, func, params: dict, statistics: dict, recipe: Recipe) -> tuple[dict, dict, dict]:
        raise NotImplementedError

    def run(self, state, context):
        params, statistics, notes = self.transform(state.ir.mod["prefill"], state.ir.params, state.statistics,
                                                   context.recipe)
        return state.with_params(params, statistics=statistics, notes=state.notes | notes)


class SmoothActivations(_ParameterTransform):
    requires = "calibration statistics (per-channel max |x|, sampled rows) of the float model"
    guarantees = ("activation outliers moved into the weights by per-channel scales folded into the previous "
                  "op (the float function unchanged); the statistics are those of the smoothed inputs")

    def transform(self, func, params, statistics, recipe):
        return apply_smoothquant(func, params, statistics, recipe.smoothing.alpha, recipe.activations.granularity)


class ScaleForWeights(_ParameterTransform):
    requires = "calibration statistics (mean |x|, X^T X) of the float model"
    guarantees = ("AWQ's per-channel scales folded into the previous op and each weight clipped to the range "
                  "that minimizes its output error on the recipe's grid; the statistics are those of the new inputs")

    def transform(self, func, params, statistics, recipe):
        return apply_awq(func, params, statistics, linear_scheme(recipe.weights).weight_grid)


class RoundInStages(Step):
    requires = "calibration that can run again with other weights (recalibrate)"
    guarantees = ("each later stage's layers rounded by GPTQ on statistics collected with the earlier stages "
                  "quantized")
    needs_calibration = True

    def __init__(self, stages: int):
        self.stages = stages

    def run(self, state, context):
        if context.calibration.recalibrate is None:
            raise LowbitError(f"recipe {context.recipe.name}: GPTQ in stages needs to run calibration again, "
                              "and this calibration cannot")
        linears = state.linears()
        names = list(linears)
        bounds = [round(i * len(names) / self.stages) for i in range(self.stages + 1)]
        params = state.ir.params
        simulated = dict(params)  # the float weights, with the quantized layers' codes dequantized
        statistics, packed = dict(state.statistics), dict(state.packed)
        for index in range(self.stages):
            stage = names[bounds[index]:bounds[index + 1]]
            if index > 0 and stage:
                statistics |= context.calibration.recalibrate(simulated, stage)
            for name in stage:
                use = linears[name]
                weight_nk = params[name] if use.transposed else params[name].T
                entry = pack_linear(weight_nk, context.recipe, name, context.chip, statistics.get(name),
                                    kept=name in state.kept)
                packed[name] = entry
                if entry.quantized is not None:
                    weight = entry.quantized.dequantize()
                    simulated[name] = weight if use.transposed else weight.T.copy()
        return dataclasses.replace(state, statistics=statistics, packed=packed)


class QuantizeLinearLayers(Step):
    requires = "the model after every parameter transform; statistics for GPTQ and static W8A8"

    def __init__(self, recipe: Recipe):
        scheme = linear_scheme(recipe.weights, recipe.activations)
        self.guarantees = (f"every linear layer calls its scheme's kernel ({scheme.name}; int8 for kept layers, "
                           "float for ignored ones) on weights packed in the chip's layout, linears that read one input "
                           "as one kernel on their stacked weights; a report line per layer")
        self.needs_calibration = scheme.needs_statistics or (
            recipe.weights is not None and recipe.weights.rounds_by_gptq)

    def run(self, state, context):
        quantize = QuantizeLinears(context.recipe, state.ir.params, context.chip, state.statistics, state.kept,
                                   context.progress, packed=state.packed, merge_siblings=context.merge_siblings)
        mod = quantize(state.ir.mod)
        layers = {name: f"{fmt}; {state.notes[name]}" if name in state.notes else fmt
                  for name, fmt in quantize.report.items()}
        return dataclasses.replace(state, ir=dataclasses.replace(state.ir, mod=mod, params=quantize.params),
                                   layers=layers)


class CacheInPlace(Step):
    requires = "entry functions with the imported concat-and-return KV cache"
    guarantees = ("entry functions take past_length and preallocated caches (quantized by the recipe's +kv scheme) "
                  "written in place; decode's attention, where recognized in the dataflow graph, one kernel reading "
                  "the caches in place as stored")

    def run(self, state, context):
        scheme = kv_scheme(context.recipe.kv, state.ir.kv)
        ir, summary = cache_in_place(state.ir, scheme)
        return dataclasses.replace(state, ir=ir, cache=summary | scheme.describe())


class LastPositionEntry(Step):
    requires = "prefill with its linear layers as kernel calls"
    guarantees = ("prefill_last: prefill's outputs with the logits of the last position only, the bindings that "
                  "only feed them (found from the dataflow graph: final norm, output head) run on that position")

    def run(self, state, context):
        mod, _ = add_last_position_entry(state.ir.mod)
        return dataclasses.replace(state, ir=dataclasses.replace(state.ir, mod=mod))


class Finalize(Step):
    requires = "the quantized module"
    guarantees = "dead code removed; every entry function takes exactly the weights some entry function reads"

    def run(self, state, context):
        mod = relax.transform.DeadCodeElimination(list(ENTRY_FUNCTIONS))(state.ir.mod)
        mod, params = sync_params(mod, state.ir.params)
        return dataclasses.replace(state, ir=dataclasses.replace(state.ir, mod=mod, params=params))


def build_steps(recipe: Recipe) -> list[Step]:
    """The steps ``recipe`` asks for, in order (see the module docstring)."""
    steps: list[Step] = []
    if recipe.keep.patterns or recipe.keep.auto:
        steps.append(KeepLayers(recipe))
    if recipe.smoothing is not None:
        steps.append(SmoothActivations())
    if recipe.weights is not None and recipe.weights.scales_by_awq:
        steps.append(ScaleForWeights())
    if recipe.weights is not None and recipe.weights.stages > 1:
        steps.append(RoundInStages(recipe.weights.stages))
    return steps + [QuantizeLinearLayers(recipe), CacheInPlace(), LastPositionEntry(), Finalize()]


@dataclasses.dataclass
class PipelineResult:
    ir: ModelIR
    layers: dict[str, str]  # weight name -> format and reason
    kept: list[str]  # layers kept in int8 by the recipe's keep option, most sensitive first
    cache: dict = dataclasses.field(default_factory=dict)  # see CacheInPlace


def run_pipeline(ir: ModelIR, recipe: Recipe, chip, calibration: Calibration | None = None,
                 progress=None, merge_siblings: bool = True) -> PipelineResult:
    """Run ``build_steps(recipe)`` on ``ir`` for ``chip``; ``ir`` and ``calibration`` are not changed.

    ``calibration`` feeds the steps that need it; ``progress`` (a tqdm bar) advances once per weight
    quantized; ``merge_siblings``: see :class:`~lowbit.passes.quantize_linears.QuantizeLinears`.
    """
    check_layer_patterns(recipe, ir)
    steps = build_steps(recipe)
    if calibration is None and (recipe.needs_calibration or any(step.needs_calibration for step in steps)):
        raise LowbitError(f"recipe {recipe.name} needs calibration statistics")
    state = PipelineState(ir, None if calibration is None else calibration.statistics)
    context = PipelineContext(recipe, chip, calibration, progress, merge_siblings)
    for step in steps:
        state = step.run(state, context)
    return PipelineResult(state.ir, state.layers, list(state.kept), state.cache)


def check_layer_patterns(recipe: Recipe, ir: ModelIR) -> dict[str, LinearUse]:
    """Raise if a recipe's ``ignore`` / ``keep`` pattern matches no linear layer of ``ir``,
    ``keep=autoN`` asks for more layers than there are or its KV scheme does not fit the model's
    cache; returns the linear layers."""
    kv_scheme(recipe.kv, ir.kv)  # a kv4 group that does not fit the model fails here, before calibration
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
