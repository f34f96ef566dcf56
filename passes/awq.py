"""AWQ (Lin et al., 2023): activation-aware per-channel scaling before weight-only quantization.

For each smoothing group (:mod:`lowbit.passes.scale_folding`) with a fold target, the input
channels are scaled by ``s = mean|x|^r`` (normalized by ``sqrt(max(s) min(s))``), ``r`` searched on
a grid of :data:`RATIO_STEPS` points in ``[0, 1]`` (``r = 0`` is no scaling; made admissible for
the fold, see :meth:`~lowbit.passes.scale_folding.SmoothingGroup.admissible`) for the smallest group
output error ``sum_layers tr(dW H dW^T)`` with ``dW = Q(W diag(s)) diag(1/s) - W``, ``Q`` the
recipe's round-to-nearest grid and ``H = X^T X / tokens`` from calibration: the exact mean squared
output error on the calibration tokens. The chosen scale is folded into the producer of ``X``.
Then every linear layer (foldable or not) gets the clipping search: per output channel and group,
the weight range is shrunk by the ratio in :data:`CLIP_RATIOS` whose RTN grid gives the smallest
group output error ``dW_g H_gg dW_g^T``, and the float weight is clamped to it, so that the later
round to nearest uses the shrunk range.

Requires: calibration statistics (``abssum``, ``xtx``) keyed by weight name, before weight
quantization. Guarantees: returns new parameters (the scaling leaves the float model's function
unchanged; the clipping moves it) and new statistics, those of every scaled input rescaled, so a
later GPTQ sees ``X / s``; the caller's dicts are not changed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .scale_folding import find_smoothing_groups, foldable_groups, folded_model, weight_nk
from .schemes import WeightGrid

RATIO_STEPS = 20
CLIP_RATIOS = tuple(np.round(np.arange(1.0, 0.49, -0.05), 2))


def output_error(weights_nk: list[np.ndarray], hessian: torch.Tensor, s: np.ndarray, grid: WeightGrid) -> float:
    """``sum tr(dW H dW^T)`` over the group for scales ``s`` (see the module docstring), computed in
    ``hessian``'s dtype: the search passes float32, whose rounding is far below the differences
    between its candidates."""
    w = np.concatenate(weights_nk)  # one product: the group's layers share H
    delta = torch.from_numpy(grid.simulate(w * s) / s - w).to(hessian.dtype)
    return float(torch.einsum("nk,nk->n", delta @ hessian, delta).double().sum())


def clip_search(weight: np.ndarray, hessian: np.ndarray, grid: WeightGrid) -> tuple[np.ndarray, float]:
    """``weight[N, K]`` clamped per output channel and group to the best shrunk range; the mean ratio.
    Every ratio of :data:`CLIP_RATIOS` is tried at once per group; ties go to the larger ratio."""
    n, k = weight.shape
    group = grid.group(k)
    per_group = dataclasses.replace(grid, group_size=None)  # the grid of one group's columns
    ratios = np.asarray(CLIP_RATIOS)[:, None, None]
    clamped = weight.copy()
    chosen = []
    for start in range(0, k, group):
        w = weight[:, start:start + group]
        h = torch.from_numpy(hessian[start:start + group, start:start + group].astype(np.float32))
        lo, hi = (np.minimum(w.min(axis=1, keepdims=True), 0), np.maximum(w.max(axis=1, keepdims=True), 0))
        if grid.symmetric:
            hi = np.maximum(-lo, hi)
            lo = -hi
        trials = per_group.simulate(np.clip(w, lo * ratios, hi * ratios))  # [ratios, N, group]
        delta = torch.from_numpy(np.asarray(trials - w, np.float32))
        errors = torch.einsum("rnk,rnk->rn", delta @ h, delta).numpy()  # float32, as in output_error
        best = np.asarray(CLIP_RATIOS, np.float32)[errors.argmin(axis=0)]
        clamped[:, start:start + group] = np.clip(w, lo * best[:, None], hi * best[:, None])
        chosen.append(best)
    return clamped, float(np.concatenate(chosen).mean())


def apply_awq(func, params: dict, statistics: dict, grid: WeightGrid) -> tuple[dict, dict, dict[str, str]]:
    """Scale every foldable group of ``func`` and clip every linear's weight for ``grid`` (see the
    module docstring); returns the new ``(params, statistics)`` and a note per layer."""
    params, statistics, notes = awq_scaling(func, params, statistics, grid)
    params = dict(params)
    for group in find_smoothing_groups(func):
        hessian = statistics[group.linears[0].name].hessian()
        for use in group.linears:
            clamped, ratio = clip_search(weight_nk(params, use), hessian, grid)
            params[use.name] = clamped if use.transposed else np.ascontiguousarray(clamped.T)
            notes[use.name] = f"{notes[use.name]}, clip {ratio:.2f}"
    return params, statistics, notes


def awq_scaling(func, params: dict, statistics: dict, grid: WeightGrid) -> tuple[dict, dict, dict[str, str]]:
    """AWQ's scaling alone (no clipping): the float model's function is unchanged by it; returns the
    new ``(params, statistics)`` and a note per layer."""
    notes: dict[str, str] = {}
    for group in foldable_groups(func, notes, "awq: no scaling (no op to fold it into)"):
        names = [use.name for use in group.linears]
        stats = statistics[names[0]]
        hessian = torch.from_numpy(stats.hessian()).float()
        weights = [weight_nk(params, use) for use in group.linears]
        mean_abs = np.maximum(stats.abssum / max(stats.tokens, 1), 1e-8)
        best_ratio, best_s, best_error = 0.0, None, output_error(weights, hessian, np.ones_like(mean_abs), grid)
        for ratio in np.linspace(0, 1, RATIO_STEPS + 1)[1:]:
            s = group.admissible(mean_abs**ratio)
            s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
            error = output_error(weights, hessian, s, grid)
            if error < best_error:
                best_ratio, best_s, best_error = float(ratio), s, error
        if best_s is not None:
            params, statistics = folded_model(params, statistics, group, best_s)
        notes.update({name: f"awq ratio {best_ratio:.2f} into {group.target.name}" for name in names})
    return params, statistics, notes
