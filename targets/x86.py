"""x86-64 targets: AVX2 (+FMA), AVX-VNNI, AVX-512 with VNNI, and the latter with AMX tiles for the
W8A8 GEMMs (:mod:`lowbit.targets.x86_amx`), on the SIMD rules of :mod:`lowbit.targets.simd`.

The ``w4a8`` kernels' byte dot product (:mod:`lowbit.targets.dot_intrinsics`) runs on AVX-512 VNNI
``vpdpbusd`` (16 int32 lanes: 4 unsigned codes times 4 signed activations per lane and instruction),
on AVX-VNNI's 256-bit VEX ``vpdpbusd`` (8 lanes; cores with VNNI but no AVX-512) or, without VNNI,
on AVX2 ``vpmaddubsw`` + ``vpmaddwd`` (8 lanes; the 16-bit pair sums cannot saturate:
``2 * 15 * 127 < 2^15``). The activations go in the signed operand and the int4 codes, 0..15, in
the unsigned one, so no offset needs compensating. The ``w8a8`` kernels' byte quads
(:mod:`lowbit.targets.dot_intrinsics`, unsigned codes around 128) take one ``vpdpbusd`` per step on
either VNNI; AVX2 has no exact equivalent (``vpmaddubsw``'s 16-bit pair sums saturate at ``2 * 255 * 127``), so
there LLVM vectorizes the step from its definition. LLVM 22 wants the byte operands of
``vpdpbusd`` as ``<64 x i8>`` (``<32 x i8>`` at 256 bits), hence the reinterprets.

Each implementation comes twice: the GEMV's (``int4_dot_gemv``) also prefetches the codes
``PREFETCH_BYTES`` ahead of the ones it loads. Decode reads every weight once per token, from L3 or
DRAM, and the hardware prefetcher alone left the VNNI GEMVs at about 9 GB/s per core (SmolLM2
w4a8-rtn-g128, one thread, while a second process ran: decode 78 tok/s without, 92-128 with 1 KiB,
92-105 with 2 KiB, 98 with 4 KiB, 79 with 512 B ahead; two threads, quiet: 129 -> 142). The GEMM
re-reads a tile's codes from L1 row after row, where the same prefetch cost 40 % of prefill speed.
"""

from tvm.script import tirx as T

from .dot_intrinsics import register_byte_dot, register_nibble_dot
from .registry import register_target
from .simd import simd_target
from .x86_amx import BLOCK, AmxW8A8Gemm

MACHINES = ("x86_64", "AMD64")
PREFETCH_BYTES = 1024
_PREFETCH_CHANNELS = PREFETCH_BYTES // 4  # the intrinsics' code buffers hold 4 bytes per channel


def _quad_broadcast(B, start: int, lanes: int, dtype: str):
    """Activations ``B[start:start + 4]`` repeated in every 32-bit lane of a ``dtype`` vector."""
    return T.reinterpret(T.broadcast(T.reinterpret(B.vload([start], "int8x4"), dtype="int32"), lanes), dtype=dtype)


def _nibbles(quads, bytes_: int, high: bool):
    """The low or high nibble of each byte of ``quads`` (a ``uint8x{bytes_}`` vector)."""
    if high:
        quads = T.shift_right(quads, T.broadcast(T.uint8(4), bytes_))
    return T.bitwise_and(quads, T.broadcast(T.uint8(15), bytes_))


def _vpdpbusd(acc, unsigned, signed, lanes: int):
    """``vpdpbusd`` on ``lanes`` int32 lanes: 16 (AVX-512 VNNI) or 8 (256 bits: AVX-512 VL or AVX-VNNI)."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"), acc,
                                   T.reinterpret(unsigned, dtype=f"int8x{4 * lanes}"), signed, dtype=f"int32x{lanes}")


def _pmaddubsw(unsigned, signed):
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                   T.reinterpret(unsigned, dtype="int8x32"), signed, dtype="int16x16")


def _prefetch(A):
    """Prefetch the codes ``PREFETCH_BYTES`` ahead of ``A`` (read, all cache levels, data)."""
    return T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(A[_PREFETCH_CHANNELS, 0]),
                              T.int32(0), T.int32(3), T.int32(1))


# The implementations are single expressions: a named temporary in TVMScript becomes a buffer of
# scope "local", which TVM 0.27 allocates from the workspace pool on every call of the step
# (see lowbit.targets.simd.REGISTERS); LLVM loads the repeated code vector once.


def _nibble_dot_vnni(prefetch: bool, lanes: int):
    """The VNNI step on ``lanes`` channels; with ``prefetch``, the codes ``PREFETCH_BYTES`` ahead are
    prefetched too."""
    width = 4 * lanes  # bytes of codes per step

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes, 4), "uint8", offset_factor=1)
        B = T.match_buffer(b, (8,), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:4], B[0:8])
            T.writes(C[0:lanes])
            if prefetch:
                T.evaluate(_prefetch(A))
            C[T.ramp(T.int32(0), 1, lanes)] = _vpdpbusd(
                _vpdpbusd(C.vload([0], f"int32x{lanes}"), _nibbles(A.vload([0, 0], f"uint8x{width}"), width, False),
                          _quad_broadcast(B, 0, lanes, f"int8x{width}"), lanes),
                _nibbles(A.vload([0, 0], f"uint8x{width}"), width, True), _quad_broadcast(B, 4, lanes, f"int8x{width}"),
                lanes)

    return impl


def _byte_dot_vnni(prefetch: bool, lanes: int):
    """The ``w8a8`` step on VNNI, ``lanes`` channels: one ``vpdpbusd`` (unsigned codes, signed activations)."""
    width = 4 * lanes

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes, 4), "uint8", offset_factor=1)
        B = T.match_buffer(b, (4,), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:4], B[0:4])
            T.writes(C[0:lanes])
            if prefetch:
                T.evaluate(_prefetch(A))
            C[T.ramp(T.int32(0), 1, lanes)] = _vpdpbusd(C.vload([0], f"int32x{lanes}"),
                                                        A.vload([0, 0], f"uint8x{width}"),
                                                        _quad_broadcast(B, 0, lanes, f"int8x{width}"), lanes)

    return impl


def _nibble_dot_avx2(prefetch: bool):
    """The AVX2 step; with ``prefetch``, the codes ``PREFETCH_BYTES`` ahead are prefetched too."""

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (8, 4), "uint8", offset_factor=1)
        B = T.match_buffer(b, (8,), "int8", offset_factor=1)
        C = T.match_buffer(c, (8,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:8], A[0:8, 0:4], B[0:8])
            T.writes(C[0:8])
            if prefetch:
                T.evaluate(_prefetch(A))
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], "int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                _pmaddubsw(_nibbles(A.vload([0, 0], "uint8x32"), 32, False), _quad_broadcast(B, 0, 8, "int8x32"))
                + _pmaddubsw(_nibbles(A.vload([0, 0], "uint8x32"), 32, True), _quad_broadcast(B, 4, 8, "int8x32")),
                T.broadcast(T.int16(1), 16), dtype="int32x8")

    return impl


NIBBLE_DOT_VNNI = register_nibble_dot("lowbit_nibble_dot_vnni16", 16, _nibble_dot_vnni(False, 16))
NIBBLE_DOT_VNNI_STREAM = register_nibble_dot("lowbit_nibble_dot_vnni16_prefetch", 16, _nibble_dot_vnni(True, 16))
BYTE_DOT_VNNI = register_byte_dot("lowbit_byte_dot_vnni16", 16, _byte_dot_vnni(False, 16))
BYTE_DOT_VNNI_STREAM = register_byte_dot("lowbit_byte_dot_vnni16_prefetch", 16, _byte_dot_vnni(True, 16))
NIBBLE_DOT_AVX_VNNI = register_nibble_dot("lowbit_nibble_dot_avxvnni8", 8, _nibble_dot_vnni(False, 8))
NIBBLE_DOT_AVX_VNNI_STREAM = register_nibble_dot("lowbit_nibble_dot_avxvnni8_prefetch", 8, _nibble_dot_vnni(True, 8))
BYTE_DOT_AVX_VNNI = register_byte_dot("lowbit_byte_dot_avxvnni8", 8, _byte_dot_vnni(False, 8))
BYTE_DOT_AVX_VNNI_STREAM = register_byte_dot("lowbit_byte_dot_avxvnni8_prefetch", 8, _byte_dot_vnni(True, 8))
NIBBLE_DOT_AVX2 = register_nibble_dot("lowbit_nibble_dot_avx2_8", 8, _nibble_dot_avx2(False))
NIBBLE_DOT_AVX2_STREAM = register_nibble_dot("lowbit_nibble_dot_avx2_8_prefetch", 8, _nibble_dot_avx2(True))

X86_AVX2 = register_target(simd_target(
    name="x86-avx2", family="x86", machines=MACHINES, linear_tile=16, dot_lanes=8, int4_dot=NIBBLE_DOT_AVX2,
    int4_dot_gemv=NIBBLE_DOT_AVX2_STREAM,
    tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"},
    capabilities=("avx2", "fma"),
    description="x86-64 with AVX2 + FMA (Haswell, Zen 1-3 and newer)",
))

X86_AVX_VNNI = register_target(simd_target(
    name="x86-avxvnni", family="x86", machines=MACHINES, linear_tile=16, dot_lanes=8, int4_dot=NIBBLE_DOT_AVX_VNNI,
    int4_dot_gemv=NIBBLE_DOT_AVX_VNNI_STREAM, int8_dot=BYTE_DOT_AVX_VNNI, int8_dot_gemv=BYTE_DOT_AVX_VNNI_STREAM,
    tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "alderlake"},
    capabilities=("avx2", "fma", "avx_vnni"),
    description="x86-64 with AVX2 and the 256-bit AVX-VNNI (Alder Lake and later cores without AVX-512)",
))

X86_VNNI = register_target(simd_target(
    name="x86-vnni", family="x86", machines=MACHINES, linear_tile=32, dot_lanes=16, int4_dot=NIBBLE_DOT_VNNI,
    int4_dot_gemv=NIBBLE_DOT_VNNI_STREAM, int8_dot=BYTE_DOT_VNNI, int8_dot_gemv=BYTE_DOT_VNNI_STREAM,
    tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake"},
    capabilities=("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"),
    description="x86-64 with AVX-512 and VNNI (Cascade Lake, Ice Lake, Zen 4 and newer)",
))

X86_AMX = register_target(simd_target(
    first_rules=(AmxW8A8Gemm(),),
    name="x86-amx", family="x86", machines=MACHINES, linear_tile=32, dot_lanes=16, int4_dot=NIBBLE_DOT_VNNI,
    int4_dot_gemv=NIBBLE_DOT_VNNI_STREAM, int8_dot=BYTE_DOT_VNNI, int8_dot_gemv=BYTE_DOT_VNNI_STREAM,
    int8_gemm_rows=BLOCK,
    # x86-vnni's code generation plus the tile instructions: only the W8A8 GEMMs differ
    tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "cascadelake",
                "mattr": ["+amx-tile", "+amx-int8"]},
    capabilities=("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8"),
    description="x86-64 with AVX-512 VNNI and AMX-INT8 tiles for the W8A8 prefill GEMMs (Sapphire Rapids and later)",
))
