"""dlight rules for the float kernels TVM generates around lowbit's own (the attention products).

Shared by the SIMD CPU families (x86, ARM): they read the vector width from the TVM target.
:func:`lowbit.codegen.build.relax_pipeline` applies them, with dlight's CPU rules, to every kernel
that lowbit's linear rule did not schedule.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width

MATMUL_ROWS = 4  # output rows sharing each loaded vector of B (register tile height)
VECTORS_PER_ROW = 2  # vectors of output columns per register tile row


class BatchMatmul(CPUScheduleRule):
    """``C[..., i, j] = sum_k A[..., i, k] * B[..., k, j]``: attention's ``Q K^T`` and ``P V``.

    Requires a PrimFunc of one block with spatial loops ``..., i, j`` and one reduction loop ``k``
    innermost (what ``LegalizeOps`` makes of ``relax.matmul``), ``j`` the last index of both ``B``
    and ``C`` so that it is contiguous; any loop extent may be symbolic (the sequence lengths).
    Other matmuls return ``None`` and fall through to the next rule.

    Guarantees: batch loops and row blocks fused and run in parallel; a ``MATMUL_ROWS`` x
    (``VECTORS_PER_ROW`` vectors) register tile accumulates over ``k`` and is stored once; the
    column loop is vectorized and hinted for loop partitioning, so a symbolic length gets a
    predicate-free main body and a separate tail.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
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
        accumulator = sch.cache_write(block, 0, "local")
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
