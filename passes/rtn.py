"""Round-to-nearest (absmax) quantization of one weight matrix: the numerics, no graph work.

The grid (:func:`group_grid`) and the rounding (:func:`round_to_grid`) are shared with GPTQ.

All functions take the weight in the model's ``[N, K]`` layout (output channels first) and return
k-major tensors (``[K, N]`` codes, ``[K // group, N]`` scales) as :mod:`lowbit.codegen.packing` wants.
Dequantization is ``(code - zero) * scale``; symmetric scales may be negative (see below).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class QuantizedWeight:
    """Integer codes with their scales (and zero points) in k-major layout.

    ``codes`` are unsigned (0..2^bits-1); symmetric weights use the fixed zero point ``2^(bits-1)``
    and carry ``zeros = None``.
    """

    codes: np.ndarray  # [K, N] uint8
    scales: np.ndarray  # [ceil(K / group), N] float32
    zeros: np.ndarray | None  # [ceil(K / group), N] float32, integer-valued; None if symmetric
    bits: int
    group_size: int

    def dequantize(self) -> np.ndarray:
        """The float weight these codes stand for, back in ``[N, K]`` layout."""
        group_of_row = np.arange(self.codes.shape[0]) // self.group_size
        zero = self.zeros[group_of_row] if self.zeros is not None else np.float32(2 ** (self.bits - 1))
        weight = (self.codes.astype(np.float32) - zero) * self.scales[group_of_row]
        return weight.T.copy()


def group_grid(w: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (and zero points) for groups ``w[..., group, N]`` -> ``[..., N]`` each.

    Symmetric low-bit grids follow llama.cpp's Q4_0 rule: the largest-magnitude value maps to code
    0 (``-2^(bits-1)``), so all ``2^bits`` levels are used (``absmax / (2^(bits-1) - 1)`` would
    waste one of 16); the value opposite it clips by at most one step. 8-bit uses plain absmax. Asymmetric spans ``[min(w, 0), max(w, 0)]``.
    """
    levels = 2**bits - 1
    if symmetric and bits >= 8:  # one level of 256 is not worth clipping for: plain absmax
        absmax = np.abs(w).max(axis=-2)
        half = 2 ** (bits - 1)
        return np.where(absmax > 0, absmax / (half - 1), 1.0).astype(np.float32), None
    if symmetric:
        half = 2 ** (bits - 1)
        signed_max = np.take_along_axis(w, np.abs(w).argmax(axis=-2)[..., None, :], axis=-2)[..., 0, :]
        return np.where(signed_max != 0, signed_max / -half, 1.0).astype(np.float32), None
    lo, hi = np.minimum(w.min(axis=-2), 0), np.maximum(w.max(axis=-2), 0)
    scales = np.where(hi > lo, (hi - lo) / levels, 1.0).astype(np.float32)
    return scales, np.clip(np.rint(-lo / scales), 0, levels).astype(np.float32)


def round_to_grid(w, scales, zeros, bits: int):
    """Codes ``clip(rint(w / scale) + zero)`` (numpy or torch arrays broadcasting alike)."""
    zero = 2 ** (bits - 1) if zeros is None else zeros
    codes = (w / scales).round() + zero
    return codes.clip(0, 2**bits - 1)


def quantize_rtn(weight: np.ndarray, bits: int, group_size: int | None, symmetric: bool) -> QuantizedWeight:
    """Quantize ``weight[N, K]`` with one scale per ``group_size`` inputs (``None``: per channel).

    When ``K`` is not a multiple of the group size the last group is partial (e.g. K=576 with
    group 128 gives 4 full groups and one of 64); scales then have ``ceil(K / group)`` rows.
    """
    n, k = weight.shape
    group = k if group_size is None else group_size
    groups = -(-k // group)
    w = np.zeros((groups * group, n), np.float32)  # zero padding changes no group's absmax/min/max
    w[:k] = weight.T
    w = w.reshape(groups, group, n)
    scales, zeros = group_grid(w, bits, symmetric)
    codes = round_to_grid(w, scales[:, None, :], None if zeros is None else zeros[:, None, :], bits)
    return QuantizedWeight(
        codes=codes.reshape(groups * group, n)[:k].astype(np.uint8),
        scales=scales,
        zeros=zeros,
        bits=bits,
        group_size=group,
    )
