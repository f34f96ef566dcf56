"""Linear-layer schemes: each one unit of numerics, weight format and the kernel call that runs it.

A scheme says what a linear layer's weight becomes (its :class:`~.grids.WeightGrid`, and the
:class:`~.grids.ActivationGrid` of its inputs for W8A8), which :class:`LinearFormat` it asks the
chip target to lay out (:meth:`LinearScheme.pack`), and how the Relax rewrite calls its kernel
(:meth:`LinearScheme.emit`). Schemes are registered by name (:mod:`lowbit.passes.schemes`); a
recipe's weight and activation settings select one (:func:`~lowbit.passes.schemes.linear_scheme`).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import tvm
from tvm import relax, tirx

from lowbit.codegen.formats import ColumnTiles, LinearFormat
from lowbit.codegen.kernels import GROUP_SCALE_DTYPE, W8A8_ZERO, w4a8_padded_k, w8a8_padded_k
from lowbit.codegen.packing import INT4_PER_WORD, pack_int4

from ..recipe import ActQuant, WeightQuant
from .grids import ActivationGrid, QuantizedWeight, WeightGrid


class LinearScheme:
    """How one linear layer ``y = x @ W.T`` (``W[N, K]``) is stored and computed."""

    name: ClassVar[str]
    shared_tensors: ClassVar[tuple[str, ...]] = ()  # packed tensors held per layer, not per column tile

    def __init__(self, weights: WeightQuant | None = None, activations: ActQuant | None = None):
        self.weights, self.activations = weights, activations

    @classmethod
    def matches(cls, weights: WeightQuant | None, activations: ActQuant | None) -> bool:
        """Whether this scheme is the one for these recipe settings."""
        raise NotImplementedError

    @property
    def weight_grid(self) -> WeightGrid | None:
        """The grid the weight is rounded to, or ``None`` for float weights."""
        return None if self.weights is None else WeightGrid(self.weights.bits, self.weights.group_size,
                                                            self.weights.symmetric)

    @property
    def activation_grid(self) -> ActivationGrid | None:
        """The grid the kernel puts its inputs on, or ``None`` for float inputs."""
        if self.activations is None:
            return None
        grouped = self.activations.granularity == "group" and self.weights.group_size is not None
        return ActivationGrid(self.activations.granularity, group_size=self.weights.group_size if grouped else 0)

    def unsupported(self, n: int, k: int) -> str | None:
        """Why this scheme cannot hold an ``[N, K]`` weight (the layer then stays float), or ``None``."""
        return None

    def format(self, k: int) -> LinearFormat:
        raise NotImplementedError

    def pack(self, weight_nk: np.ndarray, quantized: QuantizedWeight | None, layout: ColumnTiles,
             statistics=None) -> dict[str, np.ndarray]:
        """The weight tensors the kernel takes, in its argument order, in the chip's ``layout``."""
        raise NotImplementedError

    def describe(self, quantized: QuantizedWeight | None, method: str, tensors: dict) -> str:
        """One line for the manifest's per-layer report."""
        raise NotImplementedError

    @property
    def needs_statistics(self) -> bool:
        """Whether packing needs the calibration statistics of the layer's input."""
        return False

    def emit(self, builder: relax.BlockBuilder, x: relax.Expr, weights: list[relax.Var], kernel: tvm.ir.GlobalVar,
             n: int, layout: ColumnTiles) -> relax.Expr:
        """``y[..., N]`` for ``x[..., K]``: flatten the leading dims, call the kernel (made for
        :func:`rows` of ``x``) on whole column tiles, slice off the padded channels, restore the
        leading dims."""
        lead = list(x.ty.shape)[:-1]
        m, k = rows(x), x.ty.shape[-1]
        x2 = builder.emit(relax.op.reshape(x, relax.ShapeExpr([m, k])))
        n_padded = layout.padded(n)
        y = builder.emit(relax.call_tir(kernel, [x2, *weights], relax.TensorType([m, n_padded], str(x.ty.dtype))))
        if n_padded != n:
            y = builder.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n]))
        return relax.op.reshape(y, relax.ShapeExpr([*lead, n]))


def rows(x: relax.Expr):
    """The row count the kernel sees for ``x[..., K]``: the product of the leading dims, the static
    ones folded (``1 * 1 * seq`` -> ``seq``)."""
    return _product(list(x.ty.shape)[:-1])


def _product(dims):
    """Product of shape dims, folding the static ones (``1 * 1 * seq`` -> ``seq``)."""
    static, symbolic = 1, []
    for dim in dims:
        if isinstance(dim, tirx.IntImm):
            static *= int(dim)
        else:
            symbolic.append(dim)
    result = tirx.const(static, "int64") if static != 1 or not symbolic else None
    for dim in symbolic:
        result = dim if result is None else result * dim
    return result


class FloatLinear(LinearScheme):
    """Float weights, re-laid-out for the kernels (``fp32``, ignored layers, unsupported shapes)."""

    name = "f32"

    @classmethod
    def matches(cls, weights, activations) -> bool:
        return weights is None

    def format(self, k: int) -> LinearFormat:
        return LinearFormat("f32")

    def pack(self, weight_nk, quantized, layout, statistics=None):
        return {"tiled": layout.pack(np.ascontiguousarray(weight_nk.T, dtype=np.float32))}

    def describe(self, quantized, method, tensors) -> str:
        return "float"


class Int8Linear(LinearScheme):
    """int8 codes, one scale per output channel; float activations (``w8a16``, kept layers)."""

    name = "int8"

    @classmethod
    def matches(cls, weights, activations) -> bool:
        return weights is not None and weights.bits == 8 and activations is None

    def format(self, k: int) -> LinearFormat:
        return LinearFormat("int8")

    def pack(self, weight_nk, quantized, layout, statistics=None):
        codes = (quantized.codes.astype(np.int16) - 128).astype(np.int8)
        return {"qweight": layout.pack(codes), "scales": _channel_scales(quantized, layout)}

    def describe(self, quantized, method, tensors) -> str:
        return f"int8 per channel, {method}"


class Int4Linear(LinearScheme):
    """3- or 4-bit codes packed 8 per uint32 along K, a scale [and zero point] per group (``w4a16``,
    ``w3a16``: 3-bit codes are recentred onto the 4-bit kernels' zero point of 8)."""

    name = "int4"

    @classmethod
    def matches(cls, weights, activations) -> bool:
        return weights is not None and weights.bits < 8 and activations is None

    def unsupported(self, n: int, k: int) -> str | None:
        return f"K={k} is not a multiple of {INT4_PER_WORD} (int4 codes per word)" if k % INT4_PER_WORD else None

    def format(self, k: int) -> LinearFormat:
        return LinearFormat("int4", self.weight_grid.group(k), not self.weights.symmetric)

    def pack(self, weight_nk, quantized, layout, statistics=None):
        return self._with_scales({"qweight": layout.pack(pack_int4(self._nibbles(quantized)))}, quantized, layout)

    def _nibbles(self, quantized: QuantizedWeight) -> np.ndarray:
        """The codes as the kernels' 4-bit values: symmetric 3-bit codes recentred on zero point 8."""
        if self.weights.symmetric and self.weights.bits < 4:
            return quantized.codes + np.uint8(8 - 2 ** (self.weights.bits - 1))
        return quantized.codes

    def _with_scales(self, tensors: dict, quantized: QuantizedWeight, layout: ColumnTiles) -> dict:
        tensors["scales"] = layout.pack(quantized.scales).astype(GROUP_SCALE_DTYPE)  # exact: see WeightGrid.fit
        if not self.weights.symmetric:
            tensors["zeros"] = layout.pack(quantized.zeros).astype(GROUP_SCALE_DTYPE)  # integers 0..15
        return tensors

    def describe(self, quantized, method, tensors) -> str:
        return f"{quantized.bits}-bit group {quantized.group_size}{'' if self.weights.symmetric else ' asym'}, {method}"


class W4A8Linear(Int4Linear):
    """The int4 grid (3- or 4-bit codes, groups, optional zero points) times int8 activations
    quantized per token and group at run time, int32 accumulation by a byte dot product (``w4a8``).
    The codes are laid out as nibble quads, the inputs padded to whole groups."""

    name = "w4a8"

    @classmethod
    def matches(cls, weights, activations) -> bool:
        return weights is not None and weights.bits < 8 and activations is not None

    def format(self, k: int) -> LinearFormat:
        return LinearFormat("w4a8", self.weight_grid.group(k), not self.weights.symmetric)

    def pack(self, weight_nk, quantized, layout, statistics=None):
        codes = self._nibbles(quantized)
        k_padded = w4a8_padded_k(codes.shape[0], quantized.group_size)
        return self._with_scales({"qweight": layout.pack_quads(codes, k_padded, pad_code=8)}, quantized, layout)

    def describe(self, quantized, method, tensors) -> str:
        return f"{super().describe(quantized, method, tensors)}; int8 activations per token and group"


class W8A8Linear(LinearScheme):
    """int8 weights per output channel times int8 activations (per token at run time, or one
    calibrated scale per layer input), int32 accumulation (``w8a8``)."""

    name = "w8a8"
    shared_tensors = ("act_scale",)

    @classmethod
    def matches(cls, weights, activations) -> bool:
        return activations is not None and activations.granularity != "group"

    def format(self, k: int) -> LinearFormat:
        return LinearFormat("w8a8" if self.activations.granularity == "token" else "w8a8_static")

    @property
    def needs_statistics(self) -> bool:
        return self.activations.granularity == "tensor"

    def pack(self, weight_nk, quantized, layout, statistics=None):
        codes = quantized.codes
        tensors = {"qweight": layout.pack_byte_quads(codes, w8a8_padded_k(codes.shape[0]), pad_code=W8A8_ZERO),
                   "scales": _channel_scales(quantized, layout)}
        if self.activations.granularity == "tensor":
            tensors["act_scale"] = self.activation_grid.scale(None, statistics.absmax).reshape(1)
        return tensors

    def describe(self, quantized, method, tensors) -> str:
        note = f"int8 weights per channel ({method}), int8 activations per {self.activations.granularity}"
        if "act_scale" in tensors:
            note += f" (static scale {tensors['act_scale'][0]:.4g})"
        return note


def _channel_scales(quantized: QuantizedWeight, layout: ColumnTiles) -> np.ndarray:
    """One scale per output channel (a per-channel grid's single group), ``[N / tile, tile]``."""
    return layout.pack(quantized.scales)[:, 0, :].copy()
