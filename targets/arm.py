"""AArch64 targets: NEON with dotprod (sdot), and with i8mm (smmla), on the SIMD rules of
:mod:`lowbit.targets.simd`, lowered to NEON vector code; ``model.so`` is linked by a cross compiler.

The ``w4a8`` kernels' byte dot product (:mod:`lowbit.targets.dot_intrinsics`) runs on ``sdot`` (4 int32
lanes, 4 signed byte products each): the int4 codes, 0..15, are valid signed bytes as they are.
The ``w8a8`` kernels' byte quads (:mod:`lowbit.targets.dot_intrinsics`: unsigned codes, signed
activations) run on i8mm's mixed-sign ``usdot``; with dotprod alone, LLVM vectorizes the step.
"""

from tvm.script import tirx as T

from .dot_intrinsics import register_byte_dot, register_nibble_dot
from .registry import register_target
from .simd import simd_target


def _quad_broadcast(B, start: int):
    """Activations ``B[start:start + 4]`` repeated in each 32-bit lane of an ``int8x16`` vector."""
    return T.reinterpret(T.broadcast(T.reinterpret(B.vload([start], "int8x4"), dtype="int32"), 4), dtype="int8x16")


def _sdot(acc, codes, activations):
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), acc,
                                   T.reinterpret(codes, dtype="int8x16"), activations, dtype="int32x4")


# Single expressions, no named temporaries (each would become a workspace allocation per call:
# see lowbit.targets.simd.REGISTERS).
@T.prim_func(s_tir=True)
def _nibble_dot_sdot(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4, 4), "uint8", offset_factor=1)
    B = T.match_buffer(b, (8,), "int8", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4, 0:4], B[0:8])
        T.writes(C[0:4])
        C[T.ramp(T.int32(0), 1, 4)] = _sdot(
            _sdot(C.vload([0], "int32x4"), T.bitwise_and(A.vload([0, 0], "uint8x16"), T.broadcast(T.uint8(15), 16)),
                  _quad_broadcast(B, 0)),
            T.shift_right(A.vload([0, 0], "uint8x16"), T.broadcast(T.uint8(4), 16)), _quad_broadcast(B, 4))


@T.prim_func(s_tir=True)
def _byte_dot_usdot(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4, 4), "uint8", offset_factor=1)
    B = T.match_buffer(b, (4,), "int8", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4, 0:4], B[0:4])
        T.writes(C[0:4])
        C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.usdot.v4i32.v16i8"), C.vload([0], "int32x4"),
            T.reinterpret(A.vload([0, 0], "uint8x16"), dtype="int8x16"), _quad_broadcast(B, 0), dtype="int32x4")


NIBBLE_DOT_SDOT = register_nibble_dot("lowbit_nibble_dot_sdot4", 4, _nibble_dot_sdot)
BYTE_DOT_USDOT = register_byte_dot("lowbit_byte_dot_usdot4", 4, _byte_dot_usdot)

ARM = {
    "family": "arm",
    "machines": ("aarch64", "arm64"),
    "cpu_flags": {"neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm"},  # capability -> /proc/cpuinfo Features
    "cross_compiler": "aarch64-linux-gnu-g++",
    "linear_tile": 16,
    "dot_lanes": 4,
    "int4_dot": NIBBLE_DOT_SDOT,
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
    capabilities=("neon", "dotprod", "i8mm"), int8_dot=BYTE_DOT_USDOT,
    description="AArch64 NEON with int8 matrix multiply (Graviton3, Neoverse V1/N2)",
))
