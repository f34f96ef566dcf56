"""AArch64 targets: NEON with dotprod (sdot), and with i8mm (smmla)."""

from .registry import ChipTarget, register_target
from .x86 import schedule_linear as simd_schedule_linear  # the SIMD rule is ISA-neutral

ARM_DOTPROD = register_target(
    ChipTarget(
        name="arm-dotprod",
        family="arm",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]},
        capabilities=("neon", "dotprod"),
        vector_bytes=16,
        schedule_linear=simd_schedule_linear,
        linear_tile=16,
        cross_compiler="aarch64-linux-gnu-g++",
        description="AArch64 NEON with dot product (Cortex-A76+, Graviton2, Apple M1)",
    )
)

ARM_I8MM = register_target(
    ChipTarget(
        name="arm-i8mm",
        family="arm",
        tvm_target={
            "kind": "llvm",
            "mtriple": "aarch64-linux-gnu",
            "mattr": ["+neon", "+dotprod", "+i8mm"],
        },
        capabilities=("neon", "dotprod", "i8mm"),
        vector_bytes=16,
        schedule_linear=simd_schedule_linear,
        linear_tile=16,
        cross_compiler="aarch64-linux-gnu-g++",
        description="AArch64 NEON with int8 matrix multiply (Graviton3, Neoverse V1/N2)",
    )
)
