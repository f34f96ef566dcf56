"""Rewrite every linear layer into a lowbit linear kernel call, quantizing its weight per the recipe.

Requires: a :class:`~lowbit.compiler.model_ir.ModelIR` module (entry functions with ``num_input``,
weights as named trailing parameters). Run before legalization.

Guarantees: every ``matmul`` whose right operand is a 2-D weight parameter (see
:mod:`lowbit.passes.linear_match`) becomes ``call_tir`` of a :mod:`lowbit.codegen.kernels` PrimFunc
on packed, column-tiled weights: int8/int4 codes with scales (RTN) where the recipe quantizes it,
float otherwise (ignored layers, ``fp32``, shapes the format cannot hold); W8A8 recipes get the
kernels that quantize the activations too (per token, or with a static ``.act_scale`` per layer).
GPTQ and static W8A8 recipes need ``statistics`` (weight name -> calibration statistics, see
:mod:`lowbit.compiler.calibration`).
Both entry functions get the same kernels' GEMV (``M == 1``) or GEMM (symbolic ``M``) variants and read the same new weights,
named ``<weight>.qweight`` / ``.scales`` / ``.zeros`` / ``.act_scale`` (or ``.tiled`` for float). The original weight
stays only where something else still reads it (a tied embedding); ``sync_params`` drops the rest.
Every decision is recorded in ``report`` (layer, format, reason) for the manifest.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax, tirx

from lowbit.codegen.kernels import INT8_QMAX, LinearFormat, linear_kernel
from lowbit.codegen.packing import INT4_PER_WORD, pack_int4, to_column_tiles
from lowbit.compiler.errors import LowbitError
from lowbit.compiler.recipes import Recipe, WeightQuant

from .gptq import quantize_gptq_validated
from .linear_match import match_linear
from .rtn import QuantizedWeight, quantize_rtn


@dataclasses.dataclass
class PackedLinear:
    fmt: LinearFormat
    n: int
    k: int
    tensors: dict[str, np.ndarray]  # suffix -> array, in kernel argument order
    note: str
    quantized: QuantizedWeight | None = None  # the codes and grid, unless the layer stays float


def pack_linear(weight_nk: np.ndarray, recipe, name: str, tile: int, statistics=None) -> PackedLinear:
    """Quantize (or just re-lay-out) one ``[N, K]`` weight for the kernels.

    ``statistics``, the layer input's :class:`~lowbit.compiler.calibration.LinearStatistics`, is
    required by GPTQ recipes (its Hessian) and by static W8A8 recipes (its absmax).
    """
    n, k = weight_nk.shape
    wq = recipe.weights
    reason = None
    if wq is None:
        reason = "recipe keeps weights in float"
    elif recipe.is_ignored(name):
        reason = "ignored by recipe"
    elif wq.bits < 8 and k % INT4_PER_WORD:
        reason = f"K={k} is not a multiple of {INT4_PER_WORD} (int4 codes per word)"
    if reason is not None:
        tiled = to_column_tiles(np.ascontiguousarray(weight_nk.T, dtype=np.float32), tile)
        return PackedLinear(LinearFormat("f32", tile), n, k, {"tiled": tiled}, reason)
    q, method = _quantize(weight_nk, wq, name, statistics)
    if wq.bits == 8:
        codes = (q.codes.astype(np.int16) - 128).astype(np.int8)
        tensors = {
            "qweight": to_column_tiles(codes, tile),
            "scales": to_column_tiles(q.scales, tile)[:, 0, :].copy(),
        }
        act = recipe.activations
        if act is None:
            return PackedLinear(LinearFormat("int8", tile), n, k, tensors, f"int8 per channel, {method}", q)
        if q.group_size != k:
            raise LowbitError(f"layer {name}: int8 activations need per-channel weight scales, "
                              f"but the recipe groups weights by {q.group_size}")
        note = f"int8 weights per channel ({method}), int8 activations per {act.granularity}"
        if act.granularity == "token":
            return PackedLinear(LinearFormat("w8a8", tile), n, k, tensors, note, q)
        tensors["act_scale"] = _static_act_scale(statistics, name)
        note += f" (static scale {tensors['act_scale'][0]:.4g})"
        return PackedLinear(LinearFormat("w8a8_static", tile), n, k, tensors, note, q)
    codes = q.codes
    if wq.symmetric and wq.bits < 4:  # the int4 kernels' symmetric zero point is 8: recentre the codes
        codes = codes + np.uint8(8 - 2 ** (wq.bits - 1))
    tensors = {"qweight": to_column_tiles(pack_int4(codes), tile), "scales": to_column_tiles(q.scales, tile)}
    if not wq.symmetric:
        tensors["zeros"] = to_column_tiles(q.zeros, tile)
    fmt = LinearFormat("int4", tile, q.group_size, not wq.symmetric)
    note = f"{wq.bits}-bit group {q.group_size}{'' if wq.symmetric else ' asym'}, {method}"
    return PackedLinear(fmt, n, k, tensors, note, q)


def _static_act_scale(statistics, name) -> np.ndarray:
    """The ``[1]`` scale of a static int8 activation grid: calibration absmax over all channels / 127."""
    if statistics is None:
        raise LowbitError(f"layer {name}: static int8 activations need calibration statistics for its input, "
                          "and none were collected")
    absmax = float(np.max(statistics.absmax))
    return np.array([absmax / INT8_QMAX if absmax > 0 else 1.0], np.float32)


def _quantize(weight_nk, wq, name, statistics):
    if not wq.rounds_by_gptq:  # AWQ has already folded its scales into the float weights
        return quantize_rtn(weight_nk, wq.bits, wq.group_size, wq.symmetric), wq.method
    if statistics is None:
        raise LowbitError(f"layer {name}: GPTQ needs calibration statistics for it, and none were collected")
    return quantize_gptq_validated(weight_nk, statistics, wq.bits, wq.group_size, wq.symmetric, damp=wq.damp,
                                   act_order=wq.act_order, name=name)


@tvm.transform.module_pass(opt_level=0, name="lowbit.QuantizeWeights")
class QuantizeWeights:
    """See the module docstring. ``params`` is updated in place with the packed weights."""

    def __init__(self, recipe, params: dict[str, np.ndarray], tile: int, statistics=None, kept=(), progress=None):
        self.recipe = recipe
        self.kept = set(kept)  # layers kept in int8 per-channel RTN whatever the recipe
        self._kept_recipe = Recipe(f"{recipe.name} (kept)", weights=WeightQuant(8))
        self.params = params
        self.tile = tile
        self.statistics = statistics or {}
        self.progress = progress
        self.report: dict[str, str] = {}
        self._packed: dict[str, PackedLinear] = {}

    def packed(self, name: str, transposed: bool) -> PackedLinear:
        """The packed form of weight ``name`` (stored ``[N, K]`` if ``transposed`` else ``[K, N]``)."""
        if name not in self._packed:
            weight = self.params[name]
            stats = self.statistics.get(name)
            recipe = self._kept_recipe if name in self.kept else self.recipe
            entry = pack_linear(weight if transposed else weight.T, recipe, name, self.tile, stats)
            if self.progress is not None:
                self.progress.update(1)
            self._packed[name] = entry
            kept = ", kept by recipe" if name in self.kept else ""
            self.report[name] = f"{entry.fmt.tag}: {entry.note}{kept}"
            for suffix, array in entry.tensors.items():
                self.params[f"{name}.{suffix}"] = array
        return self._packed[name]

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        kernels: dict[tuple, tvm.ir.GlobalVar] = {}
        for gvar, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function) or "num_input" not in func.attrs:
                continue
            rewriter = _LinearRewriter(mod, self, kernels, func)
            mod = rewriter.rewrite(gvar, func)
        return mod


def _weight_names(func: relax.Function) -> set[str]:
    return {p.name for p in func.params[int(func.attrs["num_input"]):]}


def _product(dims):
    """Product of shape dims, folding the static ones (``1 * 1 * seq`` -> ``seq``)."""
    static, symbolic = 1, []
    for dim in dims:
        if isinstance(dim, tirx.IntImm):
            static *= int(dim)
        else:
            symbolic.append(dim)
    result = tirx.const(static, "int64") if static != 1 or not symbolic else None
    for dim in symbolic:
        result = dim if result is None else result * dim
    return result


@relax.expr_functor.mutator
class _LinearRewriter(relax.PyExprMutator):
    def __init__(self, mod, owner: QuantizeWeights, kernels, func):
        super().__init__(mod)
        self.owner = owner
        self.kernels = kernels
        self.var2val = relax.analysis.get_var2val(func)
        self.weights = _weight_names(func)
        self.new_vars: dict[str, relax.Var] = {}

    def rewrite(self, gvar, func) -> tvm.IRModule:
        body = self.visit_expr(func.body)
        params = list(func.params) + list(self.new_vars.values())
        new_func = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
        self.builder_.update_func(gvar, new_func)
        return self.builder_.get()

    def _weight_var(self, name: str, array: np.ndarray) -> relax.Var:
        if name not in self.new_vars:
            self.new_vars[name] = relax.Var(name, relax.TensorType(array.shape, str(array.dtype)))
        return self.new_vars[name]

    def _kernel(self, fmt: LinearFormat, m, n: int, k: int, dtype: str) -> tvm.ir.GlobalVar:
        static_m = isinstance(m, (int, tirx.IntImm))
        key = (fmt, int(m) if static_m else "m", n, k, dtype)
        if key not in self.kernels:
            m_arg = int(m) if static_m else tirx.Var("m", "int64")
            variant = "gemv" if static_m and int(m) == 1 else "gemm"
            name = f"lowbit_{variant}_{fmt.tag}_n{n}_k{k}"
            func = linear_kernel(fmt, m_arg, n, k, dtype).with_attrs(
                {"op_pattern": 8, "global_symbol": name}  # opaque: fusion leaves the kernel whole
            )
            self.kernels[key] = self.builder_.add_func(func, name)
        return self.kernels[key]

    def visit_call_(self, call: relax.Call):  # noqa: D401 - TVM visitor hook
        use = match_linear(call, self.var2val, self.weights)
        if use is None:
            return super().visit_call_(call)
        packed = self.owner.packed(use.name, use.transposed)
        x = self.visit_expr(call.args[0])
        shape = list(x.ty.shape)
        dtype = str(x.ty.dtype)
        lead = shape[:-1]
        m = _product(lead)
        x2 = self.builder_.emit(relax.op.reshape(x, relax.ShapeExpr([m, packed.k])))
        args = [x2] + [self._weight_var(f"{use.name}.{s}", a) for s, a in packed.tensors.items()]
        # kernels compute whole column tiles; padded output channels are sliced off
        n_padded = -(-packed.n // packed.fmt.tile) * packed.fmt.tile
        gv = self._kernel(packed.fmt, m, n_padded, packed.k, dtype)
        y = self.builder_.emit(relax.call_tir(gv, args, relax.TensorType([m, n_padded], dtype)))
        if n_padded != packed.n:
            y = self.builder_.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[packed.n]))
        return relax.op.reshape(y, relax.ShapeExpr([*lead, packed.n]))
