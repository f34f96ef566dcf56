"""The ordered passes from an imported model to a quantized Relax module ready for codegen.

Order: weight quantization (rewrites linears into lowbit kernels) -> dead code elimination ->
parameter sync (every entry function takes exactly the live weights). Later passes (smoothing,
activation and KV-cache quantization) slot in before weight quantization.
"""

from __future__ import annotations

import dataclasses

from tvm import relax

from lowbit.passes.quantize_weights import QuantizeWeights

from .model_ir import ENTRY_FUNCTIONS, ModelIR, sync_params


@dataclasses.dataclass
class PipelineResult:
    ir: ModelIR
    layers: dict[str, str]  # weight name -> format and reason


def run_pipeline(ir: ModelIR, recipe, chip, statistics=None, progress=None) -> PipelineResult:
    """Apply ``recipe`` to ``ir`` for ``chip``; returns a new :class:`ModelIR` and a per-layer report.

    ``statistics`` (from :func:`lowbit.compiler.calibration.collect_statistics`) feeds GPTQ;
    ``progress`` (a tqdm bar) advances once per weight quantized.
    """
    params = dict(ir.params)
    quantize = QuantizeWeights(recipe, params, tile=chip.linear_tile, statistics=statistics, progress=progress)
    mod = quantize(ir.mod)
    mod = relax.transform.DeadCodeElimination(list(ENTRY_FUNCTIONS))(mod)
    mod, params = sync_params(mod, params)
    return PipelineResult(dataclasses.replace(ir, mod=mod, params=params), quantize.report)
