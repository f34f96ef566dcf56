"""Tensor intrinsics for the integer-dot kernels' inner steps: byte codes times int8 activations.

Two steps, each for ``lanes`` output channels with ``C`` their int32 accumulators in registers:

* the ``w4a8`` nibble step (:func:`nibble_dot_desc`), 8 consecutive inputs:
  ``C[i] += sum_{h, j} ((A[i, j] >> 4h) & 15) * B[4h + j]``, ``A`` the channels' nibble quads
  (:func:`lowbit.codegen.packing.pack_int4_quads`, 4 bytes per channel), ``B`` 8 int8 activations;
* the ``w8a8`` byte step (:func:`byte_dot_desc`), 4 consecutive inputs:
  ``C[i] += sum_j A[i, j] * B[j]``, ``A`` the channels' unsigned byte codes
  (:func:`lowbit.codegen.packing.pack_byte_quads`), ``B`` 4 int8 activations.

Each family registers implementations for the dot-product instructions it has
(:mod:`lowbit.targets.x86`, :mod:`lowbit.targets.arm`); the schedule rules
(:class:`lowbit.targets.simd.W4A8Linear`, :class:`lowbit.targets.simd.W8A8Linear`) tensorize with the
target's ``int4_dot`` / ``int8_dot`` intrinsic when it names one, and otherwise leave the same loops
to LLVM's vectorizer.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T


def nibble_dot_desc(lanes: int):
    """The nibble step, for ``lanes`` channels (see the module docstring)."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes, 4), "uint8", offset_factor=1)
        B = T.match_buffer(b, (8,), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:4], B[0:8])
            T.writes(C[0:lanes])
            for i, h, j in T.grid(lanes, 2, 4):
                with T.sblock("update"):
                    vi, vh, vj = T.axis.remap("SRR", [i, h, j])
                    C[vi] = C[vi] + T.Cast("int32", T.bitwise_and(
                        T.shift_right(A[vi, vj], T.Cast("uint8", vh * 4)), T.uint8(15))) * T.Cast("int32", B[vh * 4 + vj])

    return desc


def byte_dot_desc(lanes: int):
    """The byte step, for ``lanes`` channels (see the module docstring)."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes, 4), "uint8", offset_factor=1)
        B = T.match_buffer(b, (4,), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:4], B[0:4])
            T.writes(C[0:lanes])
            for i, j in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    C[vi] = C[vi] + T.Cast("int32", A[vi, vj]) * T.Cast("int32", B[vj])

    return desc


def register_nibble_dot(name: str, lanes: int, impl) -> str:
    """Register ``impl`` (a TVMScript PrimFunc with the nibble step's buffers) as intrinsic ``name``."""
    TensorIntrin.register(name, nibble_dot_desc(lanes), impl, override=True)
    return name


def register_byte_dot(name: str, lanes: int, impl) -> str:
    """Register ``impl`` (a TVMScript PrimFunc with the byte step's buffers) as intrinsic ``name``."""
    TensorIntrin.register(name, byte_dot_desc(lanes), impl, override=True)
    return name
