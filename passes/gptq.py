"""GPTQ (Frantar et al., 2022): quantize a weight column by column, correcting the not yet
quantized columns for each rounding error with the inverse Hessian of the layer's inputs.

The numerics only: given ``W[N, K]``, ``H = X^T X / tokens [K, K]`` from calibration and the
scheme's :class:`~lowbit.passes.schemes.WeightGrid`, returns a
:class:`~lowbit.passes.schemes.QuantizedWeight` on that grid (the one RTN rounds to), so the kernels
and packing are shared. Lazy batch updates in blocks of ``block`` columns, nested in sub-blocks of
:data:`INNER_BLOCK` (a column's rank-1 update reaches only its sub-block); dampening
``damp * mean(diag H)`` added to the diagonal (raised tenfold, up to three times, if the Cholesky
factorization still fails, and reported); ``act_order`` quantizes columns in order of decreasing
``diag H`` with *static* groups (group grids fixed from the original weight up front), so the
stored layout stays in the natural column order. Memory: one ``[K, K]`` Hessian at a time, and
the float32 inverse factors of the last four (layers reading one input share theirs).

Act-order matters on LLMs: a few massive activation channels dominate ``H`` (its effective rank is
2-8 of 576 on SmolLM2's attention and MLP inputs), and GPTQ in natural order lowers each layer's
calibration error while spreading error over the weak channels that later layers depend on; on
SmolLM2 that model ended up worse than RTN. Recipes therefore default to act-order.

:func:`quantize_gptq_validated` guards against overfitting the calibration text: GPTQ at ``damp``
and ``10 * damp`` is fitted on half the calibration samples and scored, with RTN, on the other half
(``tr(dW H dW^T)``, the output error); the winner is refitted on all samples. Layers whose rarely
active input channels GPTQ would load with error (seen on down projections) thus keep RTN.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from lowbit.codegen.errors import LowbitError

from .schemes import QuantizedWeight, WeightGrid

INNER_BLOCK = 32  # columns per sub-block: the rest of the block gets the sub-block's errors as one product


@dataclasses.dataclass
class GPTQResult:
    weight: QuantizedWeight
    damp: float  # the dampening actually used (relative to mean diag H)


def quantize_gptq(weight: np.ndarray, hessian: np.ndarray, grid: WeightGrid, damp: float = 0.01,
                  block: int = 128, act_order: bool = False, name: str = "weight") -> GPTQResult:
    """GPTQ of ``weight[N, K]`` on ``grid`` under ``hessian[K, K]``; see the module docstring."""
    # The per-column updates are small: one thread is several times faster than a contended pool
    # (and the factorization too, when other processes share the cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(weight, _ordered_factor(hessian, damp, act_order, name), grid, block)
    finally:
        torch.set_num_threads(threads)


def output_error(weight: np.ndarray, quantized: QuantizedWeight, hessian: np.ndarray) -> float:
    """``tr(dW H dW^T)``: the mean squared output error under inputs with second moment ``H``; the
    product in float32 (its rounding is far below the differences between the candidates compared),
    the sum in float64."""
    delta = torch.from_numpy(np.asarray(quantized.dequantize() - weight, np.float32))
    product = delta @ torch.from_numpy(hessian.astype(np.float32))
    return float(torch.einsum("nk,nk->n", product, delta).double().sum())


def quantize_gptq_validated(weight: np.ndarray, statistics, grid: WeightGrid, damp: float = 0.01,
                            act_order: bool = False, name: str = "weight") -> tuple[QuantizedWeight, str]:
    """GPTQ or RTN, whichever predicts held-out calibration samples best (see the module docstring)."""
    split = statistics.split_hessians()
    if split is None:
        result = quantize_gptq(weight, statistics.hessian(), grid, damp, act_order=act_order, name=name)
        return result.weight, _note(result, damp, act_order)
    fit, heldout = split
    rtn = grid.quantize(weight)
    errors = {None: output_error(weight, rtn, heldout)}
    for candidate in (damp, min(10 * damp, 1.0)):
        trial = quantize_gptq(weight, fit, grid, candidate, act_order=act_order, name=name)
        errors[candidate] = output_error(weight, trial.weight, heldout)
    best = min(errors, key=errors.get)
    if best is None:
        gptq_best = min(v for k, v in errors.items() if k is not None)
        return rtn, f"rtn (gptq's held-out error {gptq_best / errors[None]:.2f} x rtn)"
    result = quantize_gptq(weight, statistics.hessian(), grid, best, act_order=act_order, name=name)
    return result.weight, _note(result, best, act_order) + f", held-out error {errors[best] / errors[None]:.2f} x rtn"


def _note(result: GPTQResult, damp: float, act_order: bool) -> str:
    raised = "" if result.damp == damp else f" (raised to {result.damp:g})"
    return f"gptq{' act-order' if act_order else ''} damp {damp:g}{raised}"


def _gptq(weight, factor: "_Factor", grid: WeightGrid, block) -> GPTQResult:
    n, k = weight.shape
    group = grid.group(k)
    order, dead, Hinv, used_damp = factor.order, factor.dead, factor.upper, factor.used_damp
    W = torch.tensor(weight, dtype=torch.float32).clone()
    W[:, dead] = 0.0

    groups = -(-k // group)
    # act-order: static groups, every group's scales fixed from the original weight up front
    fixed = grid.fit(grid.grouped(W.numpy())) if factor.act_order else None
    W = W[:, order]

    scales = np.zeros((groups, n), np.float32)
    zeros = None if grid.symmetric else np.zeros((groups, n), np.float32)
    if fixed is not None:
        scales[:], zeros = fixed
    codes = np.zeros((k, n), np.float32)  # row j: the codes of permuted column j
    columns = order.tolist()
    inner = math.gcd(INNER_BLOCK, block, group)  # sub-blocks start where natural-order groups start
    for start in range(0, k, block):
        stop = min(start + block, k)
        W1 = W[:, start:stop].T.contiguous()  # [columns, N]: one column per row
        E1 = torch.zeros_like(W1)
        H1 = Hinv[start:stop, start:stop]
        w1, e1, h1 = W1.numpy(), E1.numpy(), H1.numpy()
        for sub in range(0, stop - start, inner):
            sub_stop = min(sub + inner, stop - start)
            for i in range(sub, sub_stop):
                column = columns[start + i]
                g = column // group
                if fixed is None and column % group == 0:  # natural order: fit the group's grid now
                    upcoming = np.concatenate([w1[i:], W[:, stop:stop + group].T.numpy()])[: min(group, k - column)]
                    s, z = grid.fit(upcoming[None])
                    scales[g] = s[0]
                    if zeros is not None:
                        zeros[g] = z[0]
                zero_row = None if zeros is None else zeros[g]
                codes[start + i], e1[i] = _round_column(grid, w1[i], scales[g], zero_row, float(h1[i, i]))
                w1[i + 1:sub_stop] -= np.outer(h1[i, i + 1:sub_stop], e1[i])
            W1[sub_stop:] -= H1[sub:sub_stop, sub_stop:].T @ E1[sub:sub_stop]
        W[:, stop:] -= E1.T @ Hinv[start:stop, stop:]

    natural = np.empty_like(codes)
    natural[order.numpy()] = codes
    quantized = QuantizedWeight(codes=natural.astype(np.uint8), scales=scales, zeros=zeros,
                                bits=grid.bits, group_size=group)
    return GPTQResult(quantized, used_damp)


def _round_column(grid: WeightGrid, w: np.ndarray, scale: np.ndarray, zero_row: np.ndarray | None,
                  diagonal: float) -> tuple[np.ndarray, np.ndarray]:
    """One column's codes on ``grid`` and its rounding error divided by ``Hinv``'s diagonal entry."""
    q = grid.round(w, scale, zero_row)
    zero = 2 ** (grid.bits - 1) if zero_row is None else zero_row
    return q, (w - (q - zero) * scale) / diagonal


@dataclasses.dataclass(frozen=True)
class _Factor:
    """What GPTQ needs of a Hessian: the column order (decreasing ``diag H`` under act-order), the
    inputs that never fire, the upper Cholesky factor (float32) of the inverse of the dampened,
    reordered Hessian, and the dampening used."""

    hessian: np.ndarray  # the Hessian it was computed from (to recognize it again)
    damp: float
    act_order: bool
    order: torch.Tensor
    dead: torch.Tensor
    upper: torch.Tensor
    used_damp: float


_RECENT: list[_Factor] = []  # the latest factors, newest last: layers reading one input share one
_RECENT_KEPT = 4


def _ordered_factor(hessian: np.ndarray, damp: float, act_order: bool, name: str) -> _Factor:
    """The :class:`_Factor` of ``hessian``, computed once for equal Hessians among the last
    :data:`_RECENT_KEPT` (q/k/v and gate/up read one input, so GPTQ sees the same Hessian for each)."""
    for factor in _RECENT:
        if factor.damp == damp and factor.act_order == act_order and factor.hessian.shape == hessian.shape \
                and np.array_equal(factor.hessian, hessian):
            return factor
    H = torch.tensor(hessian, dtype=torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(H.shape[0])
    upper, used = _inverse_hessian_factor(H[order][:, order], damp, name)
    factor = _Factor(hessian.copy(), damp, act_order, order, dead, upper.float(), used)
    _RECENT[:] = _RECENT[1 - _RECENT_KEPT:] + [factor]
    return factor


def _inverse_hessian_factor(H: torch.Tensor, damp: float, name: str):
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, raising ``damp`` if needed."""
    mean_diag = float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for attempt in range(4):
        used = damp * 10**attempt
        factor, info = torch.linalg.cholesky_ex(H + used * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, used
    raise LowbitError(
        f"layer {name}: the calibration Hessian is not positive definite even with dampening "
        f"{used:g}; use more or more varied calibration text, or a larger damp"
    )
