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
before weight quantization. Guarantees: returns new parameters (the float model computes the same
function with them) and new statistics, those of every smoothed input rescaled to ``X / s``; the
caller's dicts are not changed.
"""

from __future__ import annotations

import numpy as np

from .recipe import ActQuant, WeightQuant
from .scale_folding import foldable_groups, folded_model, weight_nk
from .schemes import linear_scheme

ALPHA_GRID = tuple(np.round(np.arange(0.3, 0.951, 0.05), 2))
_EPS = 1e-5


def smoothing_scales(absmax_x: np.ndarray, weights_nk: list[np.ndarray], alpha: float) -> np.ndarray:
    w_max = np.max([np.abs(w).max(axis=0) for w in weights_nk], axis=0)
    s = np.maximum(absmax_x, _EPS) ** alpha / np.maximum(w_max, _EPS) ** (1 - alpha)
    return np.clip(s, _EPS, None).astype(np.float32)


def w8a8_error(x: np.ndarray, weights_nk: list[np.ndarray], s: np.ndarray, granularity: str,
               absmax_x: np.ndarray) -> float:
    """Relative output error of the group under W8A8 after smoothing by ``s`` (on rows ``x``)."""
    scheme = linear_scheme(WeightQuant(8), ActQuant(8, granularity))
    xq = scheme.activation_grid.simulate(x / s, absmax_x / s)
    error = total = 0.0
    for w in weights_nk:
        reference = x @ w.T
        wq = scheme.weight_grid.simulate(w * s)
        error += float(((xq @ wq.T - reference) ** 2).sum())
        total += float((reference**2).sum())
    return error / max(total, 1e-30)


def apply_smoothquant(func, params: dict, statistics: dict, alpha: float | None, granularity: str
                      ) -> tuple[dict, dict, dict[str, str]]:
    """Smooth every foldable group of ``func`` (see the module docstring); returns the new
    ``(params, statistics)`` and a note per layer."""
    notes: dict[str, str] = {}
    for group in foldable_groups(func, notes, "not smoothed (no op to fold the scale into)"):
        names = [use.name for use in group.linears]
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
        params, statistics = folded_model(params, statistics, group, s)
        notes.update({name: f"smoothed alpha {chosen:g} into {group.target.name}" for name in names})
    return params, statistics, notes


def _search_alpha(stats, weights, granularity, admissible) -> float | None:
    best, best_error = None, w8a8_error(stats.sample, weights, np.ones(stats.absmax.shape, np.float32),
                                         granularity, stats.absmax)
    for alpha in ALPHA_GRID:
        s = admissible(smoothing_scales(stats.absmax, weights, alpha))
        error = w8a8_error(stats.sample, weights, s, granularity, stats.absmax)
        if error < best_error:
            best, best_error = float(alpha), error
    return best
