"""Kernels of the in-place KV cache: the cache write and decode's attention over the cache.

The cache of one layer's keys (or values) is a few tensors the runtime allocates once, each with a
``capacity`` axis of positions (symbolic, so one kernel serves any allocation; a multiple of
``TILE``):

* values, float: ``[1, kv_heads, capacity, head_dim]``;
* keys, float: in tiles of ``TILE`` positions with the position innermost,
  ``[1, kv_heads, capacity / TILE, head_dim, TILE]``, so that decode's scores for a tile of
  positions are one vector accumulated over the channels (no horizontal sums);
* float16 (``kv16``): the same layouts, half the bytes, widened to the model's float as read;
* int8 (``kv8``): codes in the same layouts (``int8``) and one ``float32`` scale per position and
  head ``[1, kv_heads, capacity]``, symmetric: ``x = code * scale``, ``scale = max|x| / 127`` over
  the head's channels.

Kernels:

* :func:`kv_append_kernel` / :func:`kv8_append_kernel` write ``new[1, kv_heads, seq, head_dim]`` at
  positions ``[past, past + seq)``, in place (``call_tir_inplace`` on the cache's tensors), the
  int8 one quantizing as it writes;
* :func:`kv_read_kernel` / :func:`kv8_dequantize_kernel` read positions ``[0, length)`` back as
  ``[1, kv_heads, length, head_dim]`` floats (for the attention of a prompt, a GEMM-shaped product
  over the whole prefix);
* :func:`decode_attention_kernel` is one query token's attention over positions ``[0, length)`` of
  the key and value caches, read in place through :class:`CacheReader` s (int8 codes are widened
  in registers, their scale applied once per position): query head ``h`` reads KV head
  ``h // (q_heads // kv_heads)`` (grouped-query attention); it computes whole chunks of ``CHUNK``
  positions, those past the length masked out (their scores, and their values' weights, are never
  used), so a cache's capacity is a multiple of ``CHUNK``; scores are ``q . k * scale (+ bias)``,
  softmax as ``exp(x - max) / sum`` with TVM's ``fast_exp`` (relative error below 1e-6 on the
  softmax's range, measured against numpy in the kernel tests);
* :func:`prompt_attention_kernel` is the same for ``seq`` query tokens (a prompt, or a chunk of
  one) in one call: GEMM-shaped scores over whole ``ROWS`` x ``CHUNK`` blocks (rows past ``seq``
  repeat the last query, positions past the length are masked), the softmax per row, then the
  probabilities times the values; no copy of the cache, no repetition of KV heads.

A layer whose attention sees only the last ``window`` positions (a sliding-window layer) may keep
its cache as a ring: position ``p`` at slot ``p % capacity``, the capacity at least ``window`` plus
the tokens one call writes, so that every position a query of the call can see is still held once
the call's keys are written. The ``ring`` variants of the kernels index slots that way: the
append writes at ``(past + i) % capacity``, the read-back reads position ``j`` from slot
``j % capacity`` (positions the ring no longer holds read a later position's entry: what reads
them must mask them, as a window's mask does), and the attention kernels run over the slots
holding the last ``min(length, capacity)`` positions, each slot's score biased by its position's
bias (the graph's mask, by position), which masks whatever the window excludes.

All carry ``lowbit.kernel`` so that a target's rules (:mod:`lowbit.targets.simd`) schedule them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from tvm import te, tirx, topi
from tvm.script import tirx as T

from .kernels import KERNEL_ATTR

APPEND_TAG = "kv_append"
DEQUANTIZE_TAG = "kv_dequantize"
DECODE_ATTENTION_TAG = "decode_attention"
PROMPT_ATTENTION_TAG = "prompt_attention"
HEADS_PER_KV_ATTR = "lowbit.heads_per_kv"  # an attention kernel's query heads per KV head
INT8_LEVELS = 127
TILE = 16  # key positions per tile: one 512-bit vector of float scores
CHUNK = 64  # positions decode's attention computes in whole multiples of (a float or int8 cache's capacity too)
ROWS = 4  # query rows a prompt's attention computes together (its register tile's height)


def cache_shape(kv_heads: int, head_dim: int, extent, tiled: bool) -> tuple:
    """A cache's shape whose capacity axis has ``extent`` entries: tiles (keys, ``tiled``) or
    positions (values)."""
    return (1, kv_heads, extent, head_dim, TILE) if tiled else (1, kv_heads, extent, head_dim)


def whole_chunks(length):
    """``length`` positions rounded up to a whole number of ``CHUNK`` s (what the attention kernels compute over)."""
    return (length + CHUNK - 1) // CHUNK * CHUNK


def padded_cache_shape(kv_heads: int, head_dim: int, length, tiled: bool) -> tuple:
    """The shape of a float cache (keys ``tiled``) holding ``length`` positions in whole chunks."""
    padded = whole_chunks(length)
    return cache_shape(kv_heads, head_dim, padded // TILE if tiled else padded, tiled)


def cache_index(tiled: bool, h, position, channel) -> tuple:
    return (0, h, position // TILE, channel, position % TILE) if tiled else (0, h, position, channel)


def held_positions(length, capacity, ring: bool):
    """``(held, position)`` of a cache of ``capacity`` positions after ``length`` were written:
    how many slots hold a position (``[0, held)``) and the position slot ``s`` holds. Not a ring:
    ``length`` and ``s``. A ring: the last ``min(length, capacity)`` positions, ``position(s)`` the
    one of them at slot ``s``, that is ``start - start % capacity + s`` (plus ``capacity`` for the
    slots before ``start``'s, which wrapped) with ``start = length - held``."""
    if not ring:
        return length, lambda s: s
    held = tirx.min(length, capacity)
    start = length - held
    wrapped = tirx.floormod(start, capacity)
    return held, lambda s: start - wrapped + s + tirx.Select(s < wrapped, capacity, tirx.const(0, "int64"))


def slot_of(position, capacity, ring: bool):
    """The slot a cache of ``capacity`` positions keeps ``position`` in."""
    return tirx.floormod(position, capacity) if ring else position


@dataclasses.dataclass(frozen=True)
class CacheReader:
    """How an attention kernel reads one cache: its tensors (in argument order), the element without
    its per-position factor (keys: ``(kv_head, tile, channel, slot in tile)``; values:
    ``(kv_head, slot, channel)``) and that factor ``(kv_head, slot)``, or ``None``; ``capacity``: the
    slots it has."""

    tensors: tuple
    element: Callable
    capacity: tirx.PrimExpr
    factor: Callable | None = None


def float_cache(kv_heads: int, head_dim: int, name: str, tiled: bool, dtype: str = "float32",
                stored: str | None = None) -> CacheReader:
    """A float cache stored as ``stored`` (default ``dtype``), read as ``dtype``."""
    stored = stored or dtype
    cache = te.placeholder(cache_shape(kv_heads, head_dim, tirx.Var("capacity", "int64"), tiled), stored, name)
    capacity = _slots(cache, tiled)
    if stored == dtype:
        return CacheReader((cache,), lambda *index: cache[(0, *index)], capacity)
    return CacheReader((cache,), lambda *index: cache[(0, *index)].astype(dtype), capacity)


def _slots(tensor, tiled: bool):
    """The positions a cache tensor of :func:`cache_shape` has room for."""
    return tensor.shape[2] * TILE if tiled else tensor.shape[2]


def int8_cache(kv_heads: int, head_dim: int, name: str, tiled: bool, dtype: str = "float32") -> CacheReader:
    codes = te.placeholder(cache_shape(kv_heads, head_dim, tirx.Var("capacity", "int64"), tiled), "int8", name)
    scales = te.placeholder((1, kv_heads, tirx.Var("positions", "int64")), "float32", f"{name}_scale")
    return CacheReader((codes, scales), lambda *index: codes[(0, *index)].astype(dtype), _slots(codes, tiled),
                       lambda h, j: scales[0, h, j].astype(dtype))


def kv_append_kernel(kv_heads: int, head_dim: int, tiled: bool, dtype: str = "float32",
                     stored: str | None = None, ring: bool = False) -> tirx.PrimFunc:
    """``cache[position past + i] = new[0, h, i, d]`` (rounded to nearest even when the cache is
    ``stored`` in a narrower float than ``dtype``; at slot ``(past + i) % capacity`` in a ``ring``);
    arguments ``(cache, new, past)``, in place on ``cache``."""
    stored = stored or dtype
    per_entry = TILE if tiled else 1  # positions per entry of the capacity axis

    @T.prim_func(private=True, s_tir=True)
    def append(var_cache: T.handle, var_new: T.handle, past: T.int64):
        capacity = T.int64()
        seq = T.int64()
        cache = T.match_buffer(var_cache, cache_shape(kv_heads, head_dim, capacity, tiled), stored)
        new = T.match_buffer(var_new, (1, kv_heads, seq, head_dim), dtype)
        for h, i, d in T.grid(kv_heads, seq, head_dim):
            with T.sblock("append"):
                vh, vi, vd = T.axis.remap("SSS", [h, i, d])
                cache[cache_index(tiled, vh, slot_of(past + vi, capacity * per_entry, ring), vd)] = T.Cast(
                    stored, new[0, vh, vi, vd])

    return append.with_attr(KERNEL_ATTR, APPEND_TAG)


def kv8_append_kernel(kv_heads: int, head_dim: int, tiled: bool, dtype: str = "float32",
                      ring: bool = False) -> tirx.PrimFunc:
    """``new`` quantized into positions ``[past, past + seq)`` (slots, in a ``ring``, as
    :func:`kv_append_kernel` writes them); arguments ``(codes, scales, new, past)``,
    in place on ``codes`` and ``scales``. ``scale = max_d |new| / 127``, ``code = round(new * (127 /
    max))`` (half to even; 0 for an all-zero row)."""

    def inverse(peak):
        return T.if_then_else(peak > T.float32(0), T.float32(INT8_LEVELS) / peak, T.float32(0))

    @T.prim_func(private=True, s_tir=True)
    def append(var_codes: T.handle, var_scales: T.handle, var_new: T.handle, past: T.int64):
        capacity = T.int64()
        positions = T.int64()
        seq = T.int64()
        codes = T.match_buffer(var_codes, cache_shape(kv_heads, head_dim, capacity, tiled), "int8")
        scales = T.match_buffer(var_scales, (1, kv_heads, positions), "float32")
        new = T.match_buffer(var_new, (1, kv_heads, seq, head_dim), dtype)
        peak = T.sblock_alloc_buffer((kv_heads, seq), "float32")
        for h, i, d in T.grid(kv_heads, seq, head_dim):
            with T.sblock("peak"):
                vh, vi, vd = T.axis.remap("SSR", [h, i, d])
                with T.init():
                    peak[vh, vi] = T.float32(0)
                peak[vh, vi] = T.max(peak[vh, vi], T.fabs(T.Cast("float32", new[0, vh, vi, vd])))
        for h, i in T.grid(kv_heads, seq):
            with T.sblock("scale"):
                vh, vi = T.axis.remap("SS", [h, i])
                scales[0, vh, slot_of(past + vi, positions, ring)] = peak[vh, vi] / T.float32(INT8_LEVELS)
        for h, i, d in T.grid(kv_heads, seq, head_dim):
            with T.sblock("quantize"):
                vh, vi, vd = T.axis.remap("SSS", [h, i, d])
                codes[cache_index(tiled, vh, slot_of(past + vi, positions, ring), vd)] = T.Cast("int8", T.nearbyint(
                    T.Cast("float32", new[0, vh, vi, vd]) * inverse(peak[vh, vi])))

    return append.with_attr(KERNEL_ATTR, APPEND_TAG)


def _read_back(reader: CacheReader, kv_heads: int, head_dim: int, tiled: bool, ring: bool) -> tirx.PrimFunc:
    length = tirx.Var("length", "int64")

    def element(_b, h, j, d):
        slot = slot_of(j, reader.capacity, ring)
        value = reader.element(h, slot // TILE, d, slot % TILE) if tiled else reader.element(h, slot, d)
        return value if reader.factor is None else value * reader.factor(h, slot)

    out = te.compute((1, kv_heads, length, head_dim), element, "dequantize")
    return te.create_prim_func([*reader.tensors, length, out]).with_attr(KERNEL_ATTR, DEQUANTIZE_TAG)


def kv_read_kernel(kv_heads: int, head_dim: int, tiled: bool, dtype: str = "float32",
                   stored: str | None = None, ring: bool = False) -> tirx.PrimFunc:
    """Positions ``[0, length)`` of a float cache (stored as ``stored``, read as ``dtype``; a
    ``ring``'s slots as the module docstring says); arguments ``(cache, length, out)``."""
    return _read_back(float_cache(kv_heads, head_dim, "cache", tiled, dtype, stored), kv_heads, head_dim, tiled,
                      ring)


def kv8_dequantize_kernel(kv_heads: int, head_dim: int, tiled: bool, dtype: str = "float32",
                          ring: bool = False) -> tirx.PrimFunc:
    """Positions ``[0, length)`` of an int8 cache as floats (a ``ring``'s slots as the module
    docstring says); arguments ``(codes, scales, length, out)``."""
    return _read_back(int8_cache(kv_heads, head_dim, "codes", tiled, dtype), kv_heads, head_dim, tiled, ring)


def decode_attention_kernel(q_heads: int, kv_heads: int, head_dim: int, scale: float, bias_heads: int | None,
                            keys: CacheReader, values: CacheReader, dtype: str = "float32",
                            ring: bool = False) -> tirx.PrimFunc:
    """Attention of one query token; arguments ``(q, *keys.tensors, *values.tensors[, bias], length, out)``.

    ``q[1, q_heads, 1, head_dim]``; the keys (tiled) and values, positions ``[0, length)`` read;
    ``bias[1, bias_heads, 1, length]`` (``bias_heads`` 1 or ``q_heads``, or no bias when ``None``)
    added to the scaled scores; ``out[1, q_heads, 1, head_dim]``. Requires ``q_heads`` a multiple of
    ``kv_heads`` and ``length`` at most the caches' capacity, or, in a ``ring``, the positions the
    bias does not mask among the last ``capacity``.
    """
    group = q_heads // kv_heads
    length = tirx.Var("length", "int64")
    held, position = held_positions(length, keys.capacity, ring)
    padded = whole_chunks(held)  # no loop over slots needs a predicate
    last = held - 1
    q = te.placeholder((1, q_heads, 1, head_dim), dtype, "q")
    bias = None if bias_heads is None else te.placeholder((1, bias_heads, 1, length), dtype, "bias")

    d = te.reduce_axis((0, head_dim), "d")
    dots = te.compute((q_heads, padded), lambda h, j: te.sum(
        q[0, h, 0, d] * keys.element(h // group, j // TILE, d, j % TILE), axis=d), "dots")

    def logit(h, j):  # the positions past the length (in the last chunk, inside the capacity) masked out
        scaled = dots[h, j] * tirx.const(scale, dtype)
        if keys.factor is not None:
            scaled = scaled * keys.factor(h // group, j)
        if bias is not None:
            scaled = scaled + bias[0, h if bias_heads > 1 else 0, 0, position(tirx.min(j, last))]
        return tirx.Select(j < held, scaled, tirx.min_value(dtype))

    logits = te.compute((q_heads, padded), logit, "logits")
    j = te.reduce_axis((0, padded), "j")
    peak = te.compute((q_heads,), lambda h: te.max(logits[h, j], axis=j), "peak")
    shifted = te.compute((q_heads, padded), lambda h, i: logits[h, i] - peak[h], "shifted")
    weights = topi.fast_exp(shifted)  # a polynomial LLVM vectorizes (libm's expf is a call per score)
    j = te.reduce_axis((0, padded), "j")
    total = te.compute((q_heads,), lambda h: te.sum(weights[h, j], axis=j), "total")

    def probability(h, i):  # normalized before the accumulation; a value's per-position scale folded in
        p = weights[h, i] / total[h]
        if values.factor is not None:
            p = p * values.factor(h // group, i)
        return tirx.Select(i < held, p, tirx.const(0, dtype))

    probabilities = te.compute((q_heads, padded), probability, "probabilities")
    j = te.reduce_axis((0, padded), "j")  # a masked position weighs 0 on the last written value
    mixed = te.compute((q_heads, head_dim), lambda h, e: te.sum(
        probabilities[h, j] * values.element(h // group, tirx.min(j, last), e), axis=j), "mixed")
    out = te.compute((1, q_heads, 1, head_dim), lambda _b, h, _s, e: mixed[h, e], "out")
    inputs = [q, *keys.tensors, *values.tensors] + ([] if bias is None else [bias])
    func = te.create_prim_func([*inputs, length, out])
    return func.with_attr(KERNEL_ATTR, DECODE_ATTENTION_TAG).with_attr(HEADS_PER_KV_ATTR, group)


def prompt_attention_kernel(q_heads: int, kv_heads: int, head_dim: int, scale: float, bias_heads: int | None,
                            keys: CacheReader, values: CacheReader, dtype: str = "float32",
                            ring: bool = False) -> tirx.PrimFunc:
    """Attention of ``seq`` query tokens; arguments ``(q, *keys.tensors, *values.tensors[, bias], length, out)``.

    ``q[1, q_heads, seq, head_dim]``; the keys (tiled) and values, positions ``[0, length)`` read;
    ``bias[1, bias_heads, seq, length]`` (``bias_heads`` 1 or ``q_heads``; ``None``: no bias, every
    query sees every position) added to the scaled scores, so causality and any window are the
    graph's mask, as imported; ``out[1, q_heads, seq, head_dim]``. Requires ``q_heads`` a multiple
    of ``kv_heads``, caches of a capacity of at least ``length`` rounded up to a whole ``CHUNK``
    (what is stored past ``length`` is never used, NaN included) and every row's bias finite
    somewhere (true of a causal mask: a token always sees itself). A ``ring`` reads its slots as
    :func:`decode_attention_kernel` does.

    The scores, the softmax and the value sums are computed over ``ROWS``-aligned rows (rows past
    ``seq`` repeat the last query and are not stored) and ``CHUNK``-aligned positions (masked), so
    no loop of the three stages carries a predicate.
    """
    group = q_heads // kv_heads
    seq = tirx.Var("seq", "int64")
    length = tirx.Var("length", "int64")
    rows = (seq + ROWS - 1) // ROWS * ROWS
    held, position = held_positions(length, keys.capacity, ring)
    padded = whole_chunks(held)
    last_row, last = seq - 1, held - 1
    q = te.placeholder((1, q_heads, seq, head_dim), dtype, "q")
    bias = None if bias_heads is None else te.placeholder((1, bias_heads, seq, length), dtype, "bias")

    d = te.reduce_axis((0, head_dim), "d")
    dots = te.compute((q_heads, rows, padded), lambda h, i, j: te.sum(
        q[0, h, tirx.min(i, last_row), d] * keys.element(h // group, j // TILE, d, j % TILE), axis=d), "dots")

    if bias is not None:  # on whole blocks once, so that the softmax's vector loops read it contiguously
        mask = te.compute((bias_heads, rows, padded), lambda h, i, j: tirx.Select(
            j < held, bias[0, h, tirx.min(i, last_row), position(tirx.min(j, last))], tirx.const(0, dtype)), "mask")

    def logit(h, i, j):
        scaled = dots[h, i, j] * tirx.const(scale, dtype)
        if keys.factor is not None:
            scaled = scaled * keys.factor(h // group, j)
        if bias is not None:
            scaled = scaled + mask[h if bias_heads > 1 else 0, i, j]
        return tirx.Select(j < held, scaled, tirx.min_value(dtype))

    logits = te.compute((q_heads, rows, padded), logit, "logits")
    j = te.reduce_axis((0, padded), "j")
    peak = te.compute((q_heads, rows), lambda h, i: te.max(logits[h, i, j], axis=j), "peak")
    shifted = te.compute((q_heads, rows, padded), lambda h, i, k: logits[h, i, k] - peak[h, i], "shifted")
    weights = topi.fast_exp(shifted)
    j = te.reduce_axis((0, padded), "j")
    total = te.compute((q_heads, rows), lambda h, i: te.sum(weights[h, i, j], axis=j), "total")

    def probability(h, i, k):
        p = weights[h, i, k] / total[h, i]
        if values.factor is not None:
            p = p * values.factor(h // group, k)  # inside the capacity; past the length, masked
        return tirx.Select(k < held, p, tirx.const(0, dtype))

    probabilities = te.compute((q_heads, rows, padded), probability, "probabilities")
    j = te.reduce_axis((0, padded), "j")
    mixed = te.compute((q_heads, rows, head_dim), lambda h, i, e: te.sum(
        probabilities[h, i, j] * values.element(h // group, tirx.min(j, last), e), axis=j), "mixed")
    out = te.compute((1, q_heads, seq, head_dim), lambda _b, h, i, e: mixed[h, i, e], "out")
    inputs = [q, *keys.tensors, *values.tensors] + ([] if bias is None else [bias])
    func = te.create_prim_func([*inputs, length, out])
    return func.with_attr(KERNEL_ATTR, PROMPT_ATTENTION_TAG).with_attr(HEADS_PER_KV_ATTR, group)
