"""Tensor intrinsics for the ``w8a8`` kernels' inner step: byte quads times int8 activations.

One step (:func:`byte_dot_desc`) accumulates, for ``lanes`` output channels, 4 consecutive inputs:
``C[i] += sum_j A[i, j] * B[j]`` with ``A`` the channels' unsigned byte codes
(:func:`lowbit.codegen.packing.pack_byte_quads`, 4 bytes per channel), ``B`` 4 int8 activations and
``C`` int32 accumulators in registers. Each family registers an implementation for the dot-product
instructions it has (:mod:`lowbit.targets.x86`); the ``w8a8`` schedule rule
(:class:`lowbit.targets.simd.W8A8Linear`) tensorizes with the target's ``int8_dot`` intrinsic when it
names one, and otherwise leaves the same loops to LLVM's vectorizer.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T


def byte_dot_desc(lanes: int):
    """The computation one step performs, for ``lanes`` channels (see the module docstring)."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes, 4), "uint8", offset_factor=1)
        B = T.match_buffer(b, (4,), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:4], B[0:4])
            T.writes(C[0:lanes])
            for i, j in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    C[vi] = C[vi] + T.Cast("int32", A[vi, vj]) * T.Cast("int32", B[vj])

    return desc


def register_byte_dot(name: str, lanes: int, impl) -> str:
    """Register ``impl`` (a TVMScript PrimFunc with the desc's buffers) as intrinsic ``name``."""
    TensorIntrin.register(name, byte_dot_desc(lanes), impl, override=True)
    return name
