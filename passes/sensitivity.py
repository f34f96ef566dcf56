"""Per-layer sensitivity: the output error each linear layer's quantization causes on calibration data.

Requires calibration statistics with activation samples (:class:`lowbit.passes.statistics.
LinearStatistics` ``.sample``) and the float weights. For each layer, with ``X`` the sampled input
rows and ``W`` the weight, the relative error is ``||Qa(X) Qw(W)^T - X W^T||^2 / ||X W^T||^2`` where
``Qw`` is the recipe's weight grid (round to nearest: GPTQ and AWQ are ranked by the RTN grid they
start from) and ``Qa`` its activation grid (per token, or per tensor with the calibrated absmax),
if any: the grids of the recipe's scheme (:mod:`lowbit.passes.schemes`).

Weight-only recipes can also be measured end to end: given ``output_kl(name, weight_nk)`` (the
mean KL divergence of the model's output with that one weight replaced, see
:mod:`lowbit.compiler.output_probe`), each layer's ``output_kl`` under its RTN-dequantized weight
is measured and ranks the layers, since a layer's own error says little about how far it
propagates (an output head's error reaches the logits unattenuated). Layers are ranked worst
first; ``keep=autoN`` keeps the first ``N`` in int8. The model is not changed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lowbit.codegen.errors import LowbitError

from .schemes import linear_scheme


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    layer: str
    relative_error: float
    output_kl: float | None = None

    @property
    def severity(self) -> float:
        """What the ranking sorts by: the end-to-end KL when measured, else the layer's own error."""
        return self.relative_error if self.output_kl is None else self.output_kl


def layer_error(weight_nk: np.ndarray, statistics, recipe) -> float:
    """The relative output error of one layer under ``recipe`` (see the module docstring)."""
    x = statistics.sample
    if len(x) == 0:
        raise LowbitError("sensitivity analysis needs calibration samples; none were collected")
    scheme = linear_scheme(recipe.weights, recipe.activations)
    weight = scheme.weight_grid.simulate(weight_nk)
    reference = x @ weight_nk.T
    grid = scheme.activation_grid
    inputs = x if grid is None else grid.simulate(x, statistics.absmax)
    error = inputs @ weight.T - reference
    return float((error**2).sum() / max((reference**2).sum(), 1e-30))


def rank_layers(linears, params: dict[str, np.ndarray], statistics: dict, recipe,
                output_kl=None, progress=None) -> list[LayerSensitivity]:
    """Every layer in ``linears`` (weight name -> :class:`LinearUse`) with statistics, worst first.

    ``output_kl`` (see the module docstring) is used for weight-only recipes; ``progress`` (a tqdm
    bar) advances once per layer measured.
    """
    end_to_end = output_kl is not None and recipe.activations is None
    ranked = []
    for name, use in linears.items():
        if name not in statistics or recipe.is_ignored(name):
            continue
        weight = np.asarray(params[name] if use.transposed else params[name].T, np.float32)
        kl = None
        if end_to_end:
            kl = output_kl(name, linear_scheme(recipe.weights).weight_grid.simulate(weight))
            if progress is not None:
                progress.update(1)
        ranked.append(LayerSensitivity(name, layer_error(weight, statistics[name], recipe), kl))
    return sorted(ranked, key=lambda entry: -entry.severity)
