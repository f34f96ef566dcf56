"""x86-64 targets: AVX2 (+FMA), AVX-512 with VNNI, and the SIMD schedule rule they share."""

from .registry import ChipTarget, register_target


def schedule_linear(sch, m_is_one: bool, tile: int) -> None:
    """Schedule a ``lowbit.kernel`` linear PrimFunc (see :mod:`lowbit.codegen.kernels`) for x86 SIMD.

    GEMV (decode, ``M == 1``): dequantize inline, parallel over column tiles, vectorized across the
    ``tile`` channels of a tile with a register accumulator, the 8 codes of a packed word unrolled.
    GEMM (prefill): the same plus a ``4``-row register tile; each weight tile is dequantized once
    into a small local buffer and reused by the 4 rows.
    """
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
