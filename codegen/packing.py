"""Bit layouts of packed weights, shared by the quantization passes and the kernels.

Weights are stored *k-major*: a linear layer ``y = x @ W.T`` with ``W[N, K]`` keeps its codes as
``[K', N]`` so that a kernel vectorizes across output channels (contiguous ``N``) and never needs a
horizontal reduction. int4 codes are unsigned nibbles (0..15) packed 8 per ``uint32`` along ``K``:
code ``k`` of a word sits in bits ``4 * (k % 8)``.

Integer-dot kernels (``w4a8``) take int4 codes as *nibble quads* instead (:func:`pack_int4_quads`):
per column tile and block of 8 inputs, 4 bytes per channel, byte ``j`` holding code ``k + j`` in its
low and code ``k + 4 + j`` in its high nibble, so that one vector load, a mask and a shift give two
vectors of 4 consecutive codes per channel: the operand of a 4-way byte dot product (x86
``vpdpbusd`` / ``vpmaddubsw``, ARM ``udot``). ``w8a8`` kernels take their 8-bit codes as *byte
quads* (:func:`pack_byte_quads`): per column tile and block of 4 inputs, the 4 codes of each
channel in consecutive bytes, one vector load per dot product.
"""

from __future__ import annotations

import numpy as np

INT4_PER_WORD = 8


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """``[K, N]`` codes in 0..15 -> ``[K // 8, N]`` uint32 (code ``k`` at bits ``4 * (k % 8)``)."""
    k, n = codes.shape
    if k % INT4_PER_WORD:
        raise ValueError(f"int4 packing needs K divisible by {INT4_PER_WORD}, got K={k}")
    if codes.min(initial=0) < 0 or codes.max(initial=0) > 15:
        raise ValueError("int4 codes must lie in 0..15")
    nibbles = codes.astype(np.uint32).reshape(k // INT4_PER_WORD, INT4_PER_WORD, n)
    shifts = (4 * np.arange(INT4_PER_WORD, dtype=np.uint32))[None, :, None]
    return np.bitwise_or.reduce(nibbles << shifts, axis=1).astype(np.uint32)


def unpack_int4(words: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_int4`: ``[K // 8, N]`` uint32 -> ``[K, N]`` uint8 codes."""
    kw, n = words.shape
    shifts = (4 * np.arange(INT4_PER_WORD, dtype=np.uint32))[None, :, None]
    return ((words[:, None, :] >> shifts) & 0xF).astype(np.uint8).reshape(kw * INT4_PER_WORD, n)


def to_column_tiles(matrix: np.ndarray, tile: int) -> np.ndarray:
    """``[R, N]`` -> ``[ceil(N / tile), R, tile]``: each tile of ``tile`` output channels contiguous.

    A GEMV then streams each tile's rows front to back instead of striding across the matrix.
    Columns past ``N`` are zero padding.
    """
    rows, n = matrix.shape
    tiles = -(-n // tile)
    padded = np.zeros((rows, tiles * tile), matrix.dtype)
    padded[:, :n] = matrix
    return np.ascontiguousarray(padded.reshape(rows, tiles, tile).transpose(1, 0, 2))


def from_column_tiles(tiled: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`to_column_tiles` for the first ``n`` columns."""
    tiles, rows, tile = tiled.shape
    return tiled.transpose(1, 0, 2).reshape(rows, tiles * tile)[:, :n]


def pack_int4_quads(codes: np.ndarray, tile: int) -> np.ndarray:
    """``[K, N]`` codes in 0..15 -> nibble quads ``[N / tile, K / 8, tile, 4]`` uint8 (see the module
    docstring); ``K`` a multiple of 8, ``N`` of ``tile``."""
    k, n = codes.shape
    if k % INT4_PER_WORD or n % tile:
        raise ValueError(f"nibble quads need K divisible by {INT4_PER_WORD} and N by {tile}, got K={k}, N={n}")
    if codes.min(initial=0) < 0 or codes.max(initial=0) > 15:
        raise ValueError("int4 codes must lie in 0..15")
    c = codes.astype(np.uint8).reshape(k // 8, 2, 4, n // tile, tile)  # block, half, j, tile, lane
    return np.ascontiguousarray((c[:, 0] | (c[:, 1] << 4)).transpose(2, 0, 3, 1))


def unpack_int4_quads(quads: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_int4_quads`: ``[N / tile, K / 8, tile, 4]`` -> ``[K, N]`` codes."""
    tiles, blocks, tile, _ = quads.shape
    halves = np.stack([quads & 0xF, quads >> 4], axis=2)  # tile, block, half, lane, j
    return np.ascontiguousarray(halves.transpose(1, 2, 4, 0, 3)).reshape(blocks * 8, tiles * tile)


def pack_byte_quads(codes: np.ndarray, tile: int) -> np.ndarray:
    """``[K, N]`` uint8 codes -> byte quads ``[N / tile, K / 4, tile, 4]`` (byte ``j`` of channel
    ``l`` in block ``b`` is code ``4b + j`` of channel ``tile * t + l``); ``K`` a multiple of 4, ``N``
    of ``tile``."""
    k, n = codes.shape
    if k % 4 or n % tile or codes.dtype != np.uint8:
        raise ValueError(f"byte quads need uint8 codes, K divisible by 4 and N by {tile}, "
                         f"got {codes.dtype} K={k}, N={n}")
    return np.ascontiguousarray(codes.reshape(k // 4, 4, n // tile, tile).transpose(2, 0, 3, 1))


def unpack_byte_quads(quads: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_byte_quads`: ``[N / tile, K / 4, tile, 4]`` -> ``[K, N]`` codes."""
    tiles, blocks, tile, _ = quads.shape
    return np.ascontiguousarray(quads.transpose(1, 3, 0, 2)).reshape(blocks * 4, tiles * tile)
