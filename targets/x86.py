"""x86-64 targets: AVX2 (+FMA) and AVX-512 with VNNI, on the SIMD rules of :mod:`lowbit.targets.simd`."""

from .registry import register_target
from .simd import simd_target

MACHINES = ("x86_64", "AMD64")

X86_AVX2 = register_target(simd_target(
    name="x86-avx2", family="x86", machines=MACHINES, linear_tile=16,
    tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
    capabilities=("avx2", "fma"),
    description="x86-64 with AVX2 + FMA (Haswell, Zen 1-3 and newer)",
))

X86_VNNI = register_target(simd_target(
    name="x86-vnni", family="x86", machines=MACHINES, linear_tile=32,
    tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"},
    capabilities=("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"),
    description="x86-64 with AVX-512 and VNNI (Cascade Lake, Ice Lake, Zen 4 and newer)",
))
