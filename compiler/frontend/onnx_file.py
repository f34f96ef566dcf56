"""An ONNX decoder with an explicit KV cache, imported into Relax as ``prefill`` / ``decode``.

Requires the decoder layout of ONNX LLM exports, batch 1:

* inputs ``input_ids[1, seq]`` (int64) and ``past_key_values.{i}.key/value[1, kv_heads, past, head_dim]``
  (float32), optionally ``attention_mask[1, past + seq]`` and ``position_ids[1, seq]`` (optimum-style);
* outputs ``logits[1, seq, vocab]`` and ``present.{i}.key/value``;
* every other graph input is an initializer (a weight).

Guarantees a :class:`ModelIR` whose functions take ``input_ids`` and the ``past_key_values`` in layer
order, then one parameter per used initializer, named like it. ``seq`` and ``past`` are symbolic
whatever the file says; ``attention_mask`` and ``position_ids`` are not inputs of the functions but
computed inside them as all ones and ``arange(past, past + seq)``, which is what a batch-1 session
without padding would feed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter, get_constant

from lowbit.codegen.errors import LowbitError
from lowbit.passes.model_ir import KVLayout, ModelIR, kv_names, make_entry_module, rename_params, sync_params
from .unsupported import check_onnx_ops

DEFAULT_MAX_CONTEXT = 2048
_OPTIONAL_INPUTS = ("attention_mask", "position_ids")


def import_onnx_model(path, max_context: int | None = None) -> ModelIR:
    """Load the ONNX decoder at ``path``, check it, and import it into Relax."""
    model = _load(Path(path))
    graph = model.graph
    inputs, kv, vocab_size = _checked_signature(graph, path)
    input_names = ["input_ids"] + kv_names("past_key_values", kv.num_layers)
    output_names = ["logits"] + kv_names("present", kv.num_layers)
    unprefixed = {init.name.removeprefix("onnx::"): init.name for init in graph.initializer}
    context = max_context or DEFAULT_MAX_CONTEXT

    seq, past = tirx.Var("seq", "int64"), tirx.Var("past", "int64")
    shapes = _shape_dict(inputs, kv, seq, past)
    try:
        importer = _Importer(shape_dict=shapes, dtype_dict=None, keep_params_in_input=True, sanitize=False)
        mod = importer.from_onnx(graph, _opset(model))
    except Exception as exc:  # converters raise many types; all mean "this graph does not import"
        first_line = next(iter(str(exc).splitlines()), "")
        raise LowbitError(f"ONNX file {path}: TVM could not import it: {type(exc).__name__}: {first_line}") from exc
    mod, detached = relax.frontend.detach_params(mod)
    func = _bind_optional_inputs(mod["main"], seq, past)
    func = _reorder_inputs(func, input_names)
    # TVM names a weight's parameter like its initializer, less any "onnx::" prefix.
    names = [unprefixed[v.name] for v in func.params[len(input_names):]]
    mod["main"] = rename_params(func, names).with_attrs({
        "tir_var_lower_bound": {"seq": 1, "past": 0},
        "tir_var_upper_bound": {"seq": context - 1, "past": context - 1},
    })
    params = {n: t.numpy() for n, t in zip(names, detached["main"])}
    mod, params = sync_params(make_entry_module(mod, len(input_names)), params)
    return ModelIR(mod=mod, params=params, input_names=input_names, output_names=output_names, kv=kv,
                   vocab_size=vocab_size, max_context=context)


def _checked_signature(graph, path) -> tuple[dict, KVLayout, int]:
    """The graph's non-weight inputs by name, its KV layout and vocab size, its layout checked."""
    initializers = {init.name for init in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initializers}
    outputs = {o.name: o for o in graph.output}
    kv = _kv_layout(inputs, path)
    _check_layout(list(inputs), list(outputs), kv.num_layers, path)
    _check_dtype(inputs["input_ids"], "int64", path)
    for name in kv_names("past_key_values", kv.num_layers):
        _check_dtype(inputs[name], "float32", path)
    return inputs, kv, _vocab_size(outputs["logits"], path)


def _load(path: Path):
    """Parse, name every operator lowbit cannot import (before ``onnx.checker``, which stops at the
    first op it does not know), then check the model."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf errors share no base class
        raise LowbitError(f"ONNX file {path} is not a valid ONNX model: {type(exc).__name__}: {exc}") from None
    check_onnx_ops(model.graph, path)
    try:
        onnx.checker.check_model(str(path))  # by path, so that files over 2 GB are checked too
    except Exception as exc:  # checker and protobuf errors share no base class
        first_line = next(iter(str(exc).splitlines()), "")
        raise LowbitError(f"ONNX file {path} is not a valid ONNX model: {type(exc).__name__}: {first_line}") from None
    return model


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


class _Importer(ONNXGraphImporter):
    """TVM's ONNX importer with the converters for ops LLM exports use corrected.

    * ``Range(past, past + seq)`` (positions computed from ``Shape`` ops): TVM gives the result a
      fresh length variable, so the rotary tables no longer match ``seq`` and later ``Shape`` ops
      fail; ``arange(past, past + seq)`` has length ``seq``, which Relax proves. Its bounds and step
      may be initializers (torch.onnx's dynamo exporter).
    * ``ConstantOfShape`` of a constant empty shape (a scalar, as mask code exports): TVM tries to
      broadcast the one-element ``value`` to rank 0 and fails.
    * ``Reshape`` of a symbolic size (``past + seq``, which TVM keeps as an integer expression) to
      one element, as the dynamo exporter builds the mask's shape: TVM's converter takes only tensors.
    * ``Gather`` of static dims of a known shape by a 1-D index (``x.shape[-1:]``, a slice's bound
      in TorchScript exports of fused projections and partial rotary): TVM computes a tensor at
      run time, and the ``Slice`` it bounds gets an unknown shape that later ``Shape`` ops fail on.
    * Calls a converter hands on untyped (``Unsqueeze``) are typed before the next one reads them
      (``Expand`` reads its input's shape).
    """

    def _convert_operator(self, op_name, inputs, attrs, opset):
        # Some converters (Unsqueeze) hand on calls whose type is not inferred yet; Expand reads it.
        for index, value in enumerate(inputs):  # in place: ``inputs`` answers None past its end
            if isinstance(value, relax.Call):
                inputs[index] = self.bb.normalize(value)
        fixed = None
        if op_name in _FIXED_CONVERTERS:
            fixed = _FIXED_CONVERTERS[op_name](inputs, attrs, [self._nodes, self._params])
        if fixed is None:
            return super()._convert_operator(op_name, inputs, attrs, opset)
        return fixed if tvm.ir.is_prim_expr(fixed) else self.bb.normalize(fixed)


def _symbolic_range(inputs, attrs, params):
    """``arange`` for a ``Range`` over symbolic integers with a constant step, else ``None``."""
    bounds = [_int_scalar(get_constant(x, params)) for x in inputs]  # constants may be initializers
    if any(b is None for b in bounds) or not isinstance(bounds[2], int) or bounds[2] == 0:
        return None
    if not any(tvm.ir.is_prim_expr(b) for b in bounds[:2]):
        return None
    return relax.op.arange(*bounds, dtype="int64")


def _constant_of_shape(inputs, attrs, params):
    """The constant tensor for a ``ConstantOfShape`` whose shape is a constant, else ``None``."""
    if not isinstance(inputs[0], tvm.ir.GenericConst):
        return None
    from onnx.numpy_helper import to_array

    value = to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
    shape = tuple(int(d) for d in inputs[0].value.numpy())
    return relax.const(np.full(shape, value.reshape(()), value.dtype))


def _reshape_symbolic_scalar(inputs, attrs, params):
    """``Reshape`` of a symbolic integer (a size computed from ``Shape`` ops, which TVM keeps as a
    ``PrimExpr``) to one element, as torch.onnx's dynamo exporter writes ``[past + seq]`` for the
    mask's shape: the integer itself (rank 0) or a one-element shape (rank 1); else ``None``."""
    if not tvm.ir.is_prim_expr(inputs[0]):
        return None
    new_shape = get_constant(inputs[1], params)  # the shape is an initializer
    if not isinstance(new_shape, tvm.ir.GenericConst):
        return None
    shape = [int(d) for d in new_shape.value.numpy().reshape(-1)]
    if len(shape) > 1 or any(d not in (1, -1) for d in shape):
        return None
    return relax.ShapeExpr([inputs[0]]) if shape else inputs[0]


def _gather_of_shape(inputs, attrs, params):
    """``Gather`` of static dims of a shape TVM knows (a ``ShapeExpr``) by a constant 1-D index, as
    TorchScript exports write ``x.shape[-1:]`` for a slice's bound: those dims as a constant, where
    TVM's converter computes a tensor at run time whose value a later ``Slice`` cannot see (its
    result's shape then unknown); else ``None`` (TVM's converter)."""
    shape, indices = inputs[0], get_constant(inputs[1], params)
    if not isinstance(shape, relax.ShapeExpr) or not isinstance(indices, tvm.ir.GenericConst):
        return None
    index = indices.value.numpy()
    if index.ndim != 1 or int(attrs.get("axis", 0)) != 0:
        return None
    dims = list(shape.values)
    picked = [dims[int(i)] for i in index if -len(dims) <= int(i) < len(dims)]
    if len(picked) != index.size or not all(isinstance(d, tirx.IntImm) for d in picked):
        return None
    return relax.const(np.array([int(d) for d in picked], np.int64))


_FIXED_CONVERTERS = {"Range": _symbolic_range, "ConstantOfShape": _constant_of_shape,
                     "Reshape": _reshape_symbolic_scalar, "Gather": _gather_of_shape}


def _int_scalar(value):
    """A symbolic int64 as a ``PrimExpr``, a constant integer scalar as an ``int``, else ``None``."""
    if tvm.ir.is_prim_expr(value) and str(value.ty) == "int64":
        return value
    if isinstance(value, tvm.ir.GenericConst):
        array = value.value.numpy()
        if array.size == 1 and np.issubdtype(array.dtype, np.integer):
            return int(array.item())
    return None


def _dims(value_info) -> list:
    """The shape of a graph input or output: ints for fixed dims, strings (maybe empty) for the others."""
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def _kv_layout(inputs: dict, path) -> KVLayout:
    """Layers, KV heads and head size from the ``past_key_values.0.key`` input, checked on every layer."""
    num_layers = 0
    while f"past_key_values.{num_layers}.key" in inputs:
        num_layers += 1
    if num_layers == 0:
        raise LowbitError(
            f"ONNX file {path} has no input past_key_values.0.key; lowbit needs a decoder exported with its "
            f"KV cache as inputs (past_key_values.{{i}}.key/value) and outputs (present.{{i}}.key/value); "
            f"its inputs are {', '.join(inputs)}"
        )
    first = _dims(inputs["past_key_values.0.key"])
    if len(first) != 4 or not isinstance(first[1], int) or not isinstance(first[3], int):
        raise LowbitError(
            f"ONNX file {path}: input past_key_values.0.key has shape {first}; lowbit needs "
            "[batch, kv_heads, past, head_dim] with fixed kv_heads and head_dim"
        )
    for name in kv_names("past_key_values", num_layers):
        if name in inputs and _dims(inputs[name])[1::2] != first[1::2]:
            raise LowbitError(f"ONNX file {path}: input {name} has shape {_dims(inputs[name])}, "
                              f"but past_key_values.0.key has {first}; every layer must have the same layout")
    return KVLayout(num_layers=num_layers, num_kv_heads=first[1], head_dim=first[3])


def _check_layout(inputs: list[str], outputs: list[str], num_layers: int, path) -> None:
    """Raise naming every missing and unexpected graph input and output at once."""
    required_inputs = ["input_ids"] + kv_names("past_key_values", num_layers)
    problems = _name_problems("input", inputs, required_inputs, _OPTIONAL_INPUTS)
    problems += _name_problems("output", outputs, ["logits"] + kv_names("present", num_layers), ())
    if problems:
        raise LowbitError(
            f"ONNX file {path} does not have the decoder layout lowbit reads: {'; '.join(problems)}. "
            f"Expected inputs input_ids, past_key_values.{{i}}.key/value (optionally also "
            f"{', '.join(_OPTIONAL_INPUTS)}) and outputs logits, present.{{i}}.key/value for i = 0..{num_layers - 1}"
        )


def _name_problems(kind: str, got: list[str], required: list[str], optional) -> list[str]:
    missing = [n for n in required if n not in got]
    unexpected = [n for n in got if n not in required and n not in optional]
    return ([f"missing {kind}(s) {', '.join(missing)}"] if missing else []) + (
        [f"unexpected {kind}(s) {', '.join(unexpected)}"] if unexpected else [])


def _check_dtype(value_info, dtype: str, path) -> None:
    import onnx

    code = value_info.type.tensor_type.elem_type
    try:
        got = onnx.helper.tensor_dtype_to_np_dtype(code)
    except KeyError:
        got = f"element type {code} (undefined)"
    if str(got) != dtype:
        raise LowbitError(f"ONNX file {path}: input {value_info.name} is {got}; lowbit needs {dtype}")


def _vocab_size(logits, path) -> int:
    dims = _dims(logits)
    if len(dims) != 3 or not isinstance(dims[2], int) or dims[2] <= 0:
        raise LowbitError(f"ONNX file {path}: output logits has shape {dims}; lowbit needs [1, seq, vocab] "
                          "with a fixed vocab")
    return dims[2]


def _shape_dict(inputs: dict, kv: KVLayout, seq, past) -> dict:
    """Input shapes with batch 1 and our own symbolic ``seq`` / ``past``, whatever dims the file names."""
    cache = [1, kv.num_kv_heads, past, kv.head_dim]
    shapes = {"input_ids": [1, seq], "attention_mask": [1, past + seq], "position_ids": [1, seq]}
    shapes |= {name: cache for name in kv_names("past_key_values", kv.num_layers)}
    return {name: shape for name, shape in shapes.items() if name in inputs}


def _bind_optional_inputs(func: relax.Function, seq, past) -> relax.Function:
    """Compute ``attention_mask`` / ``position_ids`` in ``func`` as a batch-1 session feeds them.

    The parameters become the variables of bindings prepended to the body (all ones; ``arange(past,
    past + seq)``), so the rest of the body is unchanged.
    """
    optional = [v for v in func.params if v.name in _OPTIONAL_INPUTS]
    if not optional:
        return func
    normalize = relax.BlockBuilder().normalize
    arange = normalize(relax.op.arange(past, past + seq, dtype="int64"))
    positions = relax.Var("positions", arange.ty)
    values = {
        "attention_mask": normalize(relax.op.ones(relax.ShapeExpr([1, past + seq]), "int64")),
        "position_ids": normalize(relax.op.expand_dims(positions, 0)),
    }
    bindings = [relax.VarBinding(positions, arange)] + [relax.VarBinding(v, values[v.name]) for v in optional]
    body = relax.SeqExpr([relax.BindingBlock(bindings), *func.body.blocks], func.body.body)
    params = [v for v in func.params if v not in optional]
    func = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
    return func.with_attr("num_input", int(func.attrs["num_input"]) - len(optional))


def _reorder_inputs(func: relax.Function, names: list[str]) -> relax.Function:
    """Put the model inputs in ``names`` order (the order the runtime feeds them), weights unchanged."""
    num_input = int(func.attrs["num_input"])
    by_name = {v.name: v for v in func.params[:num_input]}
    params = [by_name[n] for n in names] + list(func.params[num_input:])
    return relax.Function(params, func.body, func.ret_ty, func.is_pure, func.attrs)
