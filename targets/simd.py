"""ISA-neutral SIMD schedule rules, shared by the CPU families (x86, ARM), as dlight ``ScheduleRule``s.

lowbit's own linear kernels (:mod:`lowbit.codegen.kernels`) are found by their ``lowbit.kernel``
tag and scheduled by :class:`DequantLinear`, :class:`Int4Gemv`, :class:`W8A8Linear` and
:class:`W4A8Linear` (the integer-dot kernels tensorized with the target's byte dot intrinsics), on
the weights' column-tile layout (``lowbit.tile``); the attention products TVM generates get
:class:`BatchMatmul`, and decode's one-row norms and softmax :class:`SingleRowReduction`. Vector
widths come from the TVM target, so the same rules lower to AVX2, AVX-512 or NEON code. A family
lists them in its targets' ``rules`` (:mod:`lowbit.targets.x86`, :mod:`lowbit.targets.arm`), ahead
of dlight's generic CPU rules (:mod:`lowbit.targets.pipeline`).

With ``tunable=True`` :class:`DequantLinear`'s GEMM returns a space (the register tile's row count
sampled) for MetaSchedule; otherwise every rule gives the fixed schedule described on it.
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight import ScheduleRule
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width

from lowbit.codegen.attention import (APPEND_TAG, CHUNK, DECODE_ATTENTION_TAG, DEQUANTIZE_TAG, HEADS_PER_KV_ATTR,
                                      PROMPT_ATTENTION_TAG, ROWS, TILE)
from lowbit.codegen.kivi import KIVI_ATTENTION_TAG, KIVI_GROUP_ATTR, VALUE_BLOCK
from lowbit.codegen.formats import W8A8_KINDS
from lowbit.codegen.kernels import GEMV_ATTR, KERNEL_ATTR, ROW_BLOCK, ROW_BLOCK_ATTR, TILE_ATTR

from .pipeline import cpu_pipeline
from .registry import ChipTarget

# The scope of the small buffers a schedule keeps in registers (accumulators, a tile's partial
# sums). "global": TVM 0.27 puts only global-scope allocations of constant size under 1 KiB on the
# stack (LowerTVMBuiltin), where LLVM promotes them to registers; any other scope ("local")
# becomes a TVMBackendAllocWorkspace/FreeWorkspace pair, inside a parallel loop once per task
# (7 per column tile in the W4A8 GEMV: 5,000 pairs per token for a 49,152-row output head).
REGISTERS = "global"

MATMUL_ROWS = 4  # output rows sharing each loaded vector of B (register tile height)
VECTORS_PER_ROW = 2  # vectors of output columns per register tile row


class BatchMatmul(CPUScheduleRule):
    """``C[..., i, j] = sum_k A[..., i, k] * B[..., k, j]``: attention's ``Q K^T`` and ``P V``.

    Requires a PrimFunc of one block with spatial loops ``..., i, j`` and one reduction loop ``k``
    innermost (what ``LegalizeOps`` makes of ``relax.matmul``), ``j`` the last index of both ``B``
    and ``C`` so that it is contiguous; any loop extent may be symbolic (the sequence lengths).
    Other matmuls, and functions without a root block (extern calls), return ``None`` and fall
    through to the next rule.

    Guarantees: batch loops and row blocks fused and run in parallel; a ``MATMUL_ROWS`` x
    (``VECTORS_PER_ROW`` vectors) register tile accumulates over ``k`` and is stored once; the
    column loop is vectorized and hinted for loop partitioning, so a symbolic length gets a
    predicate-free main body and a separate tail.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        try:
            root = sch.get_sblock("root")
        except s_tir.ScheduleError:  # an extern call (topk's sort, in a mixture of experts' router) has no root
            return None
        blocks = sch.get_child_blocks(root)
        if len(blocks) != 1:
            return None
        block = blocks[0]
        if not _is_batch_matmul(sch.get(block)):
            return None
        *batch, rows, cols, k = sch.get_loops(block)
        row_tile = _tile(sch.get(rows).extent, MATMUL_ROWS)
        col_tile = VECTORS_PER_ROW * max(1, llvm_get_vector_width(target) // 32)
        outer = sch.fuse(*batch) if batch else None
        row_outer, row_inner = sch.split(rows, [None, row_tile])
        col_outer, col_inner = sch.split(cols, [None, col_tile])
        sch.reorder(*([outer] if outer is not None else []), row_outer, col_outer, k, row_inner, col_inner)
        accumulator = sch.cache_write(block, 0, REGISTERS)
        sch.reverse_compute_at(accumulator, col_outer)
        sch.vectorize(sch.get_loops(accumulator)[-1])
        sch.parallel(sch.fuse(outer, row_outer) if outer is not None else row_outer)
        sch.annotate(col_outer, "pragma_loop_partition_hint", 1)
        sch.unroll(row_inner)
        sch.vectorize(col_inner)
        init = sch.decompose_reduction(block, k)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch


def _tile(extent, preferred: int) -> int:
    """``preferred``, or a smaller static extent (decode's single query row) as it is."""
    return int(extent) if isinstance(extent, tirx.IntImm) and int(extent) < preferred else preferred


def _is_batch_matmul(block) -> bool:
    """One reduction iterator, last; ``C[..., i, j] (+)= A[..., i, k] * B[..., k, j]`` by index."""
    kinds = [iv.iter_type for iv in block.iter_vars]
    if kinds[-1] != tirx.IterVar.CommReduce or any(kind != tirx.IterVar.DataPar for kind in kinds[:-1]):
        return False
    if len(block.writes) != 1 or len(block.reads) != 2 or block.init is None:
        return False
    *spatial, k = (iv.var for iv in block.iter_vars)
    if len(spatial) < 2:
        return False
    i, j = spatial[-2:]
    out = _indices(block.writes[0])
    a, b = (_indices(region) for region in block.reads)
    if out is None or a is None or b is None or len(a) != len(out) or len(b) != len(out):
        return False
    if any(not index.same_as(var) for index, var in zip(out, spatial)):
        return False
    if not (a[-2].same_as(i) and a[-1].same_as(k) and b[-2].same_as(k) and b[-1].same_as(j)):
        return False
    return all(x.same_as(y) and x.same_as(v) for x, y, v in zip(a[:-2], b[:-2], spatial[:-2]))


def _indices(region):
    """The point indices of a buffer region, or ``None`` if it covers more than one element."""
    if any(not (isinstance(r.extent, tirx.IntImm) and int(r.extent) == 1) for r in region.region):
        return None
    if any(not isinstance(r.min, tirx.Var) for r in region.region):
        return None
    return [r.min for r in region.region]


class SingleRowReduction(CPUScheduleRule):
    """A fused norm or softmax over one row (decode: ``[1, 1, hidden]``), scheduled serially.

    Requires a PrimFunc of reduction and injective blocks (what FuseOps makes of RMSNorm, LayerNorm,
    softmax) whose reduction blocks have no spatial extent other than 1. dlight's CPU ``Reduction``
    rule mistakes such a function's channel loop for its row loop (the unit row loops are
    normalized away): it runs the channel loop in parallel with the whole reduction recomputed under
    each channel, O(width^2) work with every thread writing the same accumulator. Other functions
    return ``None`` and fall through.

    Guarantees: the blocks run one after another on one thread (a row is microseconds of work, less
    than a thread-pool launch); an innermost loop that is a whole number of vectors is split to the
    vector width, vectorized in injective blocks and unrolled in reductions.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 2 or all(info.is_injective() for info in infos):
            return None
        for info in infos:
            if not info.is_injective() and any(
                    iv.iter_type == tirx.IterVar.DataPar and not _is_one(iv.dom.extent)
                    for iv in sch.get(info.block_rv).iter_vars):
                return None
        lanes = max(llvm_get_vector_width(target) // 32, 2)
        for info in infos:
            inner = sch.get_loops(info.block_rv)[-1]
            extent = sch.get(inner).extent
            if not (isinstance(extent, tirx.IntImm) and int(extent) > lanes and int(extent) % lanes == 0):
                continue  # short or ragged: LLVM's own loop vectorizer takes it
            inner_outer, inner = sch.split(inner, [None, lanes])
            if info.is_injective():
                sch.vectorize(inner)
            else:
                sch.annotate(inner, "pragma_auto_unroll_max_step", lanes)
                sch.annotate(inner, "pragma_unroll_explicit", 1)
        return sch


class CacheKernels(ScheduleRule):
    """The in-place KV cache's kernels (:mod:`lowbit.codegen.attention`, :mod:`lowbit.codegen.kivi`).

    ``kv_append`` (a few hundred elements per token) stays a plain loop nest; ``kv_dequantize``
    (a prefix read back as floats, for an attention no kernel computes) is vectorized over the head
    dimension.

    Decode's attention runs in three parallel stages: the scores, parallel over tiles of key
    positions (:func:`_tile_dot`); the softmax, one query head per task, every loop over positions
    vectorized (the max and sum reductions as vector-width partial results); the value
    accumulation, parallel over chunks of positions and KV heads, each chunk's values read (and a
    quantized cache's codes unpacked) once for the query heads that share them, the heads' partial
    sums in registers, then summed over the chunks. Measured on SmolLM2's shape (9 query heads, 3
    KV heads, 4,000 positions, 2 threads, AMD Zen 4, best of 21): float 63 us per layer with the
    cache in L3 (Xeon, cold: ~360 us, ~17 GB/s of cache read; 672 us while its loops over positions
    carried predicates); int4 on the byte dot products 44 us (85 us with float dot products).

    A prompt's attention is two GEMMs around a row-wise softmax (:func:`_schedule_prompt_attention`):
    75 us per layer for SmolLM2's 64-token prompt, against ~400 us for the imported graph's
    kernels (GQA broadcast, transpose, two batch matmuls, libm softmax) it replaces.
    """

    def __init__(self, dot_lanes: int = 4, int4_dot: str | None = None):
        self.dot_lanes, self.int4_dot = dot_lanes, int4_dot

    def apply(self, func, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None or KERNEL_ATTR not in func.attrs:
            return None
        tag = str(func.attrs[KERNEL_ATTR])
        if tag == APPEND_TAG:
            return s_tir.Schedule(func)
        if tag == DEQUANTIZE_TAG:
            sch = s_tir.Schedule(func)
            sch.vectorize(sch.get_loops(sch.get_sblock("dequantize"))[-1])
            return sch
        if tag == DECODE_ATTENTION_TAG:
            return _schedule_attention(s_tir.Schedule(func), _lanes(target), int(func.attrs[HEADS_PER_KV_ATTR]))
        if tag == KIVI_ATTENTION_TAG:
            return _schedule_kivi_attention(s_tir.Schedule(func), _lanes(target), int(func.attrs[HEADS_PER_KV_ATTR]),
                                            int(func.attrs[KIVI_GROUP_ATTR]), self.dot_lanes, self.int4_dot)
        if tag == PROMPT_ATTENTION_TAG:
            return _schedule_prompt_attention(s_tir.Schedule(func), _lanes(target))
        return None


def _lanes(target: Target) -> int:
    return max(llvm_get_vector_width(target) // 32, 4)


def _schedule_attention(sch: s_tir.Schedule, lanes: int, heads_per_kv: int) -> s_tir.Schedule:
    """:func:`lowbit.codegen.attention.decode_attention_kernel`: it covers whole chunks of
    positions (those past the length masked), so no loop over positions carries a predicate: the
    max and sum run as lane partials, and the value sums stay in registers (under a per-position
    predicate LLVM stored them back at every position)."""
    _tile_dot(sch, "dots")
    for name in ("logits", "shifted"):
        sch.compute_inline(sch.get_sblock(name))
    partials = {name: _lane_partials(sch, name, lanes) for name in ("peak", "total")}
    _accumulate_in_chunks(sch, "mixed", heads_per_kv)
    _per_head(sch)
    _vectorize_positions(sch, ("T_fast_exp", "probabilities"), lanes)
    for name, partial in partials.items():
        _finish_partials(sch, name, partial)
    sch.vectorize(sch.get_loops(sch.get_sblock("out"))[-1])
    _hoist_inits(sch)
    return sch


def _schedule_kivi_attention(sch: s_tir.Schedule, lanes: int, heads_per_kv: int, group: int, dot_lanes: int,
                             int4_dot: str | None) -> s_tir.Schedule:
    """:meth:`lowbit.codegen.kivi.Kivi.attention_kernel`: the same stages, with the quantized and the
    window positions as separate dot products, reductions and accumulations; the quantized keys'
    scores as integer dot products (:func:`_tile_int_dot`), after the query's quantization per head
    and key group (vectorized over channels). The quantized part's length is a multiple of the
    group (so of ``lanes``): its reductions run as lane partials."""
    _tile_int_dot(sch, "dots", dot_lanes, int4_dot)
    for name in ("scaled_q", "shifted", "recent_shifted"):
        sch.compute_inline(sch.get_sblock(name))
    partials = {name: _lane_partials(sch, name, lanes)
                for name in ("q_peak", "offset", "peak_0", "total_0", "weighted_min", "recent_dots")}
    _accumulate_blocks_in_chunks(sch, heads_per_kv, group, dot_lanes, int4_dot)
    _per_head(sch)
    for name in ("q_codes", "p_codes"):  # (channels; positions in a block)
        sch.vectorize(sch.get_loops(sch.get_sblock(name))[-1])
    sch.vectorize(sch.split(sch.get_loops(sch.get_sblock("weighted_scale"))[-1], [None, lanes])[-1])
    sch.unroll(sch.get_loops(sch.get_sblock("p_peak"))[-1])
    _vectorize_positions(sch, ("logits", "T_fast_exp"), lanes)
    for name, partial in partials.items():
        _finish_partials(sch, name, partial)
    *_, channels, position = sch.get_loops(sch.get_sblock("recent_mixed"))  # the window: channels vectorized
    sch.reorder(position, channels)
    sch.vectorize(channels)
    sch.decompose_reduction(sch.get_sblock("recent_mixed"), position)
    sch.vectorize(sch.get_loops(sch.get_sblock("out"))[-1])
    _hoist_inits(sch)
    return sch


def _schedule_prompt_attention(sch: s_tir.Schedule, lanes: int) -> s_tir.Schedule:
    """:func:`lowbit.codegen.attention.prompt_attention_kernel`, in three parallel stages over whole
    blocks (no predicates): the scores as a GEMM (``ROWS`` query rows by two key tiles in
    registers, accumulated over channels); the softmax, one task per query head (rows and heads
    fused would index by a symbolic division, which reductions do not allow), row by row, its
    loops over positions vectorized (max and sum as lane partials); the value sums as a GEMM
    (``ROWS`` rows by up to two vectors of channels, accumulated over positions). The bias's copy
    onto whole blocks (``mask``: one row of positions per query row when the bias is shared by
    the heads) stays a plain loop nest."""
    _register_tile(sch, "dots", 2, TILE)
    for name in ("logits", "shifted"):
        sch.compute_inline(sch.get_sblock(name))
    partials = {name: _lane_partials(sch, name, lanes) for name in ("peak", "total")}
    softmax = [block for block in sch.get_child_blocks(sch.get_sblock("root"))
               if not sch.get(block).name_hint.startswith(("mask", "dots", "mixed", "out"))]
    sch.parallel(sch.merge(*(sch.get_loops(block)[0] for block in softmax)))
    sch.merge(*(sch.get_loops(block)[1] for block in softmax))
    for name in ("T_fast_exp", "probabilities"):
        _, lane = sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, lanes])
        sch.vectorize(lane)
    for name, partial in partials.items():
        _finish_partials(sch, name, partial)
    head_dim = int(sch.get(sch.get_loops(sch.get_sblock("mixed"))[2]).extent)
    channel_lanes = lanes if head_dim % lanes == 0 else head_dim  # (an odd head size: one vector LLVM splits)
    _register_tile(sch, "mixed", 2 if head_dim % (2 * channel_lanes) == 0 else 1, channel_lanes)
    *_, channels = sch.get_loops(sch.get_sblock("out"))
    sch.vectorize(channels)
    return sch


def _register_tile(sch: s_tir.Schedule, name: str, vectors: int, lanes: int) -> None:
    """Block ``name`` (loops: head, row, column, reduction; rows a multiple of ``ROWS``, columns of
    ``vectors * lanes``) as a GEMM: parallel over heads and row blocks, a tile of ``ROWS`` x
    ``vectors`` vectors of ``lanes`` results in registers accumulated over the reduction (a vector
    never straddles two key tiles when ``lanes`` is ``TILE``)."""
    block = sch.get_sblock(name)
    head, row, column, reduction = sch.get_loops(block)
    row_block, row = sch.split(row, [None, ROWS])
    column_block, vector, lane = sch.split(column, [None, vectors, lanes])
    sch.reorder(head, row_block, column_block, reduction, row, vector, lane)
    accumulator = sch.cache_write(block, 0, REGISTERS)
    sch.reverse_compute_at(accumulator, column_block)
    sch.vectorize(sch.get_loops(accumulator)[-1])
    sch.parallel(sch.fuse(head, row_block))
    sch.unroll(row)
    sch.unroll(vector)
    sch.vectorize(lane)
    sch.decompose_reduction(block, reduction)


def _hoist_inits(sch: s_tir.Schedule) -> None:
    """Every remaining reduction's initialization as its own loop nest before the reduction loops.

    TIR lowers a reduction's ``init`` into its first iteration, so a reduction over an empty range
    (kv4's quantized part before the first group fills) would leave its output unwritten."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).init is not None:
            outputs = len(sch.get(block).writes[0].region)
            sch.decompose_reduction(block, sch.get_loops(block)[outputs])


def _tile_dot(sch: s_tir.Schedule, name: str) -> None:
    """Block ``name`` (a score per query head and position, reduced over channels; keys in tiles of
    ``TILE`` positions) as, per tile: for each channel, every head's partial scores of the tile's
    positions, one vector each (independent accumulators, no horizontal sums, each key tile read
    once for the heads that share it); a predicate-free main loop over whole tiles and one tail."""
    block = sch.get_sblock(name)
    written = sch.cache_write(block, 0, REGISTERS)  # the tile's scores stay in registers
    head, position, *channels = sch.get_loops(block)
    tile, lane = sch.split(position, [None, TILE])
    sch.reorder(tile, *channels, head, lane)
    for loop in (*channels[1:], head):  # (kv4: both nibbles of one byte per step)
        sch.unroll(loop)
    sch.vectorize(lane)
    sch.annotate(tile, "pragma_loop_partition_hint", 1)
    sch.reverse_compute_at(written, tile)
    sch.vectorize(sch.get_loops(written)[-1])
    sch.parallel(tile)
    sch.decompose_reduction(block, channels[0])


def _tile_int_dot(sch: s_tir.Schedule, name: str, lanes: int, intrinsic: str | None) -> None:
    """Block ``name`` (an int32 score per query head and position, reduced over nibble quads, their
    two nibbles and four bytes; keys in tiles of ``TILE`` positions) as, per tile and vector of
    ``lanes`` positions: for each quad, every head's partial scores (one vector each, in
    registers), each step tensorized with the target's ``int4_dot`` ``intrinsic`` (or vectorized
    by LLVM where it names none); parallel over tiles."""
    block = sch.get_sblock(name)
    written = sch.cache_write(block, 0, REGISTERS)
    head, position, quad, nibble, byte = sch.get_loops(block)
    tile, vector, lane = sch.split(position, [None, TILE // lanes, lanes])
    sch.reorder(tile, vector, quad, head, lane, nibble, byte)
    sch.unroll(head)
    sch.reverse_compute_at(written, tile)
    sch.vectorize(sch.get_loops(written)[-1])
    sch.parallel(tile)
    init = sch.decompose_reduction(block, quad)
    sch.vectorize(sch.get_loops(init)[-1])
    _quad_dot(sch, lane, nibble, byte, intrinsic)


def _quad_dot(sch: s_tir.Schedule, lane, nibble, byte, intrinsic: str | None) -> None:
    """The loops ``(lane, nibble, byte)`` of an int32 sum over nibble quads (one vector of lanes):
    tensorized with the target's ``int4_dot`` ``intrinsic``, or, where it names none, vectorized
    over the lanes by LLVM with the quad unrolled."""
    if intrinsic is not None:
        sch.tensorize(lane, intrinsic)
    else:
        sch.vectorize(lane)
        sch.unroll(nibble)
        sch.unroll(byte)


def _lane_partials(sch: s_tir.Schedule, name: str, lanes: int) -> s_tir.SBlockRV:
    """Block ``name``'s innermost reduction as ``lanes`` partial results (``rfactor``), which
    :func:`_finish_partials` vectorizes once the loops are in place; returns the partials' block."""
    block = sch.get_sblock(name)
    _, lane = sch.split(sch.get_loops(block)[-1], [None, lanes])
    return sch.rfactor(lane, len(sch.get(block).writes[0].region))


def _finish_partials(sch: s_tir.Schedule, name: str, partial: s_tir.SBlockRV) -> None:
    """The partial results' lanes vectorized, both reductions initialized before their loops."""
    *_, positions, lane = sch.get_loops(partial)
    sch.vectorize(lane)
    sch.decompose_reduction(partial, positions)
    block = sch.get_sblock(name)
    sch.decompose_reduction(block, sch.get_loops(block)[-1])


def _accumulate_in_chunks(sch: s_tir.Schedule, name: str, heads_per_kv: int) -> None:
    """Block ``name`` (per query head and channel, a sum over positions of a weight times a value)
    as partial sums over chunks of ``CHUNK`` positions, parallel over chunks and KV heads:
    per position, the KV head's values read once for its ``heads_per_kv`` query heads, whose sums
    stay in registers, channels vectorized; then the chunks' sums added, channels vectorized."""
    block = sch.get_sblock(name)
    chunk, _ = sch.split(sch.get_loops(block)[-1], [None, CHUNK])
    partial = sch.rfactor(chunk, 0)
    head, *channels, chunk, position = sch.get_loops(partial)
    kv_head, shared = sch.split(head, [None, heads_per_kv])
    sch.reorder(chunk, kv_head, position, shared, *channels)
    task = sch.fuse(chunk, kv_head)
    sch.parallel(task)
    sums = sch.cache_write(partial, 0, REGISTERS)
    sch.reverse_compute_at(sums, task)
    sch.vectorize(sch.get_loops(sums)[-1])
    sch.unroll(shared)
    for loop in channels[:-1]:
        sch.unroll(loop)
    sch.vectorize(channels[-1])
    sch.decompose_reduction(partial, position)
    _sum_chunks(sch, block)


def _sum_chunks(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> None:
    """``block`` (loops: head, channels..., chunk) summing the chunks' partial sums, the last
    channel loop vectorized under the chunk loop."""
    head, *channels, chunk = sch.get_loops(block)
    sch.reorder(chunk, channels[-1])
    sch.vectorize(channels[-1])
    sch.decompose_reduction(block, chunk)


def _accumulate_blocks_in_chunks(sch: s_tir.Schedule, heads_per_kv: int, group: int, lanes: int,
                                 intrinsic: str | None) -> None:
    """kv4's value accumulation (``mixed``: per query head and channel, a sum over blocks of
    ``VALUE_BLOCK`` positions of an int32 dot product ``mixed_blocks`` times the block's step) as partial sums over
    chunks of ``gcd(CHUNK, group)`` positions (the quantized positions are whole groups: no chunk
    is partial), parallel over chunks: per KV head and block, the KV head's
    query heads' int32 sums in registers, ``lanes`` channels at a time tensorized with the target's
    ``int4_dot`` ``intrinsic`` (or vectorized by LLVM where it names none), then scaled into the float
    sums, also in registers; then the chunks' sums added, channels vectorized."""
    block = sch.get_sblock("mixed")
    head, channel, blocks = sch.get_loops(block)
    chunk, inner = sch.split(blocks, [None, math.gcd(CHUNK, group) // VALUE_BLOCK])
    partial = sch.rfactor(chunk, 0)
    head, channel, chunk, inner = sch.get_loops(partial)
    kv_head, shared = sch.split(head, [None, heads_per_kv])
    sch.reorder(chunk, kv_head, inner, shared, channel)
    sch.parallel(chunk)  # (not fused with the KV heads: a block under a fused loop is no reduction to TIR)
    products = _partials_in_registers(sch, partial, kv_head, inner, "mixed_blocks")
    *_, heads, groups, channels, nibble, byte = sch.get_loops(products)
    vectors, lane = sch.split(channels, [None, lanes])
    init = sch.decompose_reduction(products, lane)
    _quad_dot(sch, lane, nibble, byte, intrinsic)
    sch.vectorize(sch.get_loops(init)[-1])
    for loop in (heads, groups, vectors):
        sch.unroll(loop)
    sch.unroll(shared)
    sch.vectorize(channel)
    sch.decompose_reduction(partial, inner)
    _sum_chunks(sch, block)


def _per_head(sch: s_tir.Schedule) -> None:
    """The softmax's loop nests (everything at the function's top level between the scores and the
    value accumulation, and between that and the output) merged into one loop over query heads per
    side, run in parallel; to be applied while their reductions still carry their initialization and
    before loops are split with predicates (the parallel loop's blocks must be complete or
    reductions). Requires each of them to start with a loop over query heads and to read
    only its own head's entries of the others (true of the attention kernels' softmax stages)."""
    nests = []  # the top-level loops in order, with the names of the blocks under each
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        top = sch.get_loops(block)[0]
        if nests and sch.get(nests[-1][0]).same_as(sch.get(top)):
            nests[-1][1].append(sch.get(block).name_hint)
        else:
            nests.append((top, [sch.get(block).name_hint]))
    stages, current = [], []
    for top, names in nests:
        if any(name.startswith(("dots", "mixed", "out")) for name in names):
            stages.append(current)
            current = []
        else:
            current.append(top)
    for loops in [*stages, current]:
        if loops:
            sch.parallel(sch.merge(*loops) if len(loops) > 1 else loops[0])


def _vectorize_positions(sch: s_tir.Schedule, names, lanes: int) -> None:
    """Blocks ``names`` (loops: query head, position[, more]) vectorized over ``lanes`` positions."""
    for name in names:
        _, lane = sch.split(sch.get_loops(sch.get_sblock(name))[1], [None, lanes])
        sch.vectorize(lane)


def _is_one(extent) -> bool:
    return isinstance(extent, tirx.IntImm) and int(extent) == 1


GEMM_ROWS = 4  # rows of X sharing each dequantized weight vector in the GEMM register tile
ROW_TILES = (2, 4, 8)  # the register tile's row counts a tunable GEMM space samples from


class _LinearRule(ScheduleRule):
    """A rule for lowbit's linear kernels of some format tags; subclasses say which and how."""

    def matches(self, tag: str, gemv: bool) -> bool:
        raise NotImplementedError

    def schedule(self, sch: s_tir.Schedule, gemv: bool, tile: int, tunable: bool) -> None:
        raise NotImplementedError

    def apply(self, func, target: Target, tunable: bool) -> s_tir.Schedule | None:
        kernel = linear_kernel_attrs(func)
        if kernel is None or not self.matches(kernel[0], kernel[1]):
            return None
        sch = s_tir.Schedule(func)
        self.schedule(sch, kernel[1], kernel[2], tunable)
        return sch


def linear_kernel_attrs(func) -> tuple[str, bool, int] | None:
    """``(format tag, gemv, column tile)`` of one of lowbit's linear kernels
    (:func:`lowbit.codegen.kernels.linear_kernel`); ``None`` for any other function."""
    if not isinstance(func, tirx.PrimFunc) or func.attrs is None or TILE_ATTR not in func.attrs:
        return None
    return str(func.attrs[KERNEL_ATTR]), bool(func.attrs[GEMV_ATTR]), int(func.attrs[TILE_ATTR])


def _row_tile(sch: s_tir.Schedule, tunable: bool, fixed: int):
    return sch.sample_categorical(list(ROW_TILES), [1 / len(ROW_TILES)] * len(ROW_TILES)) if tunable else fixed


K_CHUNK_QUADS = 256  # the W8A8 GEMM's input chunk, in byte quads: a tile's codes for it stay in L2


def _input_chunk(extent, preferred: int) -> int:
    """A chunk of a static reduction extent: its largest divisor up to ``preferred`` (no partial
    chunk, so no predicate), or the whole extent where that divisor is under a quarter of it."""
    n = int(extent)
    divisor = max(d for d in range(1, min(n, preferred) + 1) if n % d == 0)
    return divisor if divisor * 4 >= min(n, preferred) else n


class W8A8Linear(_LinearRule):
    """A W8A8 kernel (:func:`lowbit.codegen.kernels.w8a8_kernel`), GEMV and GEMM.

    The activations are quantized once, before the matmul: per-row absmax, int8 codes and their sum
    (LLVM vectorizes these loops over K), parallel over rows in the GEMM. The byte dot product runs
    parallel over column tiles, tensorized with the target's ``int8_dot`` intrinsic (``int8_dot_gemv``
    for the GEMV) where it names one, into a register tile of int32 accumulators: the tile's vectors
    of ``lanes`` channels (independent chains) times one row (GEMV) or ``ROW_BLOCK`` rows (GEMM: the
    kernel pads its rows to its row block, a multiple of this, so the tensorized loops carry no predicate),
    each vector of codes loaded once for the block's rows. The GEMM runs the inputs in chunks of
    ``K_CHUNK_QUADS`` quads, all row blocks per chunk, so the tile's codes for a chunk are read from
    L2 by every row block (a whole 4,096-input tile is 256 KiB: with both cores streaming their own,
    re-reading it per row block from L3 halved the second core's gain: 215 GMAC/s on 2 threads
    against 192 on one, 396 chunked); the chunk's sums are added to the tile's accumulators in
    memory. The float epilogue (zero point, scales) is applied per tile and row block.
    """

    def __init__(self, lanes: int, intrinsic: str | None, gemv_intrinsic: str | None = None):
        self.lanes, self.intrinsic, self.gemv_intrinsic = lanes, intrinsic, gemv_intrinsic or intrinsic

    def matches(self, tag: str, gemv: bool) -> bool:
        return tag in W8A8_KINDS

    def schedule(self, sch, gemv, tile, tunable):
        if not gemv:
            quantize_rows_in_parallel(sch)
        output = sch.get_sblock("output")
        rows, channels = sch.get_loops(output)
        # the output's rows in blocks of the kernel's row padding: the int32 sums cover them whole
        row_outer, row_inner = sch.split(rows, [None, 1 if gemv else int(sch.mod["main"].attrs[ROW_BLOCK_ATTR])])
        n_outer, n_inner = sch.split(channels, [None, tile])
        sch.reorder(n_outer, row_outer, row_inner, n_inner)
        sch.parallel(n_outer)
        sch.vectorize(n_inner)
        matmul = sch.get_sblock("matmul")
        if gemv:
            sch.compute_at(matmul, row_outer)
            channels, ko, j = sch.get_loops(matmul)[2:]
            rows = []
        else:
            sch.compute_at(matmul, n_outer)
            m_rows, channels, ko, j = sch.get_loops(matmul)[1:]
            block_rows, row = sch.split(m_rows, [None, ROW_BLOCK])
            chunk, ko = sch.split(ko, [None, _input_chunk(sch.get(ko).extent, K_CHUNK_QUADS)])
            sch.reorder(chunk, block_rows, ko, row, channels, j)
            rows = [row]
        outermost_reduction = ko if gemv else chunk
        sch.set_scope(matmul, 0, REGISTERS)
        vectors, lanes = sch.split(channels, [None, self.lanes])
        sch.reorder(ko, *rows, vectors, lanes, j)
        intrinsic = self.gemv_intrinsic if gemv else self.intrinsic
        if intrinsic is not None:
            init = sch.decompose_reduction(matmul, outermost_reduction)
            sch.tensorize(lanes, intrinsic)
        else:
            sch.reorder(j, lanes)
            sch.vectorize(lanes)
            sch.unroll(j)
            init = sch.decompose_reduction(matmul, outermost_reduction)
        for loop in (*rows, vectors):
            sch.unroll(loop)
        sch.vectorize(sch.get_loops(init)[-1])


def quantize_rows_in_parallel(sch: s_tir.Schedule) -> None:
    """A W8A8 GEMM's activation quantization (absmax, codes, code sums) parallel over rows."""
    static = str(sch.mod["main"].attrs[KERNEL_ATTR]) == "w8a8_static"
    for name in ("act_quant", "act_sum") if static else ("act_absmax", "act_quant", "act_sum"):
        sch.parallel(sch.get_loops(sch.get_sblock(name))[0])


def _group_partials_per_tile(sch: s_tir.Schedule, tile: int):
    """The shared frame of the per-group kernels (``partial`` sums per group, then ``matmul`` over
    groups): parallel over column tiles of ``tile`` channels; per row, the tile's float outputs
    accumulate in registers over the groups, each group's ``partial`` computed in registers under the
    group loop. Returns the ``matmul`` and ``partial`` blocks, the group loop and the vector loop."""
    matmul = sch.get_sblock("matmul")
    m, n, g = sch.get_loops(matmul)
    n_outer, n_inner = sch.split(n, [None, tile])
    sch.reorder(n_outer, m, g, n_inner)
    sch.parallel(n_outer)
    return matmul, _partials_in_registers(sch, matmul, m, g), g, n_inner


def _partials_in_registers(sch: s_tir.Schedule, matmul: s_tir.SBlockRV, outputs, group,
                           name: str = "partial") -> s_tir.SBlockRV:
    """``matmul``'s float outputs accumulated in registers under loop ``outputs`` (written back
    after it), each group's partial sums (block ``name``) computed in registers under loop
    ``group``; returns the partial sums' block."""
    acc = sch.cache_write(matmul, 0, REGISTERS)
    sch.reverse_compute_at(acc, outputs)
    sch.vectorize(sch.get_loops(acc)[-1])
    partial = sch.get_sblock(name)
    sch.compute_at(partial, group)
    sch.set_scope(partial, 0, REGISTERS)
    return partial


class Int4Gemv(_LinearRule):
    """The int4 GEMV (:func:`lowbit.codegen.kernels.int4_gemv_kernel`), decode.

    Parallel over column tiles. For each tile and group, the tile's partial sums live in vector
    registers while the group's codes stream past (the 8 codes of a packed word unrolled, one
    multiply-add each); the group's scale and zero point are then applied to the tile's output
    accumulators, also in registers. A partial last group is split off by loop partitioning.
    """

    def matches(self, tag: str, gemv: bool) -> bool:
        return gemv and tag.startswith("int4")

    def schedule(self, sch, gemv, tile, tunable):
        matmul, partial, g, n_inner = _group_partials_per_tile(sch, tile)
        channels, r = sch.get_loops(partial)[-2:]
        r_outer, r_inner = sch.split(r, [None, 8])
        sch.reorder(r_outer, r_inner, channels)
        sch.vectorize(channels)
        sch.unroll(r_inner)
        sch.vectorize(n_inner)
        sch.annotate(g, "pragma_loop_partition_hint", 1)
        init = sch.decompose_reduction(partial, r_outer)
        sch.vectorize(sch.get_loops(init)[-1])
        init = sch.decompose_reduction(matmul, g)
        sch.vectorize(sch.get_loops(init)[-1])


class DequantLinear(_LinearRule):
    """The float, int8 and int4 kernels with an inlinable ``dequant`` block, GEMV and GEMM.

    Parallel over column tiles; within a tile the channels are vectorized with register accumulators
    and the 8 codes of a packed word unrolled; dequantization is inlined into the product (never a
    float weight buffer). GEMV (decode, ``M == 1``): one accumulator row. GEMM (prefill): a
    ``GEMM_ROWS``-row register tile, so each dequantized weight vector serves that many rows (LLVM
    computes it once for the unrolled rows); the row-block loop is hinted for loop partitioning, so
    the symbolic row count gets a predicate-free main loop and one tail.
    """

    def matches(self, tag: str, gemv: bool) -> bool:
        return tag in ("f32", "int8") or tag.startswith("int4")

    def schedule(self, sch, gemv, tile, tunable):
        matmul = sch.get_sblock("matmul")
        m, n, k = sch.get_loops(matmul)
        n_outer, n_inner = sch.split(n, [None, tile])
        k_outer, k_inner = sch.split(k, [None, 8])
        if gemv:
            sch.reorder(n_outer, m, k_outer, k_inner, n_inner)
            row_loop = n_outer
        else:
            row_loop, m_inner = sch.split(m, [None, _row_tile(sch, tunable, GEMM_ROWS)])
            sch.reorder(n_outer, row_loop, k_outer, k_inner, m_inner, n_inner)
            sch.unroll(m_inner)
            sch.annotate(row_loop, "pragma_loop_partition_hint", 1)  # main loop without bounds checks + tail
        sch.compute_inline(sch.get_sblock("dequant"))
        acc = sch.cache_write(matmul, 0, REGISTERS)
        sch.reverse_compute_at(acc, row_loop)
        sch.vectorize(sch.get_loops(acc)[-1])
        sch.vectorize(n_inner)
        sch.unroll(k_inner)
        sch.parallel(n_outer)
        init = sch.decompose_reduction(matmul, k_outer)
        sch.vectorize(sch.get_loops(init)[-1])


class W4A8Linear(_LinearRule):
    """The W4A8 kernel (:func:`lowbit.codegen.kernels.w4a8_kernel`), GEMV and GEMM.

    The activations are quantized first, per row and group (parallel over rows in the GEMM). Then,
    parallel over column tiles: for each group, the tile's int32 accumulators (one vector per
    ``dot_lanes`` channels, unrolled: independent chains) take the group's dot products 8 inputs at
    a time, tensorized with the target's ``int4_dot`` intrinsic (``int4_dot_gemv`` for the GEMV)
    where it names one; the group's scales and zero points are then applied to the float output
    accumulators in registers. The GEMV does this for its one row; the GEMM for blocks of
    ``ROW_BLOCK`` rows and half a tile (:meth:`_row_blocks`), so each vector of codes is loaded and
    unpacked once for the block's rows, the tile's codes (``tile * K / 2`` bytes) staying in L2
    while the row blocks pass over them.
    """

    def __init__(self, lanes: int, intrinsic: str | None, gemv_intrinsic: str | None = None):
        self.lanes, self.intrinsic, self.gemv_intrinsic = lanes, intrinsic, gemv_intrinsic or intrinsic

    def matches(self, tag: str, gemv: bool) -> bool:
        return tag.startswith("w4a8")

    def schedule(self, sch, gemv, tile, tunable):
        if gemv:
            matmul, partial, g, n_inner = _group_partials_per_tile(sch, tile)
            rows = []
        else:
            for name in ("act_absmax", "act_quant", "act_sum"):
                sch.parallel(sch.get_loops(sch.get_sblock(name))[0])
            matmul, partial, g, n_inner = self._row_blocks(sch, tile)
            rows = sch.get_loops(partial)[-5:-4]
        channels, ko, h, j = sch.get_loops(partial)[-4:]
        vectors, lanes = sch.split(channels, [None, self.lanes])
        init = None
        intrinsic = self.gemv_intrinsic if gemv else self.intrinsic
        if intrinsic is not None:
            sch.reorder(ko, *rows, vectors, lanes, h, j)
            init = sch.decompose_reduction(partial, ko)
            sch.tensorize(lanes, intrinsic)
        else:
            sch.reorder(ko, *rows, vectors, h, j, lanes)
            init = sch.decompose_reduction(partial, ko)
            sch.vectorize(lanes)
            sch.unroll(h)
            sch.unroll(j)
        for loop in (*rows, vectors):
            sch.unroll(loop)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(n_inner)
        init = sch.decompose_reduction(matmul, g)
        sch.vectorize(sch.get_loops(init)[-1])

    def _row_blocks(self, sch: s_tir.Schedule, tile: int):
        """The GEMM's frame: parallel over column tiles; per block of ``ROW_BLOCK`` rows and half a
        tile (``ROW_BLOCK`` x half the tile's vectors of int32 partial sums and as many float
        accumulators fit the vector registers), the group loop, each group's partial sums computed
        in registers with each vector of codes unpacked once for the block's rows. Returns what
        :func:`_group_partials_per_tile` does."""
        matmul = sch.get_sblock("matmul")
        m, n, g = sch.get_loops(matmul)
        half = max(self.lanes, tile // 2)
        n_outer, n_half, n_inner = sch.split(n, [None, tile // half, half])
        m_outer, m_inner = sch.split(m, [None, ROW_BLOCK])
        sch.reorder(n_outer, m_outer, n_half, g, m_inner, n_inner)
        sch.parallel(n_outer)
        sch.annotate(m_outer, "pragma_loop_partition_hint", 1)  # whole row blocks, then the tail
        partial = _partials_in_registers(sch, matmul, n_half, g)
        sch.unroll(m_inner)
        return matmul, partial, g, n_inner


LINEAR_RULES = (Int4Gemv(), DequantLinear())  # the most specific first


def simd_target(first_rules: tuple = (), **fields) -> ChipTarget:
    """A CPU target on these rules and the CPU pipeline; ``fields`` as :class:`ChipTarget` takes them
    (``dot_lanes``, ``int4_dot``, ``int8_dot`` and their ``_gemv`` variants also configure the
    ``w4a8`` and ``w8a8`` rules). ``first_rules`` are tried before these (a kernel they decline
    falls through to the SIMD rules)."""
    lanes = fields.get("dot_lanes", 4)
    w8a8 = W8A8Linear(lanes, fields.get("int8_dot"), fields.get("int8_dot_gemv"))
    w4a8 = W4A8Linear(lanes, fields.get("int4_dot"), fields.get("int4_dot_gemv"))
    cache = CacheKernels(lanes, fields.get("int4_dot"))
    return ChipTarget(rules=(*first_rules, w8a8, *LINEAR_RULES, w4a8, cache, BatchMatmul(), SingleRowReduction()),
                      pipeline=cpu_pipeline,
                      **fields)
