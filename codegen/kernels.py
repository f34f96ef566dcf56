"""TE definitions of lowbit's linear kernels: ``Y[M, N] = X[M, K] @ dequant(W)``, dequant fused.

One definition per weight format (:class:`~lowbit.codegen.formats.LinearFormat`), on weights in a
chip's layout (:class:`~lowbit.codegen.formats.ColumnTiles`). Each PrimFunc carries ``lowbit.kernel``
(the format's tag) and ``lowbit.tile`` (the layout's) so that a target's schedule rules
(:mod:`lowbit.targets`) can find and schedule it. ``M`` is symbolic for prefill and 1 for decode:
the same definition yields the GEMM and the GEMV kernel, told apart by ``lowbit.gemv``. Weights stay
in their packed form in memory; the float value of a weight only ever exists in registers (GEMV)
or in a small per-tile buffer (GEMM).
"""

from __future__ import annotations

from tvm import te, tirx

from .formats import ROW_BLOCK, W8A8_KINDS, ColumnTiles, LinearFormat
from .packing import INT4_PER_WORD

KERNEL_ATTR = "lowbit.kernel"  # the weight format tag; marks a PrimFunc as a lowbit linear kernel
TILE_ATTR = "lowbit.tile"  # output channels per column tile of the weights' layout
GEMV_ATTR = "lowbit.gemv"  # True when M == 1 (decode)
ROW_BLOCK_ATTR = "lowbit.row_block"  # the integer-dot GEMM's row padding (ColumnTiles.row_block)
INT8_QMAX = 127  # int8 activation codes are clipped to [-127, 127]


# The storage type of the int4 and w4a8 formats' per-group scales and zero points; kernels widen
# them to the compute type. At group 32 a float32 scale costs 1 bit per weight, a fifth of what a
# decode step streams; float16 halves that (llama.cpp's Q4_0 stores its scales so too). The grid
# (lowbit.passes.schemes.grids) fits scales that float16 represents exactly.
GROUP_SCALE_DTYPE = "float16"


def kernel_name(fmt: LinearFormat, layout: ColumnTiles, m, n: int, k: int) -> str:
    variant = "gemv" if isinstance(m, int) and m == 1 else "gemm"
    return f"lowbit_{variant}_{fmt.tag}_{layout.tag}_n{n}_k{k}"


def linear_kernel(fmt: LinearFormat, layout: ColumnTiles, m, n: int, k: int, dtype: str = "float32"
                  ) -> tirx.PrimFunc:
    """The PrimFunc ``(X, *weights) -> Y`` for ``fmt`` in ``layout``; ``m`` is an int or a ``tirx.Var``.

    ``n`` must be a whole number of column tiles (callers pad and slice): schedules then need no
    bounds predicates on the vectorized channel loop.
    """
    t = layout.tile
    if n % t:
        raise ValueError(f"n={n} is not a multiple of the column tile {t}")
    tiles = n // t
    if fmt.kind in W8A8_KINDS:
        func = w8a8_kernel(fmt, t, m, k, tiles, dtype, layout.row_block)
    elif fmt.kind == "w4a8":
        func = w4a8_kernel(fmt, t, m, k, tiles, dtype)
    elif fmt.kind == "int4" and isinstance(m, int) and m == 1:
        func = int4_gemv_kernel(fmt, t, k, tiles, dtype)
    else:
        func = _dequant_matmul_kernel(fmt, t, m, k, tiles, dtype)
    return func.with_attrs({KERNEL_ATTR: fmt.tag, TILE_ATTR: t, GEMV_ATTR: isinstance(m, int) and m == 1,
                            ROW_BLOCK_ATTR: layout.row_block})


def _dequant_matmul_kernel(fmt: LinearFormat, t: int, m, k: int, tiles: int, dtype: str) -> tirx.PrimFunc:
    """``Y = X @ dequant(W)`` with the dequantization as its own (inlinable) block ``dequant``."""
    n = tiles * t
    x = te.placeholder((m, k), dtype, name="X")
    if fmt.kind in ("f32", "int8"):
        w = te.placeholder((tiles, k, t), dtype if fmt.kind == "f32" else "int8", name="W")
        inputs = [w]
        if fmt.kind == "f32":
            def _dequant(kk, nn):
                return w[nn // t, kk, nn % t]
        else:
            scale = te.placeholder((tiles, t), dtype, name="scale")
            inputs.append(scale)

            def _dequant(kk, nn):
                return w[nn // t, kk, nn % t].astype(dtype) * scale[nn // t, nn % t]
    else:  # int4
        inputs, codes, scale_at, zero_at = _int4_weights(fmt, t, k, tiles, dtype)

        def _dequant(kk, nn):
            g = kk // fmt.group_size
            return (codes(kk, nn) - zero_at(g, nn)) * scale_at(g, nn)
    dequant = te.compute((k, n), _dequant, name="dequant")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, r] * dequant[r, j], axis=r), name="matmul")
    return te.create_prim_func([x, *inputs, y])


def _group_scales(fmt: LinearFormat, t: int, tiles: int, groups: int, dtype: str):
    """The per-group ``scale`` (and, with ``has_zeros``, ``zero``) placeholders of the int4 and w4a8
    formats, stored in :data:`GROUP_SCALE_DTYPE`, and their accessors ``scale_at(g, nn)`` and
    ``zero_at(g, nn)`` widened to ``dtype``; the zero point is 8 without a ``zero`` input."""
    scale = te.placeholder((tiles, groups, t), GROUP_SCALE_DTYPE, name="scale")
    zero = te.placeholder((tiles, groups, t), GROUP_SCALE_DTYPE, name="zero") if fmt.has_zeros else None

    def scale_at(g, nn):
        return scale[nn // t, g, nn % t].astype(dtype)

    def zero_at(g, nn):
        return zero[nn // t, g, nn % t].astype(dtype) if zero is not None else tirx.const(8.0, dtype)

    return [scale] if zero is None else [scale, zero], scale_at, zero_at


def _int4_weights(fmt: LinearFormat, t: int, k: int, tiles: int, dtype: str):
    """The int4 format's placeholders and accessors: ``(inputs, codes(kk, nn), scale_at(g, nn),
    zero_at(g, nn))``, all as ``dtype`` (scales and zero points stored in :data:`GROUP_SCALE_DTYPE`);
    the zero point is 8 without a ``zero`` input."""
    groups = -(-k // fmt.group_size)  # the last group may be partial
    w = te.placeholder((tiles, k // INT4_PER_WORD, t), "uint32", name="W")
    scales, scale_at, zero_at = _group_scales(fmt, t, tiles, groups, dtype)

    def codes(kk, nn):
        word = w[nn // t, kk // INT4_PER_WORD, nn % t]
        shift = ((kk % INT4_PER_WORD) * 4).astype("uint32")
        return ((word >> shift) & tirx.const(0xF, "uint32")).astype(dtype)

    return [w, *scales], codes, scale_at, zero_at


def int4_gemv_kernel(fmt: LinearFormat, t: int, k: int, tiles: int, dtype: str = "float32") -> tirx.PrimFunc:
    """The int4 GEMV (``M == 1``, decode) with the scale and zero point applied once per group.

    Same arguments and result as :func:`linear_kernel`'s int4 format; computes::

        partial[g, n] = sum_{kk in group g} X[0, kk] * code[kk, n]
        xsum[g]       = sum_{kk in group g} X[0, kk]
        Y[0, n]       = sum_g scale[g, n] * (partial[g, n] - zero[g, n] * xsum[g])

    which equals ``X @ ((code - zero) * scale)`` but costs one multiply-add per weight instead of
    a subtract, a multiply and a multiply-add. Blocks: ``partial``, ``xsum``, ``matmul``.
    """
    size = fmt.group_size
    groups = -(-k // size)
    x = te.placeholder((1, k), dtype, name="X")
    inputs, codes, scale_at, zero_at = _int4_weights(fmt, t, k, tiles, dtype)

    def in_group(g, r, value):  # the last group may be partial: inputs past K count as zero
        if k % size == 0:
            return value
        return tirx.if_then_else(g * size + r < k, value, tirx.const(0.0, dtype))

    r = te.reduce_axis((0, size), name="r")
    partial = te.compute((groups, tiles * t), lambda g, nn: te.sum(
        in_group(g, r, x[0, g * size + r] * codes(g * size + r, nn)), axis=r), name="partial")
    rs = te.reduce_axis((0, size), name="rs")
    xsum = te.compute((groups,), lambda g: te.sum(in_group(g, rs, x[0, g * size + rs]), axis=rs), name="xsum")
    rg = te.reduce_axis((0, groups), name="g")
    y = te.compute((1, tiles * t), lambda i, nn: te.sum(
        scale_at(rg, nn) * (partial[rg, nn] - zero_at(rg, nn) * xsum[rg]), axis=rg), name="matmul")
    return te.create_prim_func([x, *inputs, y])


W8A8_ZERO = 128  # the zero point of w8a8 weight codes (unsigned bytes): weight = scale * (code - 128)
QUAD = 4  # inputs per byte quad (the 4-way byte dot product's depth)


def padded_rows(m, row_block: int = ROW_BLOCK):
    """The rows a GEMM's integer dot product covers: ``m`` rounded up to a multiple of ``row_block``
    (a GEMV's single row as it is), so that a schedule blocking the rows by ``row_block`` has no
    partial block: a tensorized loop nest cannot carry a bounds predicate."""
    return m if isinstance(m, int) and m == 1 else (m + row_block - 1) // row_block * row_block


def _input_row(i, m, rows) -> tuple:
    """For row ``i`` of a dot product over ``rows = padded_rows(m)``: the input row it reads (a
    padding row reads row ``m - 1``, always in bounds) and the conditions that it is a real row
    (none where no row is padding)."""
    if isinstance(m, int) and rows == m:
        return i, []
    return tirx.min(i, m - 1), [i < m]


def w8a8_padded_k(k: int) -> int:
    """The input width a ``w8a8`` kernel computes over: ``k`` rounded up to whole byte quads."""
    return -(-k // QUAD) * QUAD


def w8a8_kernel(fmt: LinearFormat, t: int, m, k: int, tiles: int, dtype: str = "float32",
                row_block: int = ROW_BLOCK) -> tirx.PrimFunc:
    """W8A8: int8 activations times int8 weights, a byte dot product accumulated exactly in int32.

    Arguments, in order: ``X[M, K]`` float, ``W[N/t, Kp/4, t, 4]`` uint8 byte quads
    (:func:`~lowbit.codegen.packing.pack_byte_quads`; codes around the zero point ``W8A8_ZERO``;
    ``Kp`` is ``K`` rounded up to a multiple of 4, padded with the zero point), ``scale[N/t, t]``
    float (one per output channel), for ``w8a8_static`` ``act_scale[1]`` float (one calibrated scale
    for the whole input, > 0), then the output ``Y[M, N]`` float. Computes, per row ``m`` (inputs
    past ``K`` count as zero)::

        sx[m]     = max_k |X[m, k]| / 127 (1 for an all-zero row)   # w8a8; w8a8_static: act_scale[0]
        xq[m, k]  = int8(clip(round_half_even(X[m, k] / sx[m]), -127, 127))
        xsum[m]   = sum_k xq[m, k]
        acc[m, n] = sum_k int32(code[k, n]) * int32(xq[m, k])                          # exact in int32
        Y[m, n]   = float(acc[m, n] - 128 * xsum[m]) * sx[m] * scale[n // t, n % t]

    The unsigned codes times the signed activations are the operands of x86's ``vpdpbusd`` as they
    are; the zero point is taken out once per row and channel. The dot product reduces over
    ``(ko, j)`` with ``k = 4 ko + j``, so a target can tensorize ``(channels, j)`` as one vector load
    and one 4-way byte dot product; ``xq``, ``xsum`` and ``acc`` cover :func:`padded_rows` rows for
    ``row_block`` (the padding rows zero). Blocks: ``act_absmax`` and ``act_scale`` (``w8a8`` only),
    ``act_quant``, ``act_sum``, ``matmul`` (int32) and ``output``. Exact for ``K < 2^31 / (255 * 127)``.
    """
    k_padded = w8a8_padded_k(k)
    rows = padded_rows(m, row_block)
    x = te.placeholder((m, k), dtype, name="X")
    w = te.placeholder((tiles, k_padded // QUAD, t, QUAD), "uint8", name="W")
    w_scale = te.placeholder((tiles, t), dtype, name="scale")
    qmax = tirx.const(float(INT8_QMAX), dtype)
    if fmt.kind == "w8a8":
        rk = te.reduce_axis((0, k), name="kq")
        absmax = te.compute((m,), lambda i: te.max(tirx.abs(x[i, rk]), axis=rk), name="act_absmax")
        x_scale = te.compute(
            (m,), lambda i: tirx.Select(absmax[i] > 0, absmax[i] / qmax, tirx.const(1.0, dtype)), name="act_scale"
        )
        inputs = [w, w_scale]

        def row_scale(i):
            return x_scale[i]
    else:
        x_scale = te.placeholder((1,), dtype, name="act_scale")
        inputs = [w, w_scale, x_scale]

        def row_scale(_i):
            return x_scale[0]

    def quantized(i, kk):  # zero past K and in padding rows
        row, inside = _input_row(i, m, rows)
        code = tirx.max(tirx.min(tirx.round(x[row, tirx.min(kk, k - 1)] / row_scale(row)), qmax), -qmax)
        inside = inside + ([kk < k] if k_padded != k else [])
        if inside:
            code = tirx.if_then_else(tirx.all(*inside), code, tirx.const(0.0, dtype))
        return code.astype("int8")

    xq = te.compute((rows, k_padded), quantized, name="act_quant")
    rs = te.reduce_axis((0, k_padded), name="rs")
    xsum = te.compute((rows,), lambda i: te.sum(xq[i, rs].astype("int32"), axis=rs), name="act_sum")
    ko = te.reduce_axis((0, k_padded // QUAD), name="ko")
    j = te.reduce_axis((0, QUAD), name="j")
    acc = te.compute(
        (rows, tiles * t),
        lambda i, nn: te.sum(w[nn // t, ko, nn % t, j].astype("int32") * xq[i, ko * QUAD + j].astype("int32"),
                             axis=[ko, j]),
        name="matmul",
    )
    zero = tirx.const(W8A8_ZERO, "int32")
    y = te.compute((m, tiles * t), lambda i, nn: (acc[i, nn] - zero * xsum[i]).astype(dtype) * row_scale(i)
                   * w_scale[nn // t, nn % t], name="output")
    return te.create_prim_func([x, *inputs, y])


def w4a8_padded_k(k: int, group_size: int) -> int:
    """The input width a ``w4a8`` kernel computes over: ``k`` rounded up to whole groups."""
    return -(-k // group_size) * group_size


def w4a8_kernel(fmt: LinearFormat, t: int, m, k: int, tiles: int, dtype: str = "float32") -> tirx.PrimFunc:
    """W4A8: int4 weight codes times int8 activations, a byte dot product into int32 per group.

    Arguments, in order: ``X[M, K]`` float, ``W[N/t, Kp/8, t, 4]`` uint8 nibble quads
    (:func:`~lowbit.codegen.packing.pack_int4_quads`; ``Kp`` is ``K`` rounded up to whole groups of
    ``G = fmt.group_size``), ``scale[N/t, Kp/G, t]`` and, with ``has_zeros``, ``zero[N/t, Kp/G, t]``
    in :data:`GROUP_SCALE_DTYPE` (else the zero point is 8), then the output ``Y[M, N]``. Computes,
    per row ``m`` and group ``g`` (inputs past ``K`` count as zero)::

        sx[m, g]    = max_{k in g} |X[m, k]| / 127 (1 for an all-zero group)
        xq[m, k]    = int8(clip(round_half_even(X[m, k] / sx[m, g]), -127, 127))
        xsum[m, g]  = sum_{k in g} xq[m, k]
        acc[m, g, n] = sum_{k in g} int32(code[k, n]) * int32(xq[m, k])            # exact in int32
        Y[m, n]     = sum_g scale[g, n] * sx[m, g] * (float(acc[m, g, n]) - zero[g, n] * float(xsum[m, g]))

    The dot product reduces over ``(ko, h, j)`` with ``k = g*G + 8*ko + 4*h + j``: ``h`` picks the
    nibble of byte ``j``, so a target can tensorize ``(channels, h, j)`` as one vector load, a mask,
    a shift and two 4-way byte dot products; ``xq`` and ``acc`` cover :func:`padded_rows` rows (the
    padding rows zero). Blocks: ``act_absmax``, ``act_scale``, ``act_quant``, ``act_sum``, ``partial``
    (int32) and ``matmul``.
    """
    size = fmt.group_size
    k_padded = w4a8_padded_k(k, size)
    groups = k_padded // size
    qmax = tirx.const(float(INT8_QMAX), dtype)
    x = te.placeholder((m, k), dtype, name="X")
    w = te.placeholder((tiles, k_padded // 8, t, 4), "uint8", name="W")
    scales, scale_at, zero_at = _group_scales(fmt, t, tiles, groups, dtype)

    def x_at(i, kk):  # zero past K
        return x[i, kk] if k_padded == k else tirx.if_then_else(kk < k, x[i, tirx.min(kk, k - 1)], tirx.const(0.0, dtype))

    ra = te.reduce_axis((0, size), name="ra")
    absmax = te.compute((m, groups), lambda i, g: te.max(tirx.abs(x_at(i, g * size + ra)), axis=ra), name="act_absmax")
    x_scale = te.compute((m, groups), lambda i, g: tirx.Select(
        absmax[i, g] > 0, absmax[i, g] / qmax, tirx.const(1.0, dtype)), name="act_scale")
    rows = padded_rows(m)

    def quantized(i, kk):  # zero in padding rows
        row, inside = _input_row(i, m, rows)
        code = tirx.max(tirx.min(tirx.round(x_at(row, kk) / x_scale[row, kk // size]), qmax), -qmax)
        if inside:
            code = tirx.if_then_else(tirx.all(*inside), code, tirx.const(0.0, dtype))
        return code.astype("int8")

    xq = te.compute((rows, k_padded), quantized, name="act_quant")
    rs = te.reduce_axis((0, size), name="rs")
    xsum = te.compute((m, groups), lambda i, g: te.sum(xq[i, g * size + rs].astype("int32"), axis=rs), name="act_sum")
    ko = te.reduce_axis((0, size // 8), name="ko")
    h = te.reduce_axis((0, 2), name="h")
    j = te.reduce_axis((0, 4), name="j")
    nibble = tirx.const(0xF, "uint8")
    partial = te.compute((rows, groups, tiles * t), lambda i, g, nn: te.sum(
        ((w[nn // t, g * (size // 8) + ko, nn % t, j] >> (h * 4).astype("uint8")) & nibble).astype("int32")
        * xq[i, g * size + ko * 8 + h * 4 + j].astype("int32"), axis=[ko, h, j]), name="partial")

    rg = te.reduce_axis((0, groups), name="g")
    y = te.compute((m, tiles * t), lambda i, nn: te.sum(
        scale_at(rg, nn) * x_scale[i, rg]
        * (partial[i, rg, nn].astype(dtype) - zero_at(rg, nn) * xsum[i, rg].astype(dtype)), axis=rg), name="matmul")
    return te.create_prim_func([x, w, *scales, y])


def gather_kernel(fmt: LinearFormat, layout: ColumnTiles, rows: int, k: int, index_shape: list,
                  index_dtype: str = "int64", dtype: str = "float32") -> tirx.PrimFunc:
    r"""An embedding lookup from a linear layer's packed weight: ``out[..., :] = W[ids[...], :]``.

    For a table tied to an output head ``W[rows, K]`` (``rows`` output channels of ``K`` inputs), the
    looked-up row is output channel ``ids[...]`` of the head's packed tensors, dequantized on the
    way: the table is stored once, in the head's format and ``layout``. Arguments: ``ids`` of
    ``index_shape`` (ints or ``tirx.Var``\ s; clipped into ``[0, rows)``), the head's weight tensors as
    :func:`linear_kernel` takes them (without activation scales), then ``out[*index_shape, K]``.
    """
    t = layout.tile
    tiles = layout.padded(rows) // t
    ids = te.placeholder(tuple(index_shape), index_dtype, name="ids")
    inputs, element = _weight_element(fmt, t, k, tiles, dtype)

    def lookup(*indices):
        index = ids[indices[:-1]].astype("int64")
        row = tirx.max(tirx.min(index, tirx.const(rows - 1, "int64")), tirx.const(0, "int64")).astype("int32")
        return element(indices[-1], row)

    out = te.compute((*index_shape, k), lookup, name="gather")
    return te.create_prim_func([ids, *inputs, out])


def _weight_element(fmt: LinearFormat, t: int, k: int, tiles: int, dtype: str):
    """The placeholders of a packed linear weight (in :func:`linear_kernel`'s argument order, less
    activation scales) and ``value(kk, nn)``: the float weight of input ``kk``, output channel ``nn``."""
    if fmt.kind in W8A8_KINDS:
        w = te.placeholder((tiles, w8a8_padded_k(k) // QUAD, t, QUAD), "uint8", name="W")
        scale = te.placeholder((tiles, t), dtype, name="scale")
        return [w, scale], lambda kk, nn: ((w[nn // t, kk // QUAD, nn % t, kk % QUAD].astype("int32")
                                            - W8A8_ZERO).astype(dtype) * scale[nn // t, nn % t])
    if fmt.kind in ("f32", "int8"):
        w = te.placeholder((tiles, k, t), dtype if fmt.kind == "f32" else "int8", name="W")
        if fmt.kind == "f32":
            return [w], lambda kk, nn: w[nn // t, kk, nn % t]
        scale = te.placeholder((tiles, t), dtype, name="scale")
        return [w, scale], lambda kk, nn: w[nn // t, kk, nn % t].astype(dtype) * scale[nn // t, nn % t]
    size = fmt.group_size
    if fmt.kind == "int4":
        inputs, codes, scale_at, zero_at = _int4_weights(fmt, t, k, tiles, dtype)
    else:  # w4a8: nibble quads over the inputs padded to whole groups
        k_padded = w4a8_padded_k(k, size)
        groups = k_padded // size
        w = te.placeholder((tiles, k_padded // 8, t, 4), "uint8", name="W")
        scales, scale_at, zero_at = _group_scales(fmt, t, tiles, groups, dtype)
        inputs = [w, *scales]

        def codes(kk, nn):
            byte = w[nn // t, kk // 8, nn % t, kk % 4]
            return ((byte >> ((kk // 4) % 2 * 4).astype("uint8")) & tirx.const(0xF, "uint8")).astype(dtype)
    return inputs, lambda kk, nn: (codes(kk, nn) - zero_at(kk // size, nn)) * scale_at(kk // size, nn)
