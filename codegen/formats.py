"""Weight formats (what a linear layer stores and computes) and layouts (how a chip wants it in memory).

A format is chosen by the quantization scheme (:mod:`lowbit.passes.schemes`); a layout by the chip
target at packing time (:meth:`lowbit.targets.ChipTarget.linear_layout`). The kernel definitions
(:mod:`.kernels`) take both; their tag names both, so a target's schedule rules can find them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .packing import from_column_tiles, pack_byte_quads, pack_int4_quads, to_column_tiles

FORMAT_KINDS = ("f32", "int8", "int4", "w8a8", "w8a8_static", "w4a8")
W8A8_KINDS = ("w8a8", "w8a8_static")  # int8 activations: per-token dynamic scales / one static scale
ROW_BLOCK = 4  # by default a GEMM's integer dot products run over its rows padded to a multiple of this


@dataclasses.dataclass(frozen=True)
class LinearFormat:
    """What a linear layer's weight holds and what its kernel computes.

    kind: ``f32`` (float weights), ``int8`` (int8 codes, one scale per output channel), ``int4``
    (codes packed 8 per uint32 along K, one scale [and zero point] per ``group_size`` inputs), or
    ``w8a8`` / ``w8a8_static``: int8 weights per output channel, stored as unsigned codes around
    a zero point of 128 in byte quads (:func:`~lowbit.codegen.packing.pack_byte_quads`), times
    activations quantized to int8 too (per token at run time, or with one calibrated scale);
    ``w4a8``: the ``int4`` weights as nibble quads (:func:`~lowbit.codegen.packing.pack_int4_quads`)
    times int8 activations quantized per token and group at run time, accumulated in int32 by a
    byte dot product.
    """

    kind: str
    group_size: int = 0
    has_zeros: bool = False

    def __post_init__(self):
        if self.kind not in FORMAT_KINDS:
            raise ValueError(f"unknown linear format {self.kind!r}; one of {FORMAT_KINDS}")

    @property
    def tag(self) -> str:
        if self.kind in ("int4", "w4a8"):
            return f"{self.kind}_g{self.group_size}{'_asym' if self.has_zeros else ''}"
        return self.kind


@dataclasses.dataclass(frozen=True)
class ColumnTiles:
    """Every weight tensor as ``[ceil(N / tile), K', tile]``: each tile of ``tile`` output channels
    contiguous, so a kernel streams a tile front to back and vectorizes across its channels.
    ``row_block``: the integer-dot GEMMs (``w8a8``) run over their rows padded with zero rows to a
    multiple of this, the row block of the chip's tile or register tile (it changes no weight)."""

    tile: int
    row_block: int = ROW_BLOCK

    @property
    def tag(self) -> str:
        return f"t{self.tile}" + (f"r{self.row_block}" if self.row_block != ROW_BLOCK else "")

    def pack(self, matrix: np.ndarray) -> np.ndarray:
        """``[R, N]`` -> ``[ceil(N / tile), R, tile]`` (columns past ``N`` are zero padding)."""
        return to_column_tiles(matrix, self.tile)

    def unpack(self, tiled: np.ndarray, n: int) -> np.ndarray:
        return from_column_tiles(tiled, n)

    def pack_quads(self, codes: np.ndarray, k_padded: int, pad_code: int) -> np.ndarray:
        """int4 ``codes[K, N]`` as nibble quads in these tiles, ``K`` padded with ``pad_code`` to
        ``k_padded`` rows and ``N`` to whole tiles."""
        return pack_int4_quads(self._padded_codes(codes, k_padded, pad_code), self.tile)

    def pack_byte_quads(self, codes: np.ndarray, k_padded: int, pad_code: int) -> np.ndarray:
        """uint8 ``codes[K, N]`` as byte quads in these tiles, padded as :meth:`pack_quads` pads."""
        return pack_byte_quads(self._padded_codes(codes, k_padded, pad_code), self.tile)

    def _padded_codes(self, codes: np.ndarray, k_padded: int, pad_code: int) -> np.ndarray:
        k, n = codes.shape
        padded = np.full((k_padded, self.padded(n)), pad_code, np.uint8)
        padded[:k, :n] = codes
        return padded

    def padded(self, n: int) -> int:
        """``n`` output channels rounded up to whole tiles (what the kernel computes)."""
        return -(-n // self.tile) * self.tile
