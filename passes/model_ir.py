"""The one thing both frontends produce and every pass consumes: Relax functions plus named params.

``mod`` holds two Relax functions with the same signature and the same weights:

* ``prefill``: ``input_ids[1, seq]`` with ``seq`` symbolic, for the prompt;
* ``decode``: the same function specialized to ``seq = 1``, for one generated token.

Each function takes the model inputs first (``num_input`` attribute) and then one parameter per
weight, named like the weight (``model.layers.0.mlp.up_proj.weight``). The KV cache is explicit:
``past_key_values.{i}.key/value`` in, ``present.{i}.key/value`` out, ``[1, kv_heads, len, head_dim]``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm
from tvm import relax

from lowbit.codegen.entry_points import PROMPT, STEP

from .bounded_gather import bounded_gather

ENTRY_FUNCTIONS = (PROMPT, STEP)  # what the frontends make and the passes rewrite (PROMPT_LAST: .last_position)


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """The imported cache: ``windows`` per layer the positions a query of that layer sees (its
    sliding window, counting itself), ``None`` for a layer that sees every earlier position; empty
    when no layer has a window."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    windows: tuple = ()

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None

    def as_dict(self) -> dict:
        """The manifest's record (lists, as JSON has them)."""
        return dataclasses.asdict(self) | {"windows": list(self.windows)}


@dataclasses.dataclass
class ModelIR:
    """A model in Relax: ``mod`` with entry functions, ``params`` in function-parameter order."""

    mod: tvm.IRModule
    params: dict[str, np.ndarray]
    input_names: list[str]
    output_names: list[str]
    kv: KVLayout
    vocab_size: int
    max_context: int

    def param_bytes(self) -> int:
        return int(sum(v.nbytes for v in self.params.values()))


@relax.expr_functor.mutator
class _VarRenamer(relax.PyExprMutator):
    def __init__(self, mapping):
        super().__init__()
        self.mapping = mapping

    def visit_var_(self, var):  # noqa: D401 - TVM visitor hook
        return self.mapping.get(var, var)


def rename_params(func: relax.Function, names: list[str]) -> relax.Function:
    """Give the trailing ``len(names)`` parameters of ``func`` the given names."""
    old = list(func.params[len(func.params) - len(names):])
    mapping = {v: relax.Var(n, v.ty) for v, n in zip(old, names)}
    body = _VarRenamer(mapping).visit_expr(func.body)
    params = list(func.params[: len(func.params) - len(names)]) + [mapping[v] for v in old]
    return relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)


def make_entry_module(imported: tvm.IRModule, num_input: int) -> tvm.IRModule:
    """The ``prefill`` / ``decode`` pair from an importer's module: its ``main`` as ``prefill``, a copy
    of it with fresh variables (no Var may belong to two functions) as ``decode``, ``seq`` bound to 1
    there, and every other function of the module (the PrimFuncs some converters emit) kept.

    The first input of ``main`` is ``input_ids[1, seq]``.
    """
    prefill = imported["main"]
    decode = relax.utils.copy_with_new_vars(prefill)
    decode = decode.bind_symbolic_vars({decode.params[0].ty.shape[1]: 1})
    # A converter's TE kernel (ONNX Clip, Pad, Einsum): TVM 0.27's FuseTIR fails to fuse it with its
    # neighbours (OLMo's Clip: "Inconsistent buffers ... mapped to the same relax var"), so it is
    # marked opaque (8) and built unfused.
    mod = tvm.IRModule({gv: func.with_attr("op_pattern", 8) if isinstance(func, tvm.tirx.PrimFunc) else func
                        for gv, func in imported.functions.items() if gv.name_hint != "main"})
    mod["prefill"] = prefill.with_attrs({"num_input": num_input, "global_symbol": "prefill"})
    mod["decode"] = decode.with_attrs({"num_input": num_input, "global_symbol": "decode"})
    return relax.transform.Normalize()(bounded_gather(mod))


def bindings_and_uses(func: relax.Function) -> tuple[dict, dict]:
    """Every binding's value by var, and every var's readers (binding vars, or None for the return)."""
    bindings, uses = {}, {}

    def note(reader):
        def visit(expr):
            if isinstance(expr, relax.Var):
                uses.setdefault(expr, []).append(reader)
        return visit

    for block in func.body.blocks:
        for binding in block.bindings:
            bindings[binding.var] = binding.value
            relax.analysis.post_order_visit(binding.value, note(binding.var))
    relax.analysis.post_order_visit(func.body.body, note(None))
    return bindings, uses


def kv_names(prefix: str, num_layers: int) -> list[str]:
    """``prefix.{i}.key``, ``prefix.{i}.value`` for every layer, in the order functions take them."""
    return [f"{prefix}.{i}.{part}" for i in range(num_layers) for part in ("key", "value")]


def sync_params(mod: tvm.IRModule, params: dict[str, np.ndarray]) -> tuple[tvm.IRModule, dict]:
    """Make every entry function (one with ``num_input``) take exactly the weights some entry
    function reads, in one order.

    Passes add weights (packed codes, scales) and orphan others (a float weight that was quantized);
    afterwards each entry function's weight parameters are ``[n for n in params if used]``, so the
    runtime passes one list of weights to every function.
    """
    entries = [gv.name_hint for gv, f in mod.functions.items()
               if isinstance(f, relax.Function) and f.attrs is not None and "num_input" in f.attrs]
    used: set[str] = set()
    for name in entries:
        used |= {v.name for v in relax.analysis.free_vars(mod[name].body)}
    names = [n for n in params if n in used]
    for name in entries:
        func = mod[name]
        n_in = int(func.attrs["num_input"])
        by_name = {v.name: v for v in func.params[n_in:]}
        weights = [
            by_name[n] if n in by_name else relax.Var(n, relax.TensorType(params[n].shape, str(params[n].dtype)))
            for n in names
        ]
        mod[name] = relax.Function(list(func.params[:n_in]) + weights, func.body, func.ret_ty,
                                   func.is_pure, func.attrs)
    return mod, {n: params[n] for n in names}
