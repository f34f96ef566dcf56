"""Rewrite every linear layer into a call of its scheme's kernel, its weight quantized per the recipe.

Requires: a :class:`~lowbit.passes.model_ir.ModelIR` module (entry functions with ``num_input``,
weights as named trailing parameters), before legalization.

Guarantees: every ``matmul`` whose right operand is a 2-D weight parameter (see
:mod:`lowbit.passes.linear_match`) becomes ``call_tir`` of a :mod:`lowbit.codegen.kernels` PrimFunc
on packed weights in the chip target's layout. Each layer's scheme (:mod:`lowbit.passes.schemes`)
is the recipe's, int8 for layers the recipe keeps, float for layers it ignores or shapes the
scheme cannot hold; its codes come from round to nearest, or from GPTQ for GPTQ recipes (which
need ``statistics``, as static W8A8 does). Both entry functions get the same kernels' GEMV
(``M == 1``) or GEMM (symbolic ``M``) variants and read the same new weights, named
``<weight>.qweight`` / ``.scales`` / ``.zeros`` / ``.act_scale`` (or ``.tiled`` for float). The original
weight stays only where something else still reads it (a tied embedding); ``sync_params`` drops the
rest. ``params`` (the caller's dict) is not changed: the packed weights are in :attr:`QuantizeLinears.params`.
Every decision is recorded in ``report`` (layer, format, reason) for the manifest.

A gather from a weight that a linear layer also reads as ``[N, K]`` (an embedding table tied to the
output head) becomes a lookup in that layer's packed tensors (:func:`lowbit.codegen.kernels.gather_kernel`):
the table is stored once, in the head's format, and the float table is dropped.

A mixture of experts' per-expert weights, a 3-D table gathered per token (``take(W, experts,
axis=0)`` feeding batched matmuls, :func:`lowbit.passes.linear_match.find_expert_tables`), is stored
as one stacked linear weight ``[experts * N, K]`` on the recipe's weight grid by round to nearest,
and the gather becomes a lookup of the chosen experts' rows, dequantized on the way: the experts'
memory is the recipe's, their matmuls stay float (so int8 activations do not apply to them, and
GPTQ and AWQ, whose calibration is collected per linear layer, leave them to round to nearest; the
report line says so).

With ``merge_siblings`` (the default), linears that read the same input and pack alike run as one
kernel on their stacked weights (:mod:`lowbit.passes.sibling_linears`), named
``<merged name>.<suffix>``; each member's report line says which channels of the stack are its own.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax

from lowbit.codegen.errors import LowbitError
from lowbit.codegen.formats import ColumnTiles, LinearFormat
from lowbit.codegen.kernels import gather_kernel, kernel_name, linear_kernel

from .gptq import quantize_gptq_validated
from .linear_match import ExpertTable, find_expert_tables, find_linears, match_linear
from .recipe import WeightQuant
from .schemes import FloatLinear, LinearScheme, QuantizedWeight, linear_scheme
from .schemes.linear import rows
from .sibling_linears import SiblingGroup, sibling_groups, stack_packed


@dataclasses.dataclass
class PackedLinear:
    """One layer's weight as its kernel takes it."""

    scheme: LinearScheme
    fmt: LinearFormat
    layout: ColumnTiles
    n: int
    k: int
    tensors: dict[str, np.ndarray]  # suffix -> array, in kernel argument order
    note: str
    quantized: QuantizedWeight | None = None  # the codes and grid, unless the layer stays float

    @property
    def tag(self) -> str:
        return f"{self.fmt.tag}_{self.layout.tag}"


def pack_linear(weight_nk: np.ndarray, recipe, name: str, chip, statistics=None, kept: bool = False) -> PackedLinear:
    """Quantize (or just re-lay-out) one ``[N, K]`` weight for ``chip``'s kernels.

    ``statistics``, the layer input's :class:`~lowbit.passes.statistics.LinearStatistics`, is required
    by GPTQ recipes (its Hessian) and static W8A8 (its absmax). ``kept``: int8 whatever the recipe.
    """
    n, k = weight_nk.shape
    scheme = linear_scheme(WeightQuant(8)) if kept else linear_scheme(recipe.weights, recipe.activations)
    reason = None
    if not kept and recipe.weights is not None and recipe.is_ignored(name):
        scheme, reason = FloatLinear(), "ignored by recipe"
    elif scheme.unsupported(n, k):
        scheme, reason = FloatLinear(), scheme.unsupported(n, k)
    if scheme.needs_statistics and statistics is None:
        raise LowbitError(f"layer {name}: static int8 activations need calibration statistics for its input, "
                          "and none were collected")
    quantized, method = _round(weight_nk, scheme, recipe.weights, name, statistics, kept)
    fmt = scheme.format(k)
    layout = chip.linear_layout(fmt)
    tensors = scheme.pack(weight_nk, quantized, layout, statistics)
    note = reason or (scheme.describe(quantized, method, tensors) if quantized is not None
                      else "recipe keeps weights in float")
    return PackedLinear(scheme, fmt, layout, n, k, tensors, note, quantized)


def _round(weight_nk, scheme: LinearScheme, wq, name, statistics, kept) -> tuple[QuantizedWeight | None, str]:
    """The codes of ``weight_nk`` on the scheme's grid, and the method that chose them."""
    grid = scheme.weight_grid
    if grid is None:
        return None, "float"
    if kept or not wq.rounds_by_gptq:  # AWQ has already folded its scales into the float weights
        return grid.quantize(weight_nk), "rtn" if kept else wq.method
    if statistics is None:
        raise LowbitError(f"layer {name}: GPTQ needs calibration statistics for it, and none were collected")
    return quantize_gptq_validated(weight_nk, statistics, grid, damp=wq.damp, act_order=wq.act_order, name=name)


@tvm.transform.module_pass(opt_level=0, name="lowbit.QuantizeLinears")
class QuantizeLinears:
    """See the module docstring."""

    def __init__(self, recipe, params: dict[str, np.ndarray], chip, statistics=None, kept=(), progress=None,
                 packed: dict[str, PackedLinear] | None = None, merge_siblings: bool = True):
        """``packed``: layers already packed (GPTQ's stages round them while recalibrating);
        ``merge_siblings``: run linears that read one input as one kernel (off where each layer's
        weight must stay replaceable on its own, as the output probe replaces them)."""
        self.recipe = recipe
        self._given = dict(packed or {})
        self.kept = set(kept)  # layers kept in int8 per-channel RTN whatever the recipe
        self.params = dict(params)
        self.chip = chip
        self.statistics = statistics or {}
        self.progress = progress
        self.merge_siblings = merge_siblings
        self.report: dict[str, str] = {}
        self._packed: dict[str, PackedLinear] = {}
        self._merged: dict[str, PackedLinear | None] = {}

    def packed(self, name: str, transposed: bool) -> PackedLinear:
        """The packed form of weight ``name`` (stored ``[N, K]`` if ``transposed`` else ``[K, N]``)."""
        if name not in self._packed:
            weight = self.params[name]
            entry = self._given.get(name) or pack_linear(weight if transposed else weight.T, self.recipe, name,
                                                         self.chip, self.statistics.get(name), kept=name in self.kept)
            if self.progress is not None:
                self.progress.update(1)
            self._store(name, entry, ", kept by recipe" if name in self.kept else "")
        return self._packed[name]

    def _store(self, name: str, entry: PackedLinear, remark: str) -> None:
        """Keep weight ``name``'s packed form: its report line (``remark`` appended) and its tensors."""
        self._packed[name] = entry
        self.report[name] = f"{entry.tag}: {entry.note}{remark}"
        for suffix, array in entry.tensors.items():
            self.params[f"{name}.{suffix}"] = array

    def packed_experts(self, table: ExpertTable) -> PackedLinear:
        """The stacked ``[experts * N, K]`` packed form of an expert table (see the module docstring)."""
        name = table.name
        if name not in self._packed:
            weight = self.params[name]
            stored = weight if table.rows_first else weight.transpose(0, 2, 1)
            experts, n, k = stored.shape
            entry = pack_linear(np.ascontiguousarray(stored.reshape(experts * n, k)), _expert_recipe(self.recipe),
                                name, self.chip)
            self._store(name, entry, f"; {experts} experts of [{n}, {k}] gathered per token"
                        + _expert_caveat(self.recipe))
        return self._packed[name]

    def merged(self, group: SiblingGroup) -> PackedLinear | None:
        """The stacked form of a sibling group, or ``None`` where its members cannot be merged."""
        if group.name not in self._merged:
            entries = [self.packed(use.name, use.transposed) for use in group.members]
            tensors = stack_packed(entries, entries[0].scheme.shared_tensors)
            entry = None
            if tensors is not None:
                entry = dataclasses.replace(entries[0], n=sum(e.n for e in entries), tensors=tensors,
                                            note=f"{len(entries)} layers stacked", quantized=None)
                start = 0
                for use, member in zip(group.members, entries):
                    self.report[use.name] += f"; channels {start}-{start + member.n} of {group.name}"
                    start += member.n
                for suffix, array in tensors.items():
                    self.params[f"{group.name}.{suffix}"] = array
            self._merged[group.name] = entry
        return self._merged[group.name]

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        for gvar, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function) or "num_input" not in func.attrs:
                continue
            mod = _LinearRewriter(mod, self, kernels, func).rewrite(gvar, func)
        return mod


@relax.expr_functor.mutator
class _LinearRewriter(relax.PyExprMutator):
    def __init__(self, mod, owner: QuantizeLinears, kernels, func):
        super().__init__(mod)
        self.owner = owner
        self.kernels = kernels
        self.var2val = relax.analysis.get_var2val(func)
        self.weights = {p.name for p in func.params[int(func.attrs["num_input"]):]}
        self.new_vars: dict[str, relax.Var] = {}
        groups = sibling_groups(func) if owner.merge_siblings else []
        self.groups = {use.name: group for group in groups for use in group.members}
        self.sibling_outputs: dict[str, relax.Var] = {}  # member weight name -> its slice of the stack
        self.tied = {name for name, use in find_linears(func).items() if use.transposed}  # [N, K] tables
        self.experts = find_expert_tables(func) if owner.recipe.weights is not None else {}

    def rewrite(self, gvar, func) -> tvm.IRModule:
        body = self.visit_expr(func.body)
        params = list(func.params) + list(self.new_vars.values())
        self.builder_.update_func(gvar, relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs))
        return self.builder_.get()

    def _weight_var(self, name: str, array: np.ndarray) -> relax.Var:
        if name not in self.new_vars:
            self.new_vars[name] = relax.Var(name, relax.TensorType(array.shape, str(array.dtype)))
        return self.new_vars[name]

    def _kernel(self, packed: PackedLinear, m, dtype: str) -> tvm.ir.GlobalVar:
        static_m = isinstance(m, (int, tvm.tirx.IntImm))
        n = packed.layout.padded(packed.n)
        key = (packed.fmt, packed.layout, int(m) if static_m else "m", n, packed.k, dtype)
        if key not in self.kernels:
            m_arg = int(m) if static_m else tvm.tirx.Var("m", "int64")
            name = kernel_name(packed.fmt, packed.layout, m_arg, n, packed.k)
            func = linear_kernel(packed.fmt, packed.layout, m_arg, n, packed.k, dtype).with_attrs(
                {"op_pattern": 8, "global_symbol": name}  # opaque: fusion leaves the kernel whole
            )
            self.kernels[key] = self.builder_.add_func(func, name)
        return self.kernels[key]

    def visit_call_(self, call: relax.Call):  # noqa: D401 - TVM visitor hook
        table = call.args[0].name if _is_take(call) and isinstance(call.args[0], relax.Var) else None
        if table in self.tied:
            return self._gather(call)
        if table in self.experts:
            return self._gather_experts(self.experts[table], self.visit_expr(call.args[1]))
        use = match_linear(call, self.var2val, self.weights)
        if use is None:
            return super().visit_call_(call)
        group = self.groups.get(use.name)
        if group is not None and use.name not in self.sibling_outputs:
            merged = self.owner.merged(group)
            if merged is not None:
                self._emit_group(group, merged, self.visit_expr(call.args[0]))
        if use.name in self.sibling_outputs:
            return self.sibling_outputs[use.name]
        packed = self.owner.packed(use.name, use.transposed)
        x = self.visit_expr(call.args[0])
        weights = [self._weight_var(f"{use.name}.{s}", a) for s, a in packed.tensors.items()]
        kernel = self._kernel(packed, rows(x), str(x.ty.dtype))
        return packed.scheme.emit(self.builder_, x, weights, kernel, packed.n, packed.layout)

    def _emit_group(self, group: SiblingGroup, merged: PackedLinear, x: relax.Expr) -> None:
        """One kernel call on the stacked weights, then each member's channels sliced off."""
        weights = [self._weight_var(f"{group.name}.{s}", a) for s, a in merged.tensors.items()]
        kernel = self._kernel(merged, rows(x), str(x.ty.dtype))
        y = self.builder_.emit(merged.scheme.emit(self.builder_, x, weights, kernel, merged.n, merged.layout))
        axis, start = len(y.ty.shape) - 1, 0
        for use in group.members:
            n = self.owner.packed(use.name, use.transposed).n
            self.sibling_outputs[use.name] = self.builder_.emit(
                relax.op.strided_slice(y, axes=[axis], begin=[start], end=[start + n]))
            start += n

    def _gather(self, call: relax.Call) -> relax.Expr:
        """``take(W, ids, axis=0)`` of a tied table as a lookup in W's packed tensors."""
        name = call.args[0].name
        ids = self.visit_expr(call.args[1])
        if int(call.attrs.axis) != 0 or not isinstance(ids.ty, relax.TensorType) or ids.ty.shape is None:
            return super().visit_call_(call)
        return self._lookup(name, self.owner.packed(name, transposed=True), ids, str(call.ty.dtype))

    def _gather_experts(self, table: ExpertTable, experts: relax.Expr) -> relax.Expr:
        """``take(W, experts, axis=0)`` of an expert table: rows ``e * N + [0, N)`` of its stacked
        packed weight for each chosen expert ``e``, as ``[..., N, K]`` (``[..., K, N]`` as stored)."""
        packed = self.owner.packed_experts(table)
        per_expert = packed.n // self.owner.params[table.name].shape[0]
        dtype = str(experts.ty.dtype)
        rows = self.builder_.emit(relax.op.add(
            relax.op.multiply(relax.op.expand_dims(experts, -1), relax.const(per_expert, dtype)),
            relax.const(np.arange(per_expert), dtype)))
        out = self.builder_.emit(self._lookup(table.name, packed, rows, str(self.owner.params[table.name].dtype)))
        if table.rows_first:
            return out
        axes = list(range(len(out.ty.shape)))
        return relax.op.permute_dims(out, axes[:-2] + [axes[-1], axes[-2]])

    def _lookup(self, name: str, packed: PackedLinear, ids: relax.Expr, dtype: str) -> relax.Expr:
        """Output channels ``ids`` of weight ``name``'s packed tensors, dequantized: ``[*ids.shape, K]``."""
        tensors = {s: a for s, a in packed.tensors.items() if s not in packed.scheme.shared_tensors}
        weights = [self._weight_var(f"{name}.{s}", a) for s, a in tensors.items()]
        shape = list(ids.ty.shape)
        static = [isinstance(d, tvm.tirx.IntImm) for d in shape]
        key = ("gather", packed.fmt, packed.layout, packed.n, packed.k, str(ids.ty.dtype),
               tuple(int(d) if s else "?" for d, s in zip(shape, static)))
        if key not in self.kernels:
            dims = [int(d) if s else tvm.tirx.Var(f"n{i}", "int64") for i, (d, s) in enumerate(zip(shape, static))]
            symbol = f"lowbit_gather_{packed.tag}_n{packed.n}_k{packed.k}_" + "x".join(
                str(d) if s else "d" for d, s in zip(key[-1], static))
            func = gather_kernel(packed.fmt, packed.layout, packed.n, packed.k, dims, str(ids.ty.dtype)).with_attrs(
                {"op_pattern": 8, "global_symbol": symbol})
            self.kernels[key] = self.builder_.add_func(func, symbol)
        return relax.call_tir(self.kernels[key], [ids, *weights], relax.TensorType([*shape, packed.k], dtype))


def _expert_recipe(recipe):
    """The recipe for gathered experts: its weight grid by round to nearest, float activations."""
    return dataclasses.replace(recipe, activations=None, smoothing=None,
                               weights=WeightQuant(recipe.weights.bits, recipe.weights.group_size,
                                                   recipe.weights.symmetric))


def _expert_caveat(recipe) -> str:
    """What the experts do not get of ``recipe`` (see the module docstring), for the report."""
    missing = [what for what, applies in ((f"{recipe.weights.method}'s calibration", recipe.weights.method != "rtn"),
                                          ("int8 activations", recipe.activations is not None)) if applies]
    return f" (round to nearest, without {' or '.join(missing)}: collected per linear layer)" if missing else ""


def _is_take(call: relax.Call) -> bool:
    return isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.take"
