"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights before W8A8.

For each smoothing group (:mod:`lowbit.passes.scale_folding`: the linears reading one activation
``X`` and the op that can absorb a per-channel scale), ``s_j = max|X_j|^alpha / max_i |W_ij|^(1-alpha)``
(the weight maximum over all the group's layers; made admissible for the fold, i.e. shared by the
channels of one value channel under grouped-query attention), ``X' = X / s`` folded into the
producer and ``W' = W * s``. ``alpha=None`` picks alpha per group from a grid by the simulated
W8A8 output error on the calibration sample rows (int8 per-channel weights, int8 activations at
the recipe's granularity), keeping ``s = 1`` when no alpha beats it.

With a fixed alpha, the attention output (v -> o, folded through ``P @ V``) is left alone, as the
reference implementation does: smoothing it at alpha 0.5 raised SmolLM2's W8A8 perplexity gap
from +1.68 % to +2.12 % (bench/RESULTS.md). ``alpha=auto`` includes it, where the search keeps
``s = 1`` unless smoothing lowers that layer's simulated error.

Requires: calibration statistics (per-channel ``absmax`` and ``sample`` rows) keyed by weight name,
before weight quantization. Guarantees: only parameters change (the float model computes the same
function); the statistics of every smoothed input are rescaled to ``X / s`` in place.
"""

from __future__ import annotations

import numpy as np

from .rtn import quantize_rtn
from .scale_folding import find_smoothing_groups, fold_scales, rescale_statistics, weight_nk
from .sensitivity import quantize_activations

ALPHA_GRID = tuple(np.round(np.arange(0.3, 0.951, 0.05), 2))
_EPS = 1e-5


def smoothing_scales(absmax_x: np.ndarray, weights_nk: list[np.ndarray], alpha: float) -> np.ndarray:
    w_max = np.max([np.abs(w).max(axis=0) for w in weights_nk], axis=0)
    s = np.maximum(absmax_x, _EPS) ** alpha / np.maximum(w_max, _EPS) ** (1 - alpha)
    return np.clip(s, _EPS, None).astype(np.float32)


def w8a8_error(x: np.ndarray, weights_nk: list[np.ndarray], s: np.ndarray, granularity: str,
               absmax_x: np.ndarray) -> float:
    """Relative output error of the group under W8A8 after smoothing by ``s`` (on rows ``x``)."""
    xq = quantize_activations(x / s, granularity, absmax_x / s)
    error = total = 0.0
    for w in weights_nk:
        reference = x @ w.T
        wq = quantize_rtn(w * s, 8, None, True).dequantize()
        error += float(((xq @ wq.T - reference) ** 2).sum())
        total += float((reference**2).sum())
    return error / max(total, 1e-30)


def apply_smoothquant(func, params: dict, statistics: dict, alpha: float | None, granularity: str,
                      progress=None) -> dict[str, str]:
    """Smooth every foldable group of ``func`` (see the module docstring); returns a note per layer."""
    notes: dict[str, str] = {}
    for group in find_smoothing_groups(func):
        names = [use.name for use in group.linears]
        if group.target is None:
            notes.update({name: "not smoothed (no op to fold the scale into)" for name in names})
            continue
        if alpha is not None and group.target.channel_map is not None:
            notes.update({name: "not smoothed (attention output: only alpha=auto smooths it)" for name in names})
            continue
        stats = statistics[names[0]]
        weights = [weight_nk(params, use) for use in group.linears]
        if alpha is None:
            chosen = _search_alpha(stats, weights, granularity, group.admissible)
        else:
            chosen = alpha
        if chosen is None:
            notes.update({name: "not smoothed (no alpha lowers the W8A8 error)" for name in names})
            continue
        s = group.admissible(smoothing_scales(stats.absmax, weights, chosen))
        fold_scales(params, group, s)
        rescale_statistics(stats, s)
        notes.update({name: f"smoothed alpha {chosen:g} into {group.target.name}" for name in names})
        if progress is not None:
            progress.update(1)
    return notes


def _search_alpha(stats, weights, granularity, admissible) -> float | None:
    best, best_error = None, w8a8_error(stats.sample, weights, np.ones(stats.absmax.shape, np.float32),
                                         granularity, stats.absmax)
    for alpha in ALPHA_GRID:
        s = admissible(smoothing_scales(stats.absmax, weights, alpha))
        error = w8a8_error(stats.sample, weights, s, granularity, stats.absmax)
        if error < best_error:
            best, best_error = float(alpha), error
    return best
