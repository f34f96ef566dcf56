"""Where a per-input-channel scale can be folded away: the smoothing groups of a model.

A *smoothing group* is the set of linear layers that read one same activation ``X`` (q/k/v after a
norm; gate/up; down after ``silu(gate) * up``). Scaling ``X`` by ``1 / s`` per channel and the
group's weights by ``s`` per input channel leaves every output unchanged; it costs nothing at run
time when ``1 / s`` can be folded into the op that produces ``X``. The *fold target* is found from
the dataflow graph (a networkx view of the entry function's bindings), never from names:

* ``norm``: ``X = multiply(h, gamma)`` with ``gamma`` a 1-D weight parameter of width ``K`` read by
  nothing else (the weight of an RMSNorm/LayerNorm): ``gamma /= s``; ``X = multiply(h, gamma + c)``
  with ``c`` a scalar constant (Gemma's ``1 + weight``): ``gamma = (gamma + c) / s - c``;
  ``X = layer_norm(h, gamma, beta)`` (or ``rms_norm``) with its own weights: ``gamma /= s`` and
  ``beta /= s``; a cast around the norm (computed in float32) is looked through.
* ``linear``: ``X = multiply(a, y)`` (or ``X = y``) where ``y`` is, possibly through reshapes, the
  output of a linear layer whose output and weight have no other reader: that layer's output
  channels ``/= s``, and its bias with them when ``y`` is ``output + bias`` (a 1-D weight read only
  there).
* ``linear`` through attention (v -> o): ``X`` is the attention output ``P @ V`` (through reshapes,
  permutes, the KV-cache concat and grouped-query broadcasts) and ``V`` a linear layer's output.
  ``P @ V`` scales with each channel of ``V``, so ``V``'s producer can absorb the scale, but under
  grouped-query attention one ``V`` channel feeds several channels of ``X``: the target's
  ``channel_map`` (``X`` channel -> ``V`` channel) is found by running the op chain on channel
  indices, and a scale must be equal on the channels sharing a ``V`` channel
  (:meth:`SmoothingGroup.admissible` makes it so). The KV cache then holds the scaled values,
  consistently for prefill and decode.
* ``linear`` by an output slice: on either path above, ``V`` (or ``y``) may be a slice of a fused
  linear's output, possibly reshaped and permuted before it is sliced (a section of a ``split``
  read by nothing else, or a ``strided_slice`` on the last axis when every reader of the sliced
  tensor takes disjoint ranges: Phi-3's ``gate_up_proj`` and ``qkv_proj``, GPT-NeoX's per-head
  interleaved ``query_key_value``): the target's rows behind the slice absorb the scale (its
  ``channel_map``), the other slices' channels are untouched.
* anything else (a norm weight shared, a multiply by a non-linear term on both sides, an
  activation or a clip between, a group weight read elsewhere such as a tied embedding): no
  target; not smoothable.

Requires: an entry function of a :class:`~lowbit.passes.model_ir.ModelIR`, before quantization.
Guarantees: the parameters :func:`fold_scales` returns for an admissible scale make the function
compute the same outputs up to float rounding; nothing is changed in place.
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import tvm
import numpy as np
from tvm import relax, tirx

from .linear_match import LinearUse, _op_name, match_linear

_PASS_THROUGH = ("relax.reshape", "relax.astype")
_LAYOUT_OPS = ("relax.reshape", "relax.astype", "relax.permute_dims", "relax.expand_dims", "relax.broadcast_to")


@dataclasses.dataclass(frozen=True)
class FoldTarget:
    kind: str  # "norm" or "linear"
    name: str  # the parameter that absorbs 1 / s
    transposed: bool = True  # linear targets: weight stored [N, K] (True) or [K, N]
    channel_map: tuple[int, ...] | None = None  # through attention: X channel -> the target's output channel
    offset: float = 0.0  # norm targets: the norm multiplies by (weight + offset), e.g. Gemma's 1 + weight
    also: tuple[str, ...] = ()  # parameters divided by s too: a LayerNorm's bias, a linear target's bias


@dataclasses.dataclass(frozen=True)
class SmoothingGroup:
    linears: tuple[LinearUse, ...]  # the layers reading X
    width: int  # K, the channels of X
    target: FoldTarget | None  # where 1 / s goes; None if the group cannot be smoothed
    reason: str = ""  # without a target: why not, from the graph

    def admissible(self, s: np.ndarray) -> np.ndarray:
        """``s`` made foldable: through attention, the geometric mean over the ``X`` channels that
        share a target channel, for each of them; elsewhere ``s`` itself."""
        if self.target is None or self.target.channel_map is None:
            return s
        index = np.asarray(self.target.channel_map)
        log_s = np.log(np.maximum(s.astype(np.float64), 1e-30))
        shared = np.bincount(index, weights=log_s) / np.maximum(np.bincount(index), 1)
        return np.exp(shared[index]).astype(np.float32)


def dataflow_graph(func: relax.Function) -> nx.DiGraph:
    """Nodes: the function's parameters and bound variables (``op`` attribute: the producing op);
    edges: variable -> the variable bound to a call that reads it (directly or in a tuple argument)."""
    graph = nx.DiGraph()
    for param in func.params:
        graph.add_node(param, op="param")
    for var, value in relax.analysis.get_var2val(func).items():
        graph.add_node(var, op=_op_name(value) or type(value).__name__)
        if isinstance(value, relax.Call):
            for arg in value.args:
                for operand in arg.fields if isinstance(arg, relax.Tuple) else [arg]:  # concat((a, b))
                    if isinstance(operand, relax.Var):
                        graph.add_edge(operand, var)
    return graph


def find_smoothing_groups(func: relax.Function) -> list[SmoothingGroup]:
    """Every activation read by linear layers, its layers and its fold target (see module docstring)."""
    var2val = relax.analysis.get_var2val(func)
    weights = {p.name: p for p in func.params[int(func.attrs["num_input"]):]}
    graph = dataflow_graph(func)
    readers: dict = {}
    for var, value in var2val.items():
        if isinstance(value, relax.Call):
            use = match_linear(value, var2val, set(weights))
            if use is not None:
                readers.setdefault(value.args[0], []).append((use, var))
    linear_of_output = {out: use for uses in readers.values() for use, out in uses}
    groups = []
    for x, uses in readers.items():
        width = int(x.ty.shape[-1])
        target, reason = None, ""
        shared = [use.name for use, _ in uses if not _single_reader(graph, weights[use.name])]
        if shared:  # e.g. a tied embedding: scaling the weight would change its other reader too
            reason = f"weight {shared[0]} has another reader"
        else:
            target = _fold_target(x, width, var2val, weights, graph, linear_of_output)
            if target is None:
                reason = f"its input is {_describe(x, var2val, weights)}, with no norm weight or linear output " \
                         "read only on this path to absorb the scale"
        groups.append(SmoothingGroup(tuple(use for use, _ in uses), width, target, reason))
    return groups


def _describe(expr, var2val, weights, depth: int = 3) -> str:
    """``expr``'s producing ops, ``depth`` levels up, for a note: ``multiply(rms_norm(...), add(w, const))``."""
    if isinstance(expr, tvm.ir.Constant):
        return "const"
    if isinstance(expr, relax.Var) and expr.name in weights and expr.same_as(weights[expr.name]):
        return expr.name
    value = var2val.get(expr) if isinstance(expr, relax.Var) else expr
    op = _op_name(value)
    if op is None:
        return "input" if isinstance(expr, relax.Var) else type(expr).__name__
    name = op.removeprefix("relax.").removeprefix("nn.")
    if depth == 0:
        return f"{name}(...)"
    args = [_describe(a, var2val, weights, depth - 1) for a in value.args if not isinstance(a, relax.ShapeExpr)]
    return f"{name}({', '.join(args)})"


def foldable_groups(func: relax.Function, notes: dict[str, str], unfoldable: str):
    """The smoothing groups of ``func`` that have a fold target, in graph order; the layers of the
    others get the note ``unfoldable`` in ``notes``."""
    for group in find_smoothing_groups(func):
        if group.target is None:
            notes.update({use.name: f"{unfoldable}: {group.reason}" for use in group.linears})
        else:
            yield group


def _norm_weight(expr, width, var2val, weights, graph) -> tuple[str | None, float]:
    """``(name, offset)`` if ``expr`` is a norm's per-channel factor that can absorb ``1 / s``: a 1-D
    weight of width ``width`` read only here (offset 0), or ``weight + c`` for a scalar constant
    ``c`` (Gemma's ``1 + weight``; possibly through a cast) with the sum read only here; else
    ``(None, 0.0)``."""
    def own_weight(e):
        while isinstance(e, relax.Var) and _op_name(var2val.get(e)) == "relax.astype" and _single_reader(graph, e):
            e = var2val[e].args[0]
        param = weights.get(getattr(e, "name", None))
        if param is not None and e.same_as(param) and len(param.ty.shape) == 1 \
                and int(param.ty.shape[0]) == width and _single_reader(graph, param):
            return param.name
        return None

    name = own_weight(expr)
    if name is not None:
        return name, 0.0
    value = var2val.get(expr) if isinstance(expr, relax.Var) else None
    if _op_name(value) == "relax.add" and _single_reader(graph, expr):
        for own, other in (value.args, value.args[::-1]):
            if isinstance(other, tvm.ir.Constant) and other.value.numpy().size == 1:
                name = own_weight(own)
                if name is not None:
                    return name, float(other.value.numpy().reshape(()))
    return None, 0.0


def _single_reader(graph: nx.DiGraph, var) -> bool:
    return graph.out_degree(var) == 1


def _fold_target(x, width, var2val, weights, graph, linear_of_output) -> FoldTarget | None:
    value = var2val.get(x)
    product = x
    while _op_name(var2val.get(product)) == "relax.astype" and _single_reader(graph, var2val[product].args[0]):
        product = var2val[product].args[0]  # a norm computed in float32, cast back: the cast commutes with 1 / s
    norm = var2val.get(product)
    if _op_name(norm) in ("relax.nn.layer_norm", "relax.nn.rms_norm"):  # the weight (and bias) as the op's operands
        gamma = _norm_weight(norm.args[1], width, var2val, weights, graph)
        beta = _norm_weight(norm.args[2], width, var2val, weights, graph) if len(norm.args) > 2 and \
            _op_name(norm) == "relax.nn.layer_norm" else (None, 0.0)
        if gamma[0] is None or gamma[1] or beta[1] or (beta[0] is None and len(norm.args) > 2
                                                        and _op_name(norm) == "relax.nn.layer_norm"):
            return None
        return FoldTarget("norm", gamma[0], also=() if beta[0] is None else (beta[0],))
    if _op_name(norm) == "relax.multiply":
        for own in norm.args:
            name, offset = _norm_weight(own, width, var2val, weights, graph)
            if name is not None:
                return FoldTarget("norm", name, offset=offset)
    if _op_name(value) != "relax.multiply":
        return _linear_target(x, var2val, weights, graph, linear_of_output)
    for operand in value.args:
        target = _linear_target(operand, var2val, weights, graph, linear_of_output)
        if target is not None:
            return target
    return None


def _linear_target(var, var2val, weights, graph, linear_of_output) -> FoldTarget | None:
    """``var`` is (reshapes of) a linear layer's output, or of its output plus its bias, read only
    along this path, or the output of attention whose values are one (see the module docstring)."""
    start = var
    while isinstance(var, relax.Var) and _single_reader(graph, var):
        value = var2val.get(var)
        biased = _biased_output(value, weights, graph, linear_of_output)
        if var in linear_of_output or biased is not None:
            output, also = (var, ()) if biased is None else (biased[0], (biased[1],))
            use = linear_of_output[output]
            if not _single_reader(graph, weights[use.name]):
                return None
            return FoldTarget("linear", use.name, use.transposed, also=also)
        if _op_name(value) not in _PASS_THROUGH:
            return _attention_value_target(start, var2val, weights, graph, linear_of_output)
        var = value.args[0]
    return None


def _attention_value_target(x, var2val, weights, graph, linear_of_output) -> FoldTarget | None:
    """``x = P @ V`` (through layout ops, the cache concat and broadcasts) with ``V`` a linear
    layer's output (or its output plus its bias), or ``x`` (through layout ops) a slice of such an
    output taken by disjoint slices (:func:`_sliced_source`, then layout ops up to the linear): a
    target with the channel map, or ``None`` if any op on the way is not one of those or any other op
    reads the path (returning the cache as an output is fine)."""
    chain, var, sliced_tensor, bias = [], x, None, ()
    while var not in linear_of_output:
        if not isinstance(var, relax.Var) or not (_single_reader(graph, var) or var.same_as(sliced_tensor)):
            return None
        value = var2val.get(var)
        op = _op_name(value)
        if (biased := _biased_output(value, weights, graph, linear_of_output)) is not None:
            var, bias = biased[0], (biased[1],)
            break
        if op in _LAYOUT_OPS:
            upstream = value.args[0]
        elif sliced_tensor is None and (source := _sliced_source(value, graph, var2val)) is not None:
            upstream = sliced_tensor = source
        elif sliced_tensor is None and op == "relax.matmul" and not _has_matmul(chain):  # V of P @ V
            upstream = value.args[1]
        elif sliced_tensor is None and op == "relax.concat":  # the KV cache: past values (an input), new ones
            parts = [part for part in _tuple_fields(value.args[0], var2val) if not _is_param(part, graph)]
            if len(parts) != 1:
                return None
            upstream = parts[0]
        else:
            return None
        chain.append((var, value))
        var = upstream
    if not (_has_matmul(chain) or sliced_tensor is not None):
        return None
    use = linear_of_output[var]
    if not (_single_reader(graph, var) or var.same_as(sliced_tensor)) or not _single_reader(graph, weights[use.name]):
        return None
    try:
        channel_map = _trace_channels(var, chain[::-1], var2val)
    except _Untraceable:
        return None
    if channel_map is None:
        return None
    return FoldTarget("linear", use.name, use.transposed, tuple(int(c) for c in channel_map), also=bias)


def _biased_output(value, weights, graph, linear_of_output):
    """``(y, bias name)`` if ``value`` is ``add(y, b)`` with ``y`` a linear layer's output and ``b``
    a 1-D weight of ``y``'s width (the layer's bias), each read only there; else ``None``. Scaling
    the layer's output channels then scales the sum's if the bias is scaled with them."""
    if _op_name(value) != "relax.add":
        return None
    for output, bias in (value.args, value.args[::-1]):
        param = weights.get(getattr(bias, "name", None))
        if output in linear_of_output and _single_reader(graph, output) and param is not None \
                and bias.same_as(param) and len(param.ty.shape) == 1 \
                and int(param.ty.shape[0]) == int(output.ty.shape[-1]) and _single_reader(graph, param):
            return output, param.name
    return None


def _slice_ranges(value) -> list[tuple[int, int, int, int]]:
    """``(axis, begin, end, stride)`` per axis of a ``strided_slice`` call (axes as written)."""
    axes, begin, end, strides = ([int(field.value) for field in arg.fields] for arg in value.args[1:5])
    return list(zip(axes, begin, end, strides))


def _disjoint_channel_slices(output, graph, var2val) -> bool:
    """Every reader of ``output`` slices its last axis alone, with unit stride, in ranges that do
    not overlap: scaling the channels of one slice leaves the others' unchanged."""
    rank, width = len(output.ty.shape), int(output.ty.shape[-1])
    ranges = []
    for reader in graph.successors(output):
        value = var2val.get(reader)
        if _op_name(value) != "relax.strided_slice" or not value.args[0].same_as(output):
            return False
        slices = _slice_ranges(value)
        if len(slices) != 1 or slices[0][0] % rank != rank - 1 or slices[0][3] != 1:
            return False
        begin, end = (min(max(b + width if b < 0 else b, 0), width) for b in slices[0][1:3])
        ranges.append((begin, end))
    ranges.sort()
    return all(a_end <= b_begin for (_, a_end), (b_begin, _) in zip(ranges, ranges[1:]))


def _sliced_source(value, graph, var2val):
    """The tensor whose channels ``value`` takes alone among its readers: the input of the ``split``
    whose section it is (read by nothing else), or that of a ``strided_slice`` when every reader of
    it slices disjoint ranges of the last axis; else ``None``."""
    if isinstance(value, relax.TupleGetItem):
        split = var2val.get(value.tuple_value) if isinstance(value.tuple_value, relax.Var) else None
        if _op_name(split) == "relax.split" and _single_reader(graph, split.args[0]):
            return split.args[0]
    elif _op_name(value) == "relax.strided_slice" and _disjoint_channel_slices(value.args[0], graph, var2val):
        return value.args[0]
    return None


def _split_section(ids: np.ndarray, item: relax.TupleGetItem, var2val) -> np.ndarray:
    """Section ``item.index`` of ``ids`` split as the ``split`` call ``item`` reads splits its input."""
    split = var2val[item.tuple_value]
    sections = split.attrs.indices_or_sections
    sections = int(sections) if isinstance(sections, (int, tirx.IntImm)) else [int(i) for i in sections]
    return np.split(ids, sections, axis=int(split.attrs.axis))[int(item.index)]


def _has_matmul(chain) -> bool:
    return any(_op_name(value) == "relax.matmul" for _, value in chain)


def _tuple_fields(expr, var2val) -> list:
    if isinstance(expr, relax.Var):
        expr = var2val.get(expr, expr)
    return list(expr.fields) if isinstance(expr, relax.Tuple) else []


def _is_param(var, graph) -> bool:
    return isinstance(var, relax.Var) and graph.nodes.get(var, {}).get("op") == "param"


def _concrete(shape) -> tuple[int, ...]:
    """A symbolic shape with every size variable set to 1 (one new token, one cached)."""
    return tuple(_evaluate(dim) for dim in shape)


def _evaluate(expr) -> int:
    if isinstance(expr, (int, tirx.IntImm)):
        return int(expr)
    if isinstance(expr, tirx.Var):
        return 1
    ops = {tirx.Add: lambda a, b: a + b, tirx.Sub: lambda a, b: a - b, tirx.Mul: lambda a, b: a * b,
           tirx.FloorDiv: lambda a, b: a // b, tirx.FloorMod: lambda a, b: a % b}
    for kind, apply in ops.items():
        if isinstance(expr, kind):
            return apply(_evaluate(expr.a), _evaluate(expr.b))
    raise _Untraceable(f"shape expression {expr}")


class _Untraceable(Exception):
    """The attention path has a shape or op the channel trace does not model."""


def _trace_channels(v_out, chain, var2val) -> np.ndarray | None:
    """Run ``chain`` (forward, from the linear output ``v_out``) on channel indices: the ``V``
    channel behind each channel of the last tensor, or ``None`` if the attention product would
    mix channels (a channel index on the contracted axis)."""
    width = _concrete(v_out.ty.shape)[-1]
    ids = np.broadcast_to(np.arange(width, dtype=np.int64), _concrete(v_out.ty.shape)).copy()
    current = v_out
    for var, value in chain:
        op = _op_name(value)
        shape = _concrete(var.ty.shape)
        if isinstance(value, relax.TupleGetItem):
            ids = _split_section(ids, value, var2val)
        elif op in ("relax.reshape", "relax.astype"):
            ids = ids.reshape(shape)
        elif op == "relax.permute_dims":
            axes = value.attrs.axes
            ids = np.transpose(ids, None if axes is None else [int(a) for a in axes])
        elif op == "relax.expand_dims":
            ids = np.expand_dims(ids, tuple(int(a) for a in value.attrs.axis))
        elif op == "relax.broadcast_to":
            ids = np.broadcast_to(ids, shape)
        elif op == "relax.strided_slice":
            index = [slice(None)] * ids.ndim
            for axis, begin, end, stride in _slice_ranges(value):
                index[axis] = slice(begin, end, stride)
            ids = ids[tuple(index)]
        elif op == "relax.concat":
            parts = [ids if part.same_as(current) else np.full(_concrete(part.ty.shape), -1, np.int64)
                     for part in _tuple_fields(value.args[0], var2val)]
            ids = np.concatenate(parts, axis=int(value.attrs.axis))
        else:  # P @ V: each output row mixes V's rows; the newest row stands for them
            rows = ids.reshape(-1, *ids.shape[-2:])
            if any(not np.array_equal(row[-1], other) for row in rows for other in row[:-1] if (other >= 0).any()):
                return None
            ids = np.broadcast_to(ids[..., -1:, :], shape)
        current = var
    channels = ids.reshape(-1, ids.shape[-1])[-1]
    return None if (channels < 0).any() else channels


def weight_nk(params: dict[str, np.ndarray], use: LinearUse) -> np.ndarray:
    """A linear layer's weight in ``[N, K]`` layout, float32."""
    return np.asarray(params[use.name] if use.transposed else params[use.name].T, np.float32)


def fold_scales(params: dict[str, np.ndarray], group: SmoothingGroup, s: np.ndarray) -> dict[str, np.ndarray]:
    """``X' = X / s``: the new arrays of the target (which absorbs ``1 / s``) and of the group's
    weights (``* s`` per input channel), by name; ``params`` is not changed."""
    if group.target is None:
        raise ValueError("fold_scales: the group has no fold target")
    s = s.astype(np.float32)
    target = group.target
    if target.channel_map is not None:  # through attention: one scale per target output channel
        index = np.asarray(target.channel_map)
        if not np.allclose(group.admissible(s), s, rtol=1e-5):
            raise ValueError("fold_scales: the scale differs between channels that share a value channel; "
                             "pass group.admissible(s)")
        per_output = np.ones(params[target.name].shape[0 if target.transposed else 1], np.float32)
        per_output[index] = s
        s_target = per_output
    else:
        s_target = s
    folded = {}
    if target.kind == "norm":  # (w + offset) / s = w' + offset
        folded[target.name] = ((params[target.name] + target.offset) / s - target.offset).astype(np.float32)
        for name in target.also:
            folded[name] = (params[name] / s).astype(np.float32)
    else:
        divisor = s_target[:, None] if target.transposed else s_target[None, :]  # [N, K]: output channels are rows
        folded[target.name] = (params[target.name] / divisor).astype(np.float32)
        for name in target.also:  # the layer's bias
            folded[name] = (params[name] / s_target).astype(np.float32)
    for use in group.linears:
        weight = params[use.name]
        folded[use.name] = (weight * s[None, :] if use.transposed else weight * s[:, None]).astype(np.float32)
    return folded


def folded_model(params: dict, statistics: dict, group: SmoothingGroup, s: np.ndarray) -> tuple[dict, dict]:
    """New ``(params, statistics)`` with ``s`` folded into ``group`` and its input's statistics those
    of ``X / s``; the given dicts are not changed."""
    divided = statistics[group.linears[0].name].divided(s)
    return params | fold_scales(params, group, s), statistics | {use.name: divided for use in group.linears}
