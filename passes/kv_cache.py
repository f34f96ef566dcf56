"""The KV cache written in place: the imported concat-and-return cache becomes a preallocated one.

Requires entry functions as :mod:`lowbit.passes.model_ir` describes them: ``input_ids``, then the
``past`` keys and values of every layer (``[1, kv_heads, past, head_dim]``, ``past`` one symbolic
length), then the weights; each past tensor read only by one ``concat`` with the new keys or values
along the sequence axis, whose result the function returns (``present``) and attention reads.
That is the form both frontends import (torch.export and ONNX decoders); nothing is matched by name.

Guarantees entry functions that take ``input_ids, past_length: Shape([past])``, then every layer's
key and value cache as the :class:`~lowbit.passes.schemes.kv.KVScheme` stores it (``cache.{i}.key``
and ``cache.{i}.value``, each followed by the scheme's other tensors such as ``cache.{i}.key.scale``;
one symbolic ``capacity >= past + seq`` for every cache but the rings below), then the same
weights, and return ``(logits, cache tensors...)``:

* the new keys and values are written (quantized, if the scheme does) at positions
  ``[past, past + seq)`` of their cache in place by the scheme's append kernel; no step
  concatenates or allocates a cache;
* an attention over a concatenation is recognized from the dataflow graph:
  ``softmax(matmul(q, K') * scale + bias)`` then ``matmul(., V')``, where ``K'`` and ``V'`` are
  the cached keys and values through layout ops only (expand/broadcast/reshape/permute, i.e.
  grouped-query repetition and the transpose), proved to read KV head ``h // group`` for query head
  ``h`` by evaluating those ops on an index tensor. Of one query token (decode) it becomes the
  scheme's decode attention kernel, of a prompt's tokens the scheme's prompt attention kernel
  (the bias, e.g. the causal mask, passed as the graph computes it),
  reading both caches in place as stored (a quantized cache is never widened to a copy);
* every other reader of a concatenation (an attention a kernel does not compute) reads the cache's
  ``[0, past + seq)`` prefix back as floats (a slice, or the scheme's read-back kernel), so the
  function computes what it computed before, up to the cache's quantization, whether or not its
  attention was recognized;
* a layer with a sliding window (``KVLayout.windows``, from the model's config) keeps its cache as
  a ring when the scheme ``rings``: positions at slots modulo the ring's own symbolic capacity
  (``capacity_window{W}``, shared by the layers of window ``W``), which the caller allocates at
  least ``W`` plus the tokens of one call, so the ring holds every position the call's queries may
  see; its kernels are the scheme's ``ring`` variants, whose attention reads each slot with its
  position's bias, so the graph's own mask still applies the window. The rewritten model's
  ``KVLayout.windows`` name the layers kept as rings (all ``None`` when the scheme does not ring).

Why not TVM's own KV cache (``relax.frontend.nn.llm``'s paged/flat cache and its builtins, what
MLC-LLM runs on): it is driven by models written against ``relax.frontend.nn`` that call its
attention functions by hand (``attention_with_fused_qkv``, the rotary embedding inside), while
lowbit imports an exported graph whose attention is plain ops; its pages, sequence bookkeeping and
kernels serve batched serving of fp16/fp32 caches, with no int8/int4 storage to fuse into. One
preallocated tensor set per layer, written by ``call_tir_inplace``, is what a single-sequence CPU
runtime needs, and the attention is still found in the graph rather than declared.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tvm

from tvm import relax, tirx

from lowbit.codegen.attention import padded_cache_shape
from lowbit.codegen.cache_layout import ROLES, ring_capacity_name
from lowbit.codegen.entry_points import PROMPT, STEP
from lowbit.codegen.errors import LowbitError

from .model_ir import ENTRY_FUNCTIONS, ModelIR, bindings_and_uses
from .schemes.kv import KVScheme

CACHE_LAYOUT = ("per layer, the key cache's tensors then the value cache's (kv_cache.buffers, 'capacity' positions); "
                "positions [0, past_length) hold the conversation, an entry function writes its tokens' keys and "
                "values at past_length in place")
CACHE_PREFIX = "cache"
PAST_LENGTH = "past_length"
_LAYOUT_OPS = ("relax.expand_dims", "relax.broadcast_to", "relax.reshape", "relax.permute_dims", "relax.repeat")


@dataclasses.dataclass(frozen=True)
class _Attention:
    """A recognized attention (decode's or a prompt's): its output binding's var and what the kernel reads."""

    output: relax.Var
    query: relax.Expr  # [1, q_heads, rows, head_dim]: one row (decode) or a prompt's
    key: relax.Var  # the concatenations it reads
    value: relax.Var
    scale: float
    bias: relax.Expr | None
    chain: frozenset  # bindings the kernel replaces (dead once it runs)

    @property
    def decodes(self) -> bool:
        """One query row: decode's attention kernel; otherwise the prompt's."""
        return _static_one(self.query.ty.shape[2])


def cache_names(scheme: KVScheme, num_layers: int) -> list[str]:
    """The cache tensors' parameter names, in the order entry functions take them."""
    return [f"{CACHE_PREFIX}.{i}.{role}{buffer.suffix}"
            for i in range(num_layers) for role in ROLES for buffer in scheme.buffers(role)]


def cache_in_place(ir: ModelIR, scheme: KVScheme) -> tuple[ModelIR, dict]:
    """``ir`` with its entry functions rewritten as the module docstring says for ``scheme``, and a
    summary ``{"attention_fused": layers whose decode attention is one kernel,
    "prompt_attention_fused": layers whose prompt attention is one kernel, "attention_layers": layers}``."""
    mod = ir.mod
    rings = tuple(ir.kv.window(layer) if scheme.rings else None for layer in range(ir.kv.num_layers))
    summary = {}
    for name in ENTRY_FUNCTIONS:
        mod, summary[name] = _rewrite(mod, name, ir, scheme, rings)
    names = cache_names(scheme, ir.kv.num_layers)
    new_ir = dataclasses.replace(ir, mod=mod, input_names=["input_ids", PAST_LENGTH] + names,
                                 output_names=["logits"] + names,
                                 kv=dataclasses.replace(ir.kv, windows=rings if any(rings) else ()))
    return new_ir, {"attention_fused": summary[STEP], "prompt_attention_fused": summary[PROMPT],
                    "attention_layers": ir.kv.num_layers}


def _rewrite(mod: tvm.IRModule, name: str, ir: ModelIR, scheme: KVScheme,
             rings: tuple) -> tuple[tvm.IRModule, int]:
    """``mod`` with entry function ``name`` rewritten (its kernels added), and its fused attentions'
    count; ``rings``: per layer, the window of its cache kept as a ring, or ``None``."""
    func = mod[name]
    num_input = int(func.attrs["num_input"])
    pasts = list(func.params[1:num_input])
    if len(pasts) != 2 * ir.kv.num_layers:
        raise LowbitError(f"{name}: expected {2 * ir.kv.num_layers} KV-cache inputs, found {len(pasts)}")
    bindings, uses = bindings_and_uses(func)
    past_length = pasts[0].ty.shape[2]
    if not isinstance(past_length, tirx.Var):
        raise LowbitError(f"{name}: the KV-cache input's sequence length {past_length} is not symbolic")
    concats = {}  # concatenation var -> (index of its past input, the new keys/values)
    for index, past in enumerate(pasts):
        concats.update(_concat_of(past, index, uses, bindings, name, ir.input_names[1 + index]))
    attentions, probe = {}, _probe(func)
    for var, value in bindings.items():
        if _is_op(value, "relax.nn.softmax"):
            found = _match_attention(var, bindings, uses, concats, probe)
            if found is not None:
                attentions[found.output] = found

    windows = [rings[index // 2] for index in range(len(pasts))]
    capacities = {window: tirx.Var(ring_capacity_name(window), "int64") for window in set(windows)}
    names = iter(cache_names(scheme, ir.kv.num_layers))
    caches = [[relax.Var(next(names), relax.TensorType(buffer.shape(capacities[windows[index]]), buffer.dtype))
               for buffer in scheme.buffers(ROLES[index % 2])] for index in range(len(pasts))]
    params = [func.params[0], relax.Var(PAST_LENGTH, relax.ShapeType([past_length])),
              *(var for cache in caches for var in cache)]
    ringed = [window is not None for window in windows]
    attentions = {output: attention for output, attention in attentions.items()  # one kernel reads both alike
                  if ringed[concats[attention.key][0]] == ringed[concats[attention.value][0]]}
    rewriter = _CacheRewriter(mod, concats, attentions, caches, ringed, past_length, uses, ir.kv, scheme)
    body = rewriter.visit_expr(func.body)
    new = relax.Function(params + list(func.params[num_input:]), body, None, func.is_pure, func.attrs).with_attr(
        "num_input", len(params))
    mod = rewriter.builder_.get()
    mod[name] = relax.analysis.remove_all_unused(new)
    return mod, len(attentions)


def _is_op(value, op_name: str) -> bool:
    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == op_name


def _concat_of(past, index, uses, bindings, name, input_name) -> dict:
    readers = uses.get(past, [])
    if len(readers) == 1 and readers[0] is not None:
        value = bindings[readers[0]]
        if (_is_op(value, "relax.concat") and len(value.args[0].fields) == 2
                and value.args[0].fields[0].same_as(past) and int(value.attrs.axis) in (2, -2)):
            return {readers[0]: (index, value.args[0].fields[1])}
    found = ", ".join("the function's output" if r is None else f"{_op_name(bindings[r])} (node {r.name})"
                      for r in readers) or "nothing"
    raise LowbitError(f"{name}: KV-cache input {input_name} is read by {found}; lowbit's in-place cache needs it "
                      "read only by a concatenation with the new keys/values along the sequence axis (the layout "
                      "of torch.export and ONNX decoder exports)")


def _op_name(value) -> str:
    return value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else type(value).__name__


def _single_reader(var, uses):
    readers = uses.get(var, [])
    return readers[0] if len(readers) == 1 and readers[0] is not None else None


def _match_attention(softmax_var, bindings, uses, concats, probe) -> _Attention | None:
    """The attention around ``softmax_var``, or ``None`` if it is not one the kernels compute."""
    softmax = bindings[softmax_var]
    ty = softmax_var.ty
    if int(softmax.attrs.axis) not in (-1, ty.ndim - 1) or ty.ndim != 4:
        return None
    chain = [softmax_var]
    scale, bias, scaled = 1.0, None, False
    expr = softmax.args[0]
    while True:
        if not isinstance(expr, relax.Var) or expr not in bindings:
            return None
        value = bindings[expr]
        chain.append(expr)
        if _is_op(value, "relax.matmul"):
            break
        if _is_op(value, "relax.astype") and str(value.attrs.dtype) == str(expr.ty.dtype) == \
                str(value.args[0].ty.dtype):
            expr = value.args[0]
        elif _is_op(value, "relax.multiply") or _is_op(value, "relax.divide"):
            factor = _scalar(value.args[1])
            if factor is None:
                return None
            scale = scale * factor if value.op.name == "relax.multiply" else scale / factor
            scaled, expr = True, value.args[0]
        elif _is_op(value, "relax.add") and bias is None and not scaled:
            expr, bias = value.args
        else:
            return None
    query, keys_t = bindings[expr].args
    key, key_chain = _trace_layout(keys_t, bindings, concats)
    consumer = _single_reader(softmax_var, uses)
    if key is None or consumer is None or not _is_op(bindings[consumer], "relax.matmul"):
        return None
    probs, values = bindings[consumer].args
    value_var, value_chain = _trace_layout(values, bindings, concats)
    if value_var is None or not probs.same_as(softmax_var):
        return None
    chain += key_chain + value_chain
    if any(not set(uses.get(v, [])) <= set(chain) | {consumer} for v in chain):
        return None  # an intermediate result is read elsewhere: keep the graph as it is
    q_heads = query.ty.shape[1]
    if not (_reads_group(key_chain, bindings, key, q_heads, probe, transposed=True)
            and _reads_group(value_chain, bindings, value_var, q_heads, probe, transposed=False)):
        return None
    if bias is not None and not _bias_fits(bias, query, softmax_var):
        return None
    return _Attention(consumer, query, key, value_var, scale, bias, frozenset(chain))


def _static_one(dim) -> bool:
    return isinstance(dim, tirx.IntImm) and int(dim) == 1


def _scalar(expr) -> float | None:
    if isinstance(expr, tvm.ir.expr.Constant) and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(()))
    return None


def _trace_layout(expr, bindings, concats):
    """The concatenation ``expr`` is made from by layout ops only, and the vars of those ops."""
    chain = []
    while isinstance(expr, relax.Var) and expr not in concats:
        value = bindings.get(expr)
        if value is None or not any(_is_op(value, op) for op in _LAYOUT_OPS):
            return None, []
        chain.append(expr)
        expr = value.args[0]
    return (expr, chain) if isinstance(expr, relax.Var) else (None, [])


_PROBE_LENGTH = 7  # the value symbolic lengths take when a layout chain is evaluated


def _probe(func) -> tvm.sym.Analyzer:
    """An analyzer in which every symbolic variable of ``func`` is ``_PROBE_LENGTH``."""
    analyzer = tvm.sym.Analyzer()
    for var in relax.analysis.defined_symbolic_vars(func):
        analyzer.bind(var, tirx.IntImm("int64", _PROBE_LENGTH))
    return analyzer


def _concrete(shape, probe) -> list[int] | None:
    dims = [probe.simplify(dim) for dim in shape]
    return [int(d) for d in dims] if all(isinstance(d, tirx.IntImm) for d in dims) else None


def _reads_group(chain, bindings, source, q_heads, probe, transposed: bool) -> bool:
    """Whether ``result`` (``source`` through the layout ops of ``chain``) is, for query head ``h``,
    KV head ``h // group`` of ``source`` (transposed: ``[1, q_heads, dim, seq]``)."""
    shape = _concrete(source.ty.shape, probe)
    if shape is None or not isinstance(q_heads, tirx.IntImm) or int(q_heads) % shape[1]:
        return False
    index = np.arange(int(np.prod(shape))).reshape(shape)
    array = index
    for var in reversed(chain):
        array = _apply_layout(bindings[var], array, probe)
        if array is None:
            return False
    group = int(q_heads) // shape[1]
    expected = index[:, np.arange(int(q_heads)) // group]
    if transposed:
        expected = expected.transpose(0, 1, 3, 2)
    return array.shape == expected.shape and bool((array == expected).all())


def _apply_layout(call, array, probe):
    op = call.op.name
    if op == "relax.expand_dims":
        return np.expand_dims(array, tuple(int(a) for a in call.attrs.axis))
    if op == "relax.permute_dims":
        axes = call.attrs.axes
        return np.transpose(array, None if axes is None else [int(a) for a in axes])
    if op == "relax.repeat":
        axis = call.attrs.axis
        return np.repeat(array, int(call.attrs.repeats), axis=None if axis is None else int(axis))
    if not isinstance(call.args[1], relax.ShapeExpr):
        return None
    shape = _concrete(call.args[1].values, probe)
    if shape is None:
        return None
    if op == "relax.broadcast_to":
        return np.broadcast_to(array, shape)
    return array.reshape(shape) if int(np.prod(shape)) == array.size else None


def _bias_fits(bias, query, scores) -> bool:
    """A ``[1, 1 or q_heads, rows, length]`` bias, as the kernels index it."""
    ty = bias.ty
    if not isinstance(ty, relax.TensorType) or ty.ndim != 4 or ty.shape is None:
        return False
    analyzer = tvm.sym.Analyzer()
    one, heads, row, length = ty.shape
    return (_static_one(one) and analyzer.can_prove_equal(row, scores.ty.shape[2])
            and analyzer.can_prove_equal(length, scores.ty.shape[3])
            and (_static_one(heads) or analyzer.can_prove_equal(heads, query.ty.shape[1])))


@relax.expr_functor.mutator
class _CacheRewriter(relax.PyExprMutator):
    """Emits the cache writes, the fused attentions and the prefix copies (see the module docstring)."""

    def __init__(self, mod, concats, attentions, caches, rings, past_length, uses, kv, scheme):
        super().__init__(mod)
        self.concats, self.attentions, self.caches, self.rings = concats, attentions, caches, rings
        self.past_length, self.kv, self.scheme = past_length, kv, scheme
        self.fused_chain = set().union(*(a.chain for a in attentions.values())) if attentions else set()
        fused_sources = {a.key for a in attentions.values()} | {a.value for a in attentions.values()}
        # a concatenation needs its prefix read back when something besides fused attentions reads it
        self.copied = {var for var in concats
                       if var not in fused_sources
                       or any(r is not None and r not in self.fused_chain for r in uses.get(var, []))}
        self.prompt_sources = {v for a in attentions.values() if not a.decodes for v in (a.key, a.value)}
        self.written = {}  # concatenation var -> the cache's tensors after the write
        self.prompt_read = {}  # concatenation var -> what a prompt attention reads of it
        self.layouts = {}  # role -> the scheme's prompt layout kernel (None: the cache as written)
        self.kernels = {}

    def _kernel(self, key, make):
        if key not in self.kernels:
            symbol = f"lowbit_{key}_{self.scheme.kernel_suffix()}"
            func = make().with_attrs({"op_pattern": 8, "global_symbol": symbol})  # opaque: fusion leaves it whole
            self.kernels[key] = self.builder_.add_func(func, symbol)
        return self.kernels[key]

    def visit_var_binding_(self, binding):
        var, value = binding.var, binding.value
        if var in self.concats:
            self._write(var)
        elif var in self.attentions:
            self._attend(self.attentions[var])
        elif var in self.fused_chain:
            return  # replaced by the fused attention
        elif isinstance(value, relax.Tuple) and any(f in self.concats for f in value.fields):
            fields = [g for f in value.fields for g in (self.written[f] if f in self.concats else [self.visit_expr(f)])]
            self._bind(var, relax.Tuple(fields))
        else:
            super().visit_var_binding_(binding)

    def _bind(self, var, value):
        emit = self.builder_.emit if isinstance(var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(var, emit(value, var.name))

    def _write(self, var):
        index, new = self.concats[var]
        role, kv, ring = ROLES[index % 2], self.kv, self.rings[index]
        buffers = self.caches[index]
        part = f"{role}_" if self.scheme.roles_differ else ""
        shape = f"h{kv.num_kv_heads}_d{kv.head_dim}" + ("_ring" if ring else "")
        append = self._kernel(f"kv_append_{part}{shape}", lambda: self.scheme.append_kernel(role, ring))
        types = [buffer.ty for buffer in buffers]
        call = self.builder_.emit(relax.call_tir_inplace(
            append, [*buffers, self.visit_expr(new), relax.prim_value(self.past_length)], list(range(len(buffers))),
            types if len(types) > 1 else types[0]), f"{var.name}_cache")
        written = [call] if len(buffers) == 1 else [
            self.builder_.emit(relax.TupleGetItem(call, i), f"{var.name}_cache{i}") for i in range(len(buffers))]
        self.written[var] = written
        if var in self.prompt_sources:
            self.prompt_read[var] = self._prompt_layout(var, role, written)
        if var in self.copied:
            end = var.ty.shape[2]
            read_back = self.scheme.prefix_kernel(role, ring)
            if read_back is None:
                self._bind(var, relax.op.strided_slice(written[0], [2], [0], [end], assume_inbound=True))
            else:
                kernel = self._kernel(f"kv_read_{part}{shape}", lambda: read_back)
                self._bind(var, relax.call_tir(kernel, [*written, relax.prim_value(end)],
                                               relax.TensorType([1, kv.num_kv_heads, end, kv.head_dim], kv.dtype)))

    def _prompt_layout(self, var, role, written) -> list:
        """The cache's tensors as the scheme's prompt attention reads them: as written, or read
        back by the scheme's prompt layout kernel (positions ``[0, past + seq)``)."""
        if role not in self.layouts:
            self.layouts[role] = self.scheme.prompt_layout_kernel(role)
        if self.layouts[role] is None:
            return written
        kv, end = self.kv, var.ty.shape[2]
        kernel = self._kernel(f"kv_prompt_{role}_h{kv.num_kv_heads}_d{kv.head_dim}", lambda: self.layouts[role])
        shape = padded_cache_shape(kv.num_kv_heads, kv.head_dim, end, role == "key")
        call = relax.call_tir(kernel, [*written, relax.prim_value(end)], relax.TensorType(list(shape), kv.dtype))
        return [self.builder_.emit(call, f"{var.name}_prompt")]

    def _attend(self, attention):
        kv = self.kv
        q_heads = int(attention.query.ty.shape[1])
        bias_heads = None if attention.bias is None else int(attention.bias.ty.shape[1])
        kind = "decode" if attention.decodes else "prompt"
        ring = self.rings[self.concats[attention.key][0]]
        key = (f"{kind}_attention_q{q_heads}_kv{kv.num_kv_heads}_d{kv.head_dim}"
               f"_s{attention.scale:.6g}".replace(".", "p").replace("-", "m") + f"_b{bias_heads or 0}"
               + ("_ring" if ring else ""))
        make = self.scheme.attention_kernel if attention.decodes else self.scheme.prompt_attention_kernel
        kernel = self._kernel(key, lambda: make(q_heads, attention.scale, bias_heads, ring))
        length = attention.key.ty.shape[2]
        read = self.written if attention.decodes else self.prompt_read
        args = [self.visit_expr(attention.query), *read[attention.key], *read[attention.value]]
        if attention.bias is not None:
            args.append(self.visit_expr(attention.bias))
        out_ty = relax.TensorType([*list(attention.query.ty.shape)[:3], kv.head_dim], kv.dtype)
        self._bind(attention.output, relax.call_tir(kernel, [*args, relax.prim_value(length)], out_ty))
