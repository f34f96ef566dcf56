"""Tensor intrinsics for the ``w4a8`` kernels' inner step: int4 nibble quads times int8 activations.

One step (:func:`nibble_dot_desc`) accumulates, for ``lanes`` output channels, 8 consecutive inputs:
``C[i] += sum_{h, j} ((A[i, j] >> 4h) & 15) * B[4h + j]`` with ``A`` the channels' nibble quads
(:func:`lowbit.codegen.packing.pack_int4_quads`, 4 bytes per channel), ``B`` 8 int8 activations and
``C`` int32 accumulators in registers. Each family registers an implementation for the dot-product
instructions it has (:mod:`lowbit.targets.x86`); the ``w4a8`` schedule rule
(:class:`lowbit.targets.simd.W4A8Linear`) tensorizes with the target's ``int4_dot`` intrinsic when it
names one, and otherwise leaves the same loops to LLVM's vectorizer.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T


def nibble_dot_desc(lanes: int):
    """The computation one step performs, for ``lanes`` channels (see the module docstring)."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes, 4), "uint8", offset_factor=1)
        B = T.match_buffer(b, (8,), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:4], B[0:8])
            T.writes(C[0:lanes])
            for i, h, j in T.grid(lanes, 2, 4):
                with T.sblock("update"):
                    vi, vh, vj = T.axis.remap("SRR", [i, h, j])
                    C[vi] = C[vi] + T.Cast("int32", T.bitwise_and(
                        T.shift_right(A[vi, vj], T.Cast("uint8", vh * 4)), T.uint8(15))) * T.Cast("int32", B[vh * 4 + vj])

    return desc


def register_nibble_dot(name: str, lanes: int, impl) -> str:
    """Register ``impl`` (a TVMScript PrimFunc with the desc's buffers) as intrinsic ``name``."""
    TensorIntrin.register(name, nibble_dot_desc(lanes), impl, override=True)
    return name
