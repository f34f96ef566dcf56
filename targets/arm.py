"""AArch64 targets: NEON with dotprod (sdot), and with i8mm (smmla), on the SIMD rules of
:mod:`lowbit.targets.simd`, lowered to NEON vector code; ``model.so`` is linked by a cross compiler."""

from .registry import register_target
from .simd import simd_target

ARM = {
    "family": "arm",
    "machines": ("aarch64", "arm64"),
    "cpu_flags": {"neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm"},  # capability -> /proc/cpuinfo Features
    "cross_compiler": "aarch64-linux-gnu-g++",
    "linear_tile": 16,
}

ARM_DOTPROD = register_target(simd_target(
    name="arm-dotprod", **ARM,
    tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]},
    capabilities=("neon", "dotprod"),
    description="AArch64 NEON with dot product (Cortex-A76+, Graviton2, Apple M1)",
))

ARM_I8MM = register_target(simd_target(
    name="arm-i8mm", **ARM,
    tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod", "+i8mm"]},
    capabilities=("neon", "dotprod", "i8mm"),
    description="AArch64 NEON with int8 matrix multiply (Graviton3, Neoverse V1/N2)",
))
