"""Per-layer sensitivity: the output error each linear layer's quantization causes on calibration data.

Requires calibration statistics with activation samples (:class:`lowbit.compiler.calibration.
LinearStatistics` ``.sample``) and the float weights. For each layer, with ``X`` the sampled input
rows and ``W`` the weight, the relative error is ``||Qa(X) Qw(W)^T - X W^T||^2 / ||X W^T||^2`` where
``Qw`` is the recipe's weight grid (round to nearest: GPTQ and AWQ are ranked by the RTN grid they
start from) and ``Qa`` its activation quantization (per token, or per tensor with the calibrated
absmax), if any.

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

from lowbit.compiler.errors import LowbitError

from .rtn import quantize_rtn


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    layer: str
    relative_error: float
    output_kl: float | None = None

    @property
    def severity(self) -> float:
        """What the ranking sorts by: the end-to-end KL when measured, else the layer's own error."""
        return self.relative_error if self.output_kl is None else self.output_kl


def quantize_activations(x: np.ndarray, granularity: str, absmax: np.ndarray) -> np.ndarray:
    """``x`` through the int8 activation grid of the W8A8 kernels (per ``token`` row, or per
    ``tensor`` with the calibrated per-channel ``absmax``), back in float."""
    if granularity == "token":
        scale = np.abs(x).max(axis=1, keepdims=True) / 127
    else:
        scale = np.full((1, 1), absmax.max() / 127, np.float32)
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.rint(x / scale), -127, 127) * scale


def layer_error(weight_nk: np.ndarray, statistics, recipe) -> float:
    """The relative output error of one layer under ``recipe`` (see the module docstring)."""
    x = statistics.sample
    if len(x) == 0:
        raise LowbitError("sensitivity analysis needs calibration samples; none were collected")
    wq = recipe.weights
    weight = quantize_rtn(weight_nk, wq.bits, wq.group_size, wq.symmetric).dequantize()
    reference = x @ weight_nk.T
    inputs = x if recipe.activations is None else quantize_activations(
        x, recipe.activations.granularity, statistics.absmax)
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
            wq = recipe.weights
            kl = output_kl(name, quantize_rtn(weight, wq.bits, wq.group_size, wq.symmetric).dequantize())
            if progress is not None:
                progress.update(1)
        ranked.append(LayerSensitivity(name, layer_error(weight, statistics[name], recipe), kl))
    return sorted(ranked, key=lambda entry: -entry.severity)
