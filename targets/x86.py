"""x86-64 targets: AVX2 (+FMA), AVX-512 with VNNI, and the SIMD schedule rule they share."""

from lowbit.codegen.kernels import KERNEL_ATTR, W8A8_KINDS

from .registry import ChipTarget, register_target

W8A8_ROWS = 8  # rows of X sharing each widened int8 weight vector in the W8A8 GEMM


def schedule_w8a8_linear(sch, m_is_one: bool, tile: int) -> None:
    """Schedule a W8A8 kernel (:func:`lowbit.codegen.kernels.w8a8_kernel`) for SIMD.

    The activations are quantized once, before the matmul: per-row absmax and int8 codes (LLVM
    vectorizes these loops over K), parallel over rows in the GEMM. The int8 dot product runs parallel over column tiles,
    vectorized across a tile's ``tile`` channels with int32 accumulators (int8 widened to int32:
    ``vpmovsxbd`` + ``vpmulld`` on AVX2); the float epilogue is applied per tile as it completes.
    GEMM: each tile's weights are reused by ``W8A8_ROWS`` rows at a time, the tile staying in L1
    while the row blocks stream past.
    """
    output = sch.get_sblock("output")
    m, n = sch.get_loops(output)
    n_outer, n_inner = sch.split(n, [None, tile])
    if m_is_one:
        sch.reorder(n_outer, m, n_inner)
        row_loop = n_outer
    else:
        row_loop, m_inner = sch.split(m, [None, W8A8_ROWS])
        sch.reorder(n_outer, row_loop, m_inner, n_inner)
        static = sch.mod["main"].attrs[KERNEL_ATTR].startswith("w8a8_static")
        for name in ("act_quant",) if static else ("act_absmax", "act_quant"):
            sch.parallel(sch.get_loops(sch.get_sblock(name))[0])
    sch.vectorize(n_inner)
    sch.parallel(n_outer)
    matmul = sch.get_sblock("matmul")
    sch.compute_at(matmul, row_loop)
    sch.set_scope(matmul, 0, "local")
    *rows_channels, k = sch.get_loops(matmul)[1 if m_is_one else 2:]  # (m_inner,) n_inner, k
    k_outer, k_inner = sch.split(k, [None, 4])
    sch.reorder(k_outer, k_inner, *rows_channels)
    sch.vectorize(rows_channels[-1])
    sch.unroll(k_inner)
    if not m_is_one:
        sch.unroll(rows_channels[0])
    init = sch.decompose_reduction(matmul, k_outer)
    sch.vectorize(sch.get_loops(init)[-1])


def schedule_linear(sch, m_is_one: bool, tile: int) -> None:
    """Schedule a ``lowbit.kernel`` linear PrimFunc (see :mod:`lowbit.codegen.kernels`) for x86 SIMD.

    W8A8 kernels go to :func:`schedule_w8a8_linear`.

    GEMV (decode, ``M == 1``): dequantize inline, parallel over column tiles, vectorized across the
    ``tile`` channels of a tile with a register accumulator, the 8 codes of a packed word unrolled.
    GEMM (prefill): the same plus a ``4``-row register tile; each weight tile is dequantized once
    into a small local buffer and reused by the 4 rows.
    """
    if sch.mod["main"].attrs[KERNEL_ATTR].startswith(W8A8_KINDS):
        schedule_w8a8_linear(sch, m_is_one, tile)
        return
    matmul = sch.get_sblock("matmul")
    dequant = sch.get_sblock("dequant")
    m, n, k = sch.get_loops(matmul)
    n_outer, n_inner = sch.split(n, [None, tile])
    k_outer, k_inner = sch.split(k, [None, 8])
    if m_is_one:
        sch.reorder(n_outer, m, k_outer, k_inner, n_inner)
        sch.compute_inline(dequant)
        tile_loop = n_outer
    else:
        m_outer, m_inner = sch.split(m, [None, 4])
        sch.reorder(m_outer, n_outer, k_outer, k_inner, m_inner, n_inner)
        sch.compute_at(dequant, k_outer)
        sch.set_scope(dequant, 0, "local")
        sch.vectorize(sch.get_loops(dequant)[-1])
        sch.unroll(m_inner)
        tile_loop = sch.fuse(m_outer, n_outer)
    acc = sch.cache_write(matmul, 0, "local")
    sch.reverse_compute_at(acc, tile_loop)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.vectorize(n_inner)
    sch.unroll(k_inner)
    sch.parallel(tile_loop)
    init = sch.decompose_reduction(matmul, k_outer)
    sch.vectorize(sch.get_loops(init)[-1])


X86_AVX2 = register_target(
    ChipTarget(
        name="x86-avx2",
        family="x86",
        tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
        capabilities=("avx2", "fma"),
        vector_bytes=32,
        description="x86-64 with AVX2 + FMA (Haswell, Zen 1-3 and newer)",
        host_cpu_flags=("avx2", "fma"),
        schedule_linear=schedule_linear,
        linear_tile=16,
    )
)

X86_VNNI = register_target(
    ChipTarget(
        name="x86-vnni",
        family="x86",
        tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"},
        capabilities=("avx2", "fma", "avx512f", "avx512bw", "vnni"),
        vector_bytes=64,
        description="x86-64 with AVX-512 and VNNI (Cascade Lake, Ice Lake, Zen 4 and newer)",
        host_cpu_flags=("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"),
        schedule_linear=schedule_linear,
        linear_tile=32,
    )
)
