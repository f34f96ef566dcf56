"""x86-64 targets: AVX2 (+FMA), AVX-512 with VNNI, and the SIMD schedule rule they share."""

from lowbit.codegen.kernels import KERNEL_ATTR, W8A8_KINDS

from .registry import ChipTarget, register_target

W8A8_ROWS = 8  # rows of X sharing each widened int8 weight vector in the W8A8 GEMM
GEMM_ROWS = 4  # rows of X sharing each dequantized weight vector in the GEMM register tile


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
    if not m_is_one:  # a predicate-free main loop over whole row blocks, then the tail
        sch.annotate(row_loop, "pragma_loop_partition_hint", 1)
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


def schedule_int4_gemv(sch, tile: int) -> None:
    """Schedule the int4 GEMV (:func:`lowbit.codegen.kernels.int4_gemv_kernel`) for SIMD.

    Parallel over column tiles. For each tile and group, the ``tile`` partial sums live in vector
    registers while the group's codes stream past (the 8 codes of a packed word unrolled, one
    multiply-add each); the group's scale and zero point are then applied to the tile's output
    accumulators, also in registers. A partial last group is split off by loop partitioning.
    """
    matmul = sch.get_sblock("matmul")
    _, n, g = sch.get_loops(matmul)
    n_outer, n_inner = sch.split(n, [None, tile])
    sch.reorder(n_outer, g, n_inner)
    sch.parallel(n_outer)
    acc = sch.cache_write(matmul, 0, "local")
    sch.reverse_compute_at(acc, n_outer)
    sch.vectorize(sch.get_loops(acc)[-1])
    partial = sch.get_sblock("partial")
    sch.compute_at(partial, g)
    sch.set_scope(partial, 0, "local")
    channels, r = sch.get_loops(partial)[-2:]
    r_outer, r_inner = sch.split(r, [None, 8])
    sch.reorder(r_outer, r_inner, channels)
    sch.vectorize(channels)
    sch.unroll(r_inner)
    sch.vectorize(n_inner)
    sch.annotate(g, "pragma_loop_partition_hint", 1)
    init = sch.decompose_reduction(partial, r_outer)
    sch.vectorize(sch.get_loops(init)[-1])
    init = sch.decompose_reduction(matmul, g)
    sch.vectorize(sch.get_loops(init)[-1])


def schedule_linear(sch, m_is_one: bool, tile: int) -> None:
    """Schedule a ``lowbit.kernel`` linear PrimFunc (see :mod:`lowbit.codegen.kernels`) for x86 SIMD.

    W8A8 kernels go to :func:`schedule_w8a8_linear`, the int4 GEMV to :func:`schedule_int4_gemv`.

    Parallel over column tiles; within a tile the ``tile`` channels are vectorized with register
    accumulators and the 8 codes of a packed word unrolled; dequantization is inlined into the
    product (never a float weight buffer). GEMV (decode, ``M == 1``): one accumulator row.
    GEMM (prefill): a ``GEMM_ROWS``-row register tile, so each dequantized weight vector serves
    that many rows (LLVM computes it once for the unrolled rows); the row-block loop is hinted for
    loop partitioning, so the symbolic row count gets a predicate-free main loop and one tail.
    """
    if sch.mod["main"].attrs[KERNEL_ATTR].startswith(W8A8_KINDS):
        schedule_w8a8_linear(sch, m_is_one, tile)
        return
    if m_is_one and sch.mod["main"].attrs[KERNEL_ATTR].startswith("int4"):
        schedule_int4_gemv(sch, tile)
        return
    matmul = sch.get_sblock("matmul")
    m, n, k = sch.get_loops(matmul)
    n_outer, n_inner = sch.split(n, [None, tile])
    k_outer, k_inner = sch.split(k, [None, 8])
    if m_is_one:
        sch.reorder(n_outer, m, k_outer, k_inner, n_inner)
        row_loop = n_outer
    else:
        row_loop, m_inner = sch.split(m, [None, GEMM_ROWS])
        sch.reorder(n_outer, row_loop, k_outer, k_inner, m_inner, n_inner)
        sch.unroll(m_inner)
        sch.annotate(row_loop, "pragma_loop_partition_hint", 1)  # main loop without bounds checks + tail
    sch.compute_inline(sch.get_sblock("dequant"))
    acc = sch.cache_write(matmul, 0, "local")
    sch.reverse_compute_at(acc, row_loop)
    sch.vectorize(sch.get_loops(acc)[-1])
    sch.vectorize(n_inner)
    sch.unroll(k_inner)
    sch.parallel(n_outer)
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
