"""The quantization grids in numpy: one source of truth for what a code stands for.

:class:`WeightGrid` (integer codes with per-group scales [and zero points]) is what RTN rounds to,
what GPTQ and AWQ search over, what the sensitivity ranking simulates and what the int4/int8
kernels decode; :class:`ActivationGrid` is what the W8A8 kernels do to their inputs, simulated
for SmoothQuant's search and the sensitivity ranking.

Weights are taken in the model's ``[N, K]`` layout (output channels first); codes and scales come
out k-major (``[K, N]`` codes, ``[K // group, N]`` scales) as :mod:`lowbit.codegen.packing` wants.
Dequantization is ``(code - zero) * scale``; symmetric scales may be negative (see :meth:`WeightGrid.fit`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lowbit.codegen.kernels import GROUP_SCALE_DTYPE, INT8_QMAX


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


def storable(scales: np.ndarray) -> np.ndarray:
    """``scales`` (float32) rounded to the nearest value of ``GROUP_SCALE_DTYPE``: never to zero (a
    magnitude under its smallest subnormal, 6e-8, becomes that) nor past its largest finite value."""
    dtype = np.dtype(GROUP_SCALE_DTYPE)
    info = np.finfo(dtype)
    magnitude = np.clip(np.abs(scales), info.smallest_subnormal, info.max)
    return np.copysign(magnitude.astype(dtype), scales).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class WeightGrid:
    """``bits``-bit codes, one scale [and zero point] per ``group_size`` inputs (``None``: per channel)."""

    bits: int
    group_size: int | None
    symmetric: bool

    def group(self, k: int) -> int:
        """The group size for ``K`` inputs (the whole row when per channel)."""
        return k if self.group_size is None else self.group_size

    def fit(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Scales (and zero points) for groups ``w[..., group, N]`` -> ``[..., N]`` each.

        Symmetric low-bit grids follow llama.cpp's Q4_0 rule: the largest-magnitude value maps to
        code 0 (``-2^(bits-1)``), so all ``2^bits`` levels are used (``absmax / (2^(bits-1) - 1)``
        would waste one of 16); the value opposite it clips by at most one step. 8-bit uses plain
        absmax. Asymmetric spans ``[min(w, 0), max(w, 0)]``.
        """
        levels = 2**self.bits - 1
        half = 2 ** (self.bits - 1)
        if self.symmetric and self.bits >= 8:  # one level of 256 is not worth clipping for: plain absmax
            absmax = np.abs(w).max(axis=-2)
            return np.where(absmax > 0, absmax / (half - 1), 1.0).astype(np.float32), None
        if self.symmetric:
            signed_max = np.take_along_axis(w, np.abs(w).argmax(axis=-2)[..., None, :], axis=-2)[..., 0, :]
            return storable(np.where(signed_max != 0, signed_max / -half, 1.0)), None
        lo, hi = np.minimum(w.min(axis=-2), 0), np.maximum(w.max(axis=-2), 0)
        scales = storable(np.where(hi > lo, (hi - lo) / levels, 1.0))
        return scales, np.clip(np.rint(-lo / scales), 0, levels).astype(np.float32)

    def round(self, w, scales, zeros):
        """Codes ``clip(rint(w / scale) + zero)`` (numpy or torch arrays broadcasting alike)."""
        zero = 2 ** (self.bits - 1) if zeros is None else zeros
        codes = (w / scales).round() + zero
        return codes.clip(0, 2**self.bits - 1)

    def grouped(self, weight_nk: np.ndarray) -> np.ndarray:
        """``weight[N, K]`` as ``[groups, group, N]``, the last group zero-padded (zeros change no
        group's absmax, min or max)."""
        n, k = weight_nk.shape
        group = self.group(k)
        groups = -(-k // group)
        w = np.zeros((groups * group, n), np.float32)
        w[:k] = weight_nk.T
        return w.reshape(groups, group, n)

    def quantize(self, weight_nk: np.ndarray) -> QuantizedWeight:
        """Round to nearest: ``weight[N, K]`` on this grid.

        When ``K`` is not a multiple of the group size the last group is partial (e.g. K=576 with
        group 128 gives 4 full groups and one of 64); scales then have ``ceil(K / group)`` rows.
        """
        n, k = weight_nk.shape
        w = self.grouped(weight_nk)
        scales, zeros = self.fit(w)
        codes = self.round(w, scales[:, None, :], None if zeros is None else zeros[:, None, :])
        return QuantizedWeight(codes=codes.reshape(-1, n)[:k].astype(np.uint8), scales=scales, zeros=zeros,
                               bits=self.bits, group_size=self.group(k))

    def simulate(self, weight_nk: np.ndarray) -> np.ndarray:
        """The float weight round to nearest leaves: ``dequantize(quantize(w))``, for ``weight[..., N, K]``
        (leading dims: independent weights); float32 ``[..., N, K]``, bit for bit what the codes stand for.
        Works in the row-major layout: no k-major copies, no integer codes."""
        k = weight_nk.shape[-1]
        group = self.group(k)
        padded = -(-k // group) * group
        if padded == k:
            w = np.asarray(weight_nk, np.float32)
        else:  # zero-padded as in grouped(): zeros change no group's absmax, min or max
            w = np.zeros((*weight_nk.shape[:-1], padded), np.float32)
            w[..., :k] = weight_nk
        w = w.reshape(*w.shape[:-1], padded // group, group)
        scales, zeros = self.fit(w.swapaxes(-1, -2))
        scales = scales[..., None]
        zeros = None if zeros is None else zeros[..., None]
        codes = self.round(w, scales, zeros)
        zero = np.float32(2 ** (self.bits - 1)) if zeros is None else zeros
        weight = ((codes - zero) * scales).reshape(*w.shape[:-2], padded)
        return np.ascontiguousarray(weight[..., :k])


@dataclasses.dataclass(frozen=True)
class ActivationGrid:
    """int8 activations in ``[-127, 127]``: one scale per ``token`` row (``max|x| / 127``, at run
    time), per ``group`` of ``group_size`` consecutive inputs of each row (at run time), or per
    ``tensor`` (one calibrated scale, ``max |x|`` over calibration / 127)."""

    granularity: str
    qmax: int = INT8_QMAX
    group_size: int = 0

    def scale(self, x: np.ndarray, calibrated_absmax: np.ndarray) -> np.ndarray:
        """The scale of each row of ``x[M, K]`` (``[M, 1]``), of each row's group of inputs
        (``[M, K]``, repeated across the group), or of the whole tensor (``[1, 1]``)."""
        if self.granularity == "token":
            scale = np.abs(x).max(axis=1, keepdims=True) / self.qmax
        elif self.granularity == "group":
            m, k = x.shape
            size = self.group_size or k
            padded = np.zeros((m, -(-k // size) * size), np.float32)
            padded[:, :k] = np.abs(x)
            absmax = padded.reshape(m, -1, size).max(axis=2)
            scale = np.repeat(absmax / np.float32(self.qmax), size, axis=1)[:, :k]
        else:
            scale = np.full((1, 1), np.max(calibrated_absmax) / self.qmax, np.float32)
        return np.where(scale > 0, scale, 1.0).astype(np.float32)

    def simulate(self, x: np.ndarray, calibrated_absmax: np.ndarray) -> np.ndarray:
        """``x`` through the grid and back to float, as the int8-activation kernels see it."""
        scale = self.scale(x, calibrated_absmax)
        return np.clip(np.rint(x / scale), -self.qmax, self.qmax) * scale
