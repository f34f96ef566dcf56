"""AMX tiles for the W8A8 GEMM (prefill) on x86 CPUs with AMX-INT8 (Sapphire Rapids and later).

AMX multiplies whole tiles: ``tdpbsud`` adds to a 16 x 16 int32 tile the products of a 16 x 64 tile
of signed bytes (16 rows of activations, 64 inputs each) and a 16 x 64 tile of unsigned bytes laid
out as 16 byte quads of 16 channels (16 x 4 x 16 = 16,384 multiply-adds per instruction against
VNNI's 64). The ``w8a8`` weights are already stored so: a column tile's byte quads
(``W[tile, K/4, t, 4]``, :func:`lowbit.codegen.packing.pack_byte_quads`) give a weight tile every
16 quads and 16 channels, at a row stride of ``4 t`` bytes, with no repacking; the activation codes
``xq[rows, K]`` give an activation tile every 16 rows and 64 inputs. The unsigned operand takes
the codes around their zero point, the signed one the activations, as on VNNI; the kernel's float
epilogue (zero point, scales) is unchanged.

:class:`AmxW8A8Gemm` computes each block of 32 rows x 32 channels in four accumulator tiles
(``tmm0-3``) over the whole input, loading two activation tiles (``tmm4-5``) and two weight tiles
(``tmm6-7``) per 64 inputs: four tile products per four tile loads. The block is one tensor
intrinsic per input width (:func:`amx_block_intrinsic`); it configures the tiles itself (the tile
configuration is per thread and the kernels' parallel tasks run on any thread) and releases them.
The GEMM's rows are padded to whole blocks (:attr:`lowbit.targets.registry.ChipTarget.int8_gemm_rows`).
Kernels it declines (the GEMV, whose one row would fill a sixteenth of a tile; inputs not a
multiple of 64; column tiles not of 32 channels) fall through to the VNNI rule.

Linux grants the tile state per process on request (:func:`lowbit.codegen.host_cpu.request_tile_state`,
which the runtime calls before it loads code for this target); without it the first tile
instruction kills the process with SIGILL.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir import TensorIntrin
from tvm.s_tir.dlight import ScheduleRule
from tvm.script import tirx as T

from lowbit.codegen.formats import W8A8_KINDS
from lowbit.codegen.kernels import ROW_BLOCK_ATTR

from .simd import REGISTERS, linear_kernel_attrs, quantize_rows_in_parallel

BLOCK = 32  # rows and channels of a block: 2 x 2 accumulator tiles of 16 x 16
K_STEP = 64  # inputs per tile product (a tile row holds 64 bytes)
# Tiles: 0-3 accumulate rows 0-15 x channels 0-15, 0-15 x 16-31, 16-31 x 0-15, 16-31 x 16-31;
# 4-5 hold the activations of rows 0-15 and 16-31, 6-7 the weights of channels 0-15 and 16-31.


def amx_instruction(op: str, *args):
    """AMX instruction ``op`` (``ldtilecfg``, ``tilezero``, ``tileloadd64``, ``tdpbsud``,
    ``tilestored64``, ``tilerelease``) as the LLVM intrinsic of that name; tile operands are
    immediates."""
    return T.call_llvm_intrin("void", f"llvm.x86.{op}", *args)


def _tile_memory(instruction, op: str, tile: int, address, stride_bytes):
    """A tile load or store (``op``) of tile ``tile`` at ``address``, rows ``stride_bytes`` apart."""
    return instruction(op, T.uint8(tile), address, T.Cast("int64", stride_bytes))


def _block_desc(k: int):
    """``C[32, 32] = sum_k A[32, k] * B[k / 4, 32, 4]``: the ``w8a8`` kernel's ``matmul`` on a block."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (BLOCK, k), "int8", offset_factor=1)
        B = T.match_buffer(b, (k // 4, BLOCK, 4), "uint8", offset_factor=1)
        C = T.match_buffer(c, (BLOCK, BLOCK), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(B[0:k // 4, 0:BLOCK, 0:4], A[0:BLOCK, 0:k])
            T.writes(C[0:BLOCK, 0:BLOCK])
            for i, n, ko, j in T.grid(BLOCK, BLOCK, k // 4, 4):
                with T.sblock("matmul"):
                    vi, vn, vko, vj = T.axis.remap("SSRR", [i, n, ko, j])
                    T.reads(C[vi, vn], B[vko, vn, vj], A[vi, vko * 4 + vj])
                    T.writes(C[vi, vn])
                    with T.init():
                        C[vi, vn] = 0
                    C[vi, vn] = C[vi, vn] + T.Cast("int32", B[vko, vn, vj]) * T.Cast("int32", A[vi, vko * 4 + vj])

    return desc


def _block_impl(k: int, instruction):
    """The block on AMX tiles (see the module docstring), each tile instruction made by
    ``instruction`` (:func:`amx_instruction`'s arguments). ``C`` is only written, so its first 64
    bytes hold the tile configuration until ``ldtilecfg`` has read it."""

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        a_stride = T.int32()
        b_stride = T.int32()
        c_stride = T.int32()
        A = T.match_buffer(a, (BLOCK, k), "int8", strides=[a_stride, 1], offset_factor=1)
        B = T.match_buffer(b, (k // 4, BLOCK, 4), "uint8", strides=[b_stride, 4, 1], offset_factor=1)
        C = T.match_buffer(c, (BLOCK, BLOCK), "int32", strides=[c_stride, 1], offset_factor=1)
        with T.sblock("root"):
            T.reads(B[0:k // 4, 0:BLOCK, 0:4], A[0:BLOCK, 0:k])
            T.writes(C[0:BLOCK, 0:BLOCK])
            # the configuration as 16 int32 words: word 0 palette 1 (start row 0); words 4-7 tiles 0-7
            # of 64 bytes per row (uint16 each); words 12-13 tiles 0-7 of 16 rows (a byte each)
            for word in T.unroll(16):
                C[0, word] = T.Select(word == 0, 1, T.Select(word >= 4 and word < 8, 0x00400040,
                                                             T.Select(word >= 12 and word < 14, 0x10101010, 0)))
            T.evaluate(instruction("ldtilecfg", T.address_of(C[0, 0])))
            for tile in T.unroll(4):
                T.evaluate(instruction("tilezero", T.Cast("uint8", tile)))
            for step in range(k // K_STEP):
                T.evaluate(_tile_memory(instruction, "tileloadd64", 4, T.address_of(A[0, step * K_STEP]), a_stride))
                T.evaluate(_tile_memory(instruction, "tileloadd64", 5, T.address_of(A[16, step * K_STEP]), a_stride))
                T.evaluate(_tile_memory(instruction, "tileloadd64", 6, T.address_of(B[step * 16, 0, 0]), b_stride))
                T.evaluate(_tile_memory(instruction, "tileloadd64", 7, T.address_of(B[step * 16, 16, 0]), b_stride))
                T.evaluate(instruction("tdpbsud", T.uint8(0), T.uint8(4), T.uint8(6)))
                T.evaluate(instruction("tdpbsud", T.uint8(1), T.uint8(4), T.uint8(7)))
                T.evaluate(instruction("tdpbsud", T.uint8(2), T.uint8(5), T.uint8(6)))
                T.evaluate(instruction("tdpbsud", T.uint8(3), T.uint8(5), T.uint8(7)))
            T.evaluate(_tile_memory(instruction, "tilestored64", 0, T.address_of(C[0, 0]), c_stride * 4))
            T.evaluate(_tile_memory(instruction, "tilestored64", 1, T.address_of(C[0, 16]), c_stride * 4))
            T.evaluate(_tile_memory(instruction, "tilestored64", 2, T.address_of(C[16, 0]), c_stride * 4))
            T.evaluate(_tile_memory(instruction, "tilestored64", 3, T.address_of(C[16, 16]), c_stride * 4))
            T.evaluate(instruction("tilerelease"))

    return impl


_REGISTERED: set[str] = set()


def amx_block_intrinsic(k: int, instruction=amx_instruction) -> str:
    """The registered tensor intrinsic for a 32 x 32 block over ``k`` inputs (a multiple of 64),
    its tile instructions made by ``instruction``."""
    name = f"lowbit_amx_w8a8_block_k{k}" + ("" if instruction is amx_instruction else f"_{id(instruction):x}")
    if name not in _REGISTERED:
        TensorIntrin.register(name, _block_desc(k), _block_impl(k, instruction), override=True)
        _REGISTERED.add(name)
    return name


class AmxW8A8Gemm(ScheduleRule):
    """The W8A8 GEMM (:func:`lowbit.codegen.kernels.w8a8_kernel`, ``M`` rows) on AMX tiles.

    The activations are quantized as :class:`lowbit.targets.simd.W8A8Linear` does (parallel over
    rows). Then, parallel over column tiles: each task computes its tile's int32 sums for every
    row, one 32 x 32 block at a time over the whole input (the tile's codes, ``t * K`` bytes, stay
    in L2 while the row blocks pass), then applies the float epilogue to them (vectorized over
    channels). Declines what the module docstring lists, and kernels whose rows are not padded to
    whole blocks.

    ``instruction`` makes each tile instruction (:func:`amx_instruction`, the default, emits AMX's;
    the tests substitute calls into a software model of the tiles, which runs on any CPU).
    """

    def __init__(self, instruction=amx_instruction):
        self.instruction = instruction

    def apply(self, func, _target, _tunable: bool) -> s_tir.Schedule | None:
        kernel = linear_kernel_attrs(func)
        if kernel is None:
            return None
        tag, gemv, tile = kernel
        if tag not in W8A8_KINDS or gemv or tile % BLOCK or int(func.attrs[ROW_BLOCK_ATTR]) % BLOCK:
            return None
        sch = s_tir.Schedule(func)
        matmul = sch.get_sblock("matmul")
        k_padded = 4 * int(sch.get(sch.get_loops(matmul)[2]).extent)
        if k_padded % K_STEP:
            return None
        quantize_rows_in_parallel(sch)
        rows, channels = sch.get_loops(matmul)[:2]
        row_block, row = sch.split(rows, [None, BLOCK])  # whole blocks: the rows are padded to them
        half, channel = sch.split(channels, [None, BLOCK])
        sch.reorder(row_block, half, row, channel)
        sch.tensorize(row, amx_block_intrinsic(k_padded, self.instruction))
        # a fresh schedule: tensorize leaves the blocks' dependences stale, and compute_at would
        # then neither place the blocks before the epilogue nor limit them to its columns
        sch = s_tir.Schedule(sch.mod)
        output = sch.get_sblock("output")
        rows, channels = sch.get_loops(output)
        n_outer, n_inner = sch.split(channels, [None, tile])
        sch.reorder(n_outer, rows, n_inner)
        sch.parallel(n_outer)
        sch.vectorize(n_inner)
        block = sch.get_sblock("matmul_o")
        sch.compute_at(block, n_outer)
        sch.set_scope(block, 0, REGISTERS)
        return sch
