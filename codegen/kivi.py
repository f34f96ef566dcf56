"""The int4 KV cache of ``+kv4``, KIVI-style (Liu et al., 2024): layout, append, read-back, decode attention.

Positions ``[0, q)`` are quantized and ``[q, length)`` are kept in an fp16 window, where
``q = max(length - residual, 0) // group * group``: the most recent ``residual`` tokens are always
in float, and tokens join the quantized cache a whole key group at a time. Quantization is
asymmetric to 16 levels, ``x = code * scale + minimum``, ``scale = (max - min) / 15`` (fp16
``scale`` and ``minimum``; a constant group has scale 0 and codes 0):

* keys per channel: one scale and minimum per ``group`` consecutive positions and channel
  (``[1, kv_heads, capacity / group, head_dim]``), as keys' outlier channels need;
* values per token: one per position and ``group`` consecutive channels
  (``[1, kv_heads, capacity, head_dim / group]``).

Codes are packed two per byte, in nibble quads (4 bytes holding 8 codes: byte ``i`` the ``i``-th in
its low nibble and the ``4 + i``-th in its high one, as the ``w4a8`` weights of
:func:`.packing.pack_int4_quads`), so that decode's attention runs on a target's byte dot product
(its ``int4_dot`` step: one vector of int32 sums over a quad per lane):

* keys in tiles of ``TILE`` positions, ``uint8[1, kv_heads, capacity / TILE, head_dim / 8, TILE, 4]``:
  per block of 8 channels, each position's quad, so that a tile's scores are one vector (lanes are
  positions; ``group`` is a multiple of ``TILE``);
* values in blocks of 8 positions, ``uint8[1, kv_heads, capacity / 8, head_dim, 4]``: per block,
  each channel's quad over the block's positions (lanes are channels).

The window ``fp16[1, kv_heads, residual + group, head_dim]`` holds position ``p`` at
``p % (residual + group)``.

Codes round ``(x - minimum) / scale`` half to even in float32, with ``x``, ``minimum`` and
``scale`` as stored (fp16 widened), so numpy reproduces them bit for bit.
"""

from __future__ import annotations

import dataclasses

from tvm import te, tirx, topi
from tvm.script import tirx as T

from .attention import APPEND_TAG, DEQUANTIZE_TAG, HEADS_PER_KV_ATTR, TILE, padded_cache_shape
from .kernels import KERNEL_ATTR

KIVI_ATTENTION_TAG = "decode_attention_kivi"
KIVI_GROUP_ATTR = "lowbit.kv4_group"  # the attention kernel's group size, for its schedule
LEVELS = 15
QUERY_LEVELS = 127  # decode's query, times the keys' scales, in int8 per key group (see attention_kernel)
QUAD = 4  # bytes of a nibble quad: 8 codes (a key's channels, or a value channel's positions)
VALUE_BLOCK = 2 * QUAD  # positions of a value block: one quad per channel
SCALE_DTYPE = "float16"


@dataclasses.dataclass(frozen=True)
class Kivi:
    """The int4 cache of ``kv_heads`` heads of ``head_dim`` channels (see the module docstring)."""

    kv_heads: int
    head_dim: int
    group: int
    residual: int

    @property
    def window(self) -> int:
        return self.residual + self.group

    def buffers(self, role: str) -> tuple:
        """``(suffix, dims, dtype)`` of each tensor of a ``key`` or ``value`` cache, in argument order."""
        h, d, g = self.kv_heads, self.head_dim, self.group
        stats = (1, h, f"capacity/{g}", d) if role == "key" else (1, h, "capacity", d // g)
        codes = self._codes_shape(role, f"capacity/{TILE if role == 'key' else VALUE_BLOCK}")
        return (("", codes, "uint8"), (".scale", stats, SCALE_DTYPE),
                (".min", stats, SCALE_DTYPE), (".window", (1, h, self.window, d), SCALE_DTYPE))

    def _codes_shape(self, role: str, extent) -> tuple:
        """The codes' shape whose capacity axis has ``extent`` entries: tiles (keys) or blocks of
        ``VALUE_BLOCK`` positions (values)."""
        h, d = self.kv_heads, self.head_dim
        return (1, h, extent, d // (2 * QUAD), TILE, QUAD) if role == "key" else (1, h, extent, d, QUAD)

    def _byte(self, role: str, h, position, channel) -> tuple:
        """Where the code of ``position``, ``channel`` is (see the module docstring): the index of
        its byte, and 1 if it is the byte's high nibble, else 0."""
        if role == "key":
            return ((0, h, position // TILE, channel // (2 * QUAD), position % TILE, channel % QUAD),
                    channel // QUAD % 2)
        return (0, h, position // VALUE_BLOCK, channel, position % QUAD), position // QUAD % 2

    def quantized_end(self, length):
        """Positions ``[0, quantized_end)`` of a conversation of ``length`` are quantized."""
        return tirx.max(length - self.residual, 0) // self.group * self.group

    # -- append ------------------------------------------------------------------------------------
    def append_kernel(self, role: str, dtype: str = "float32") -> tirx.PrimFunc:
        """Arguments ``(codes, scale, min, window, new, past)``, in place on the first four: the
        positions that join the quantized cache are quantized (read from the window or from
        ``new``), then ``new``'s positions still in float are written into the window."""
        heads, dim, group, residual, window = self.kv_heads, self.head_dim, self.group, self.residual, self.window
        half = dim // 2
        keys = role == "key"
        # a statistics row covers ``group`` positions of one channel (keys) or ``group`` channels of
        # one position (values): position = start + row * row_step + t, channel = column * column_step + t'
        row_positions, column_channels = (group, 1) if keys else (1, group)
        columns = dim // column_channels

        def stored(win, new, h, position, channel, past):
            """The conversation's ``position`` as the cache keeps it (fp16), from the window or ``new``."""
            return T.Cast(SCALE_DTYPE, T.if_then_else(
                position < past, T.Cast("float32", win[0, h, position % window, channel]),
                T.Cast("float32", new[0, h, position - past, channel])))

        def member(start, r, c, t):
            """``(position, channel)`` of element ``t`` of statistics row ``r``, column ``c``."""
            return (start + r * row_positions + t * (row_positions // group),
                    c * column_channels + t * (column_channels // group))

        def quantized(win, new, scale, low, h, position, channel, past):
            step = T.Cast("float32", scale[0, h, position // row_positions, channel // column_channels])
            minimum = T.Cast("float32", low[0, h, position // row_positions, channel // column_channels])
            x = T.Cast("float32", stored(win, new, h, position, channel, past))
            return T.Cast("uint8", T.max(T.min(T.if_then_else(
                step > T.float32(0), T.nearbyint((x - minimum) / step), T.float32(0)), T.float32(LEVELS)),
                T.float32(0)))

        def low_channel(byte):  # the channel in a key byte's low nibble
            return byte // QUAD * 2 * QUAD + byte % QUAD

        def first(start, block, byte):  # the position in a value byte's low nibble
            return start + block * VALUE_BLOCK + byte

        @T.prim_func(private=True, s_tir=True)
        def append(var_codes: T.handle, var_scale: T.handle, var_min: T.handle, var_window: T.handle,
                   var_new: T.handle, past: T.int64):
            capacity = T.int64()
            seq = T.int64()
            rows = T.int64()
            codes = T.match_buffer(var_codes, self._codes_shape(role, capacity), "uint8")
            scale = T.match_buffer(var_scale, (1, heads, rows, columns), SCALE_DTYPE)
            low = T.match_buffer(var_min, (1, heads, rows, columns), SCALE_DTYPE)
            win = T.match_buffer(var_window, (1, heads, window, dim), SCALE_DTYPE)
            new = T.match_buffer(var_new, (1, heads, seq, dim), dtype)
            start = T.max(past - residual, T.int64(0)) // group * group
            end = T.max(past + seq - residual, T.int64(0)) // group * group
            # each statistics row's range (its max kept in ``scale`` until the next block)
            for h, r, c, t in T.grid(heads, (end - start) // row_positions, columns, group):
                with T.sblock("range"):
                    vh, vr, vc, vt = T.axis.remap("SSSR", [h, r, c, t])
                    with T.init():
                        low[0, vh, start // row_positions + vr, vc] = T.max_value(SCALE_DTYPE)
                        scale[0, vh, start // row_positions + vr, vc] = T.min_value(SCALE_DTYPE)
                    low[0, vh, start // row_positions + vr, vc] = T.min(
                        low[0, vh, start // row_positions + vr, vc],
                        stored(win, new, vh, *member(start, vr, vc, vt), past))
                    scale[0, vh, start // row_positions + vr, vc] = T.max(
                        scale[0, vh, start // row_positions + vr, vc],
                        stored(win, new, vh, *member(start, vr, vc, vt), past))
            for h, r, c in T.grid(heads, (end - start) // row_positions, columns):
                with T.sblock("scale"):
                    vh, vr, vc = T.axis.remap("SSS", [h, r, c])
                    scale[0, vh, start // row_positions + vr, vc] = T.Cast(SCALE_DTYPE, (
                        T.Cast("float32", scale[0, vh, start // row_positions + vr, vc])
                        - T.Cast("float32", low[0, vh, start // row_positions + vr, vc])) / T.float32(LEVELS))
            if keys:  # byte ``c`` of a position: channels ``low_channel(c)`` and ``low_channel(c) + QUAD``
                for h, p, c in T.grid(heads, end - start, half):
                    with T.sblock("quantize"):
                        vh, vp, vc = T.axis.remap("SSS", [h, p, c])
                        codes[self._byte(role, vh, start + vp, low_channel(vc))[0]] = (
                            quantized(win, new, scale, low, vh, start + vp, low_channel(vc), past)
                            | (quantized(win, new, scale, low, vh, start + vp, low_channel(vc) + QUAD, past)
                               << T.uint8(4)))
            else:  # byte ``i`` of a channel in block ``b``: positions ``first(b, i)`` and ``first(b, i) + QUAD``
                for h, b, c, i in T.grid(heads, (end - start) // VALUE_BLOCK, dim, QUAD):
                    with T.sblock("quantize"):
                        vh, vb, vc, vi = T.axis.remap("SSSS", [h, b, c, i])
                        codes[self._byte(role, vh, first(start, vb, vi), vc)[0]] = (
                            quantized(win, new, scale, low, vh, first(start, vb, vi), vc, past)
                            | (quantized(win, new, scale, low, vh, first(start, vb, vi) + QUAD, vc, past)
                               << T.uint8(4)))
            for h, i, c in T.grid(heads, seq, dim):
                with T.sblock("window"):
                    vh, vi, vc = T.axis.remap("SSS", [h, i, c])
                    T.where(past + i >= end)
                    win[0, vh, (past + vi) % window, vc] = T.Cast(SCALE_DTYPE, new[0, vh, vi, vc])

        return append.with_attr(KERNEL_ATTR, APPEND_TAG)

    # -- read back ---------------------------------------------------------------------------------
    def _reader(self, role: str):
        """Placeholders of a ``key`` or ``value`` cache's tensors, each capacity axis its own variable."""
        keys = role == "key"
        codes = te.placeholder(self._codes_shape(role, tirx.Var("capacity", "int64")), "uint8", f"{role}_codes")
        rows = tirx.Var("rows", "int64")
        stat_shape = (1, self.kv_heads, rows, self.head_dim if keys else self.head_dim // self.group)
        scale = te.placeholder(stat_shape, SCALE_DTYPE, f"{role}_scale")
        low = te.placeholder(stat_shape, SCALE_DTYPE, f"{role}_min")
        win = te.placeholder((1, self.kv_heads, self.window, self.head_dim), SCALE_DTYPE, f"{role}_window")
        return (codes, scale, low, win)

    def _code(self, role, codes, h, j, channel, dtype):
        """The code of position ``j``, ``channel``."""
        index, high = self._byte(role, h, j, channel)
        return ((codes[index] >> (high * 4).astype("uint8")) & tirx.const(LEVELS, "uint8")).astype(dtype)

    def _stat_index(self, role, j, channel):
        return (j // self.group, channel) if role == "key" else (j, channel // self.group)

    def dequantize_kernel(self, role: str, dtype: str = "float32", float_layout: bool = False) -> tirx.PrimFunc:
        """Positions ``[0, length)`` as floats; arguments ``(codes, scale, min, window, length, out)``.

        ``out`` is ``[1, kv_heads, length, head_dim]``, or with ``float_layout`` the float cache's
        layout for ``role`` (:func:`.attention.padded_cache_shape`: keys tiled, ``length`` rounded
        up to whole chunks), the positions past ``length`` zero: what the float prompt attention reads.
        """
        codes, scale, low, win = self._reader(role)
        length = tirx.Var("length", "int64")
        end = self.quantized_end(length)

        def element(h, j, c):
            row, column = self._stat_index(role, j, c)
            quantized = (self._code(role, codes, h, j, c, dtype) * scale[0, h, row, column].astype(dtype)
                         + low[0, h, row, column].astype(dtype))
            return tirx.if_then_else(j < end, quantized, win[0, h, j % self.window, c].astype(dtype))

        if not float_layout:
            out = te.compute((1, self.kv_heads, length, self.head_dim), lambda _b, h, j, c: element(h, j, c),
                             "dequantize")
        else:
            tiled = role == "key"

            def padded(_b, h, *index):  # (tile, channel, position in tile) or (position, channel)
                j, c = (index[0] * TILE + index[2], index[1]) if tiled else index
                return tirx.Select(j < length, element(h, tirx.min(j, length - 1), c), tirx.const(0, dtype))

            out = te.compute(padded_cache_shape(self.kv_heads, self.head_dim, length, tiled), padded, "dequantize")
        return te.create_prim_func([codes, scale, low, win, length, out]).with_attr(KERNEL_ATTR, DEQUANTIZE_TAG)

    # -- decode attention ----------------------------------------------------------------------------
    def attention_kernel(self, q_heads: int, scale: float, bias_heads: int | None,
                         dtype: str = "float32") -> tirx.PrimFunc:
        """One query token's attention over the cache as stored; arguments ``(q, *key buffers,
        *value buffers[, bias], length, out)`` as :func:`~lowbit.codegen.attention.decode_attention_kernel`.

        Quantized keys: ``q . k = sum_c (q_c scale_c) code_c + sum_c q_c min_c`` with both per-group
        terms computed once per key group; the first as integer dot products: per query head and key
        group, ``q_c scale_c`` is quantized to int8, symmetric (``step = max_c |q_c scale_c| / 127``,
        codes rounded half to even), and ``step * sum_c qcode_c code_c`` summed in int32.
        Quantized values: the softmax weight times the value's scale (once per position and channel
        group) the same way, int8 with one step per block of 8 positions and channel group (so a
        block's small weights keep their share next to a large one elsewhere), ``step * sum_j
        wcode_j code_j`` per block in int32; the minimums' share once per head in float. (llama.cpp
        also quantizes the query against its quantized caches; here the int8 steps cost SmolLM2's
        kv4 perplexity far less than the cache's own quantization: see bench/RESULTS.md.) Positions in
        the window are read in fp16 and widened. Before the first group is quantized some reductions
        are empty: a schedule must give every reduction its initialization outside its loop
        (:mod:`lowbit.targets.simd` does), as TIR otherwise initializes in the first iteration.
        """
        heads, dim, group, window = self.kv_heads, self.head_dim, self.group, self.window
        per = q_heads // heads
        length = tirx.Var("length", "int64")
        end = self.quantized_end(length)
        recent = length - end
        q = te.placeholder((1, q_heads, 1, dim), dtype, "q")
        key_codes, key_scale, key_min, key_win = self._reader("key")
        value_codes, value_scale, value_min, value_win = self._reader("value")
        bias = None if bias_heads is None else te.placeholder((1, bias_heads, 1, length), dtype, "bias")

        def f32(x):
            return x.astype(dtype)

        scaled_q = te.compute((q_heads, end // group, dim),
                              lambda h, g, c: q[0, h, 0, c] * f32(key_scale[0, h // per, g, c]), "scaled_q")
        c = te.reduce_axis((0, dim), "c")
        offset = te.compute((q_heads, end // group),
                            lambda h, g: te.sum(q[0, h, 0, c] * f32(key_min[0, h // per, g, c]), axis=c), "offset")
        c = te.reduce_axis((0, dim), "c")
        q_peak = te.compute((q_heads, end // group), lambda h, g: te.max(tirx.abs(scaled_q[h, g, c]), axis=c),
                            "q_peak")
        q_step = te.compute((q_heads, end // group), lambda h, g: q_peak[h, g] / tirx.const(QUERY_LEVELS, dtype),
                            "q_step")
        q_codes = te.compute((q_heads, end // group, dim), lambda h, g, c: tirx.Select(
            q_step[h, g] > tirx.const(0, dtype), tirx.nearbyint(scaled_q[h, g, c] / q_step[h, g]),
            tirx.const(0, dtype)).astype("int8"), "q_codes")
        quad, nibble, i = (te.reduce_axis((0, dim // (2 * QUAD)), "quad"), te.reduce_axis((0, 2), "nibble"),
                           te.reduce_axis((0, QUAD), "i"))
        # the key group as tile // tiles-per-group: one index for a whole vectorized tile (not a gather)
        dots = te.compute((q_heads, end), lambda h, j: te.sum(
            ((key_codes[0, h // per, j // TILE, quad, j % TILE, i] >> (nibble * 4).astype("uint8"))
             & tirx.const(LEVELS, "uint8")).astype("int32")
            * q_codes[h, j // TILE // (group // TILE), quad * 2 * QUAD + nibble * QUAD + i].astype("int32"),
            axis=[quad, nibble, i]), "dots")
        c = te.reduce_axis((0, dim), "c")
        recent_dots = te.compute((q_heads, recent), lambda h, i: te.sum(
            q[0, h, 0, c] * f32(key_win[0, h // per, (end + i) % window, c]), axis=c), "recent_dots")

        def biased(score, h, j):
            score = score * tirx.const(scale, dtype)
            return score if bias is None else score + bias[0, h if bias_heads > 1 else 0, 0, j]

        # the softmax over both parts: one peak and one total, each part's exponentials apart
        logits = te.compute((q_heads, end), lambda h, j: biased(
            f32(dots[h, j]) * q_step[h, j // group] + offset[h, j // group], h, j), "logits")
        recent_logits = te.compute((q_heads, recent), lambda h, i: biased(recent_dots[h, i], h, end + i),
                                   "recent_logits")
        peak = _combined(te.max, tirx.max, logits, recent_logits, "peak")
        weights = topi.fast_exp(te.compute((q_heads, end), lambda h, j: logits[h, j] - peak[h], "shifted"))
        recent_weights = topi.fast_exp(te.compute((q_heads, recent), lambda h, i: recent_logits[h, i] - peak[h],
                                                  "recent_shifted"))
        total = _combined(te.sum, lambda a, b: a + b, weights, recent_weights, "total")

        groups = dim // group  # the probabilities (normalized before the accumulation) times the value scale
        weighted_scale = te.compute((q_heads, groups, end), lambda h, g, j: weights[h, j] / total[h] * f32(
            value_scale[0, h // per, j, g]), "weighted_scale")
        j = te.reduce_axis((0, end), "j")
        weighted_min = te.compute((q_heads, groups), lambda h, g: te.sum(
            weights[h, j] * f32(value_min[0, h // per, j, g]), axis=j), "weighted_min")
        # those in int8, one step per value block, in int32 dot products per block
        block = VALUE_BLOCK
        j = te.reduce_axis((0, block), "j")
        p_peak = te.compute((q_heads, groups, end // block), lambda h, g, b: te.max(
            weighted_scale[h, g, b * block + j], axis=j), "p_peak")
        p_step = te.compute((q_heads, groups, end // block), lambda h, g, b: p_peak[h, g, b] / tirx.const(
            QUERY_LEVELS, dtype), "p_step")
        p_codes = te.compute((q_heads, groups, end // block, block), lambda h, g, b, j: tirx.Select(
            p_step[h, g, b] > tirx.const(0, dtype), tirx.nearbyint(weighted_scale[h, g, b * block + j] / p_step[
                h, g, b]), tirx.const(0, dtype)).astype("int8"), "p_codes")
        nibble, i = te.reduce_axis((0, 2), "nibble"), te.reduce_axis((0, QUAD), "i")
        mixed_blocks = te.compute((q_heads, end // block, groups, group), lambda h, b, g, e: te.sum(
            ((value_codes[0, h // per, b, g * group + e, i] >> (nibble * 4).astype("uint8"))
             & tirx.const(LEVELS, "uint8")).astype("int32")
            * p_codes[h, g, b, nibble * QUAD + i].astype("int32"), axis=[nibble, i]), "mixed_blocks")
        b = te.reduce_axis((0, end // block), "b")
        mixed = te.compute((q_heads, dim), lambda h, e: te.sum(
            f32(mixed_blocks[h, b, e // group, e % group]) * p_step[h, e // group, b], axis=b), "mixed")
        i = te.reduce_axis((0, recent), "i")
        recent_mixed = te.compute((q_heads, dim), lambda h, e: te.sum(
            recent_weights[h, i] * f32(value_win[0, h // per, (end + i) % window, e]), axis=i), "recent_mixed")
        # (the terms in this order keep every softmax stage before the accumulation in the function)
        out = te.compute((1, q_heads, 1, dim), lambda _b, h, _s, e: (
            weighted_min[h, e // group] + recent_mixed[h, e]) / total[h] + mixed[h, e], "out")
        inputs = [q, key_codes, key_scale, key_min, key_win, value_codes, value_scale, value_min, value_win]
        func = te.create_prim_func([*inputs, *([] if bias is None else [bias]), length, out])
        return (func.with_attr(KERNEL_ATTR, KIVI_ATTENTION_TAG).with_attr(HEADS_PER_KV_ATTR, per)
                .with_attr(KIVI_GROUP_ATTR, group))


def _combined(reduce, combine, first: te.Tensor, second: te.Tensor, name: str) -> te.Tensor:
    """``combine`` of ``reduce`` over the last axis of two ``[heads, n]`` tensors, per head."""
    def part(index: int, tensor: te.Tensor) -> te.Tensor:
        axis = te.reduce_axis((0, tensor.shape[1]), "j")
        return te.compute(tensor.shape[:1], lambda h: reduce(tensor[h, axis], axis=axis), f"{name}_{index}")

    parts = [part(0, first), part(1, second)]
    return te.compute(first.shape[:1], lambda h: combine(parts[0][h], parts[1][h]), name)
