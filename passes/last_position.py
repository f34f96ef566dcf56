"""``prefill_last``: a prompt entry whose output head runs on the prompt's last position only.

Generation reads the logits of a prompt's last token only, but ``prefill`` computes them for every
position (perplexity needs them all), and its tail is row by row: the final norm, the output head (a
GEMM of ``seq`` rows by the vocabulary: for SmolLM2, 28 M of the 135 M multiply-adds per row),
soft-capping. :func:`add_last_position_entry` derives a second prompt entry from ``prefill``: the
bindings that lead only to the logits and compute each position from the same position alone,
found from the dataflow graph, run on the last position: their inputs are sliced to it and every
shape among them has ``seq`` bound to 1.

Position-wise (``seq`` a whole axis of each tensor involved, never reduced, mixed or broadcast
along): elementwise ops whose other operands do not depend on ``seq``; reductions and norms over
other axes; ``matmul`` by a ``seq``-free right operand; reshapes that keep each position's elements
together; slices along other axes; lowbit's linear kernels (``lowbit.kernel``, rows in, rows out).

Requires: ``prefill`` with ``input_ids[1, seq]`` first and the logits first among its outputs;
run after the linear-layer rewrite (the head is a kernel call by then) and the KV-cache rewrite.
Guarantees: ``prefill_last`` takes ``prefill``'s parameters and returns its outputs, the logits as
``[1, 1, vocab]``, equal to ``prefill``'s last row; ``prefill`` is unchanged. Where no
position-wise binding reaches the logits, the logits are sliced at the end (same result).
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from lowbit.codegen.entry_points import PROMPT, PROMPT_LAST
from lowbit.codegen.kernels import GEMV_ATTR, KERNEL_ATTR

from .model_ir import bindings_and_uses
UNARY = {"relax.tanh", "relax.exp", "relax.sqrt", "relax.rsqrt", "relax.sigmoid", "relax.negative", "relax.astype",
         "relax.abs", "relax.erf", "relax.clip", "relax.nn.silu", "relax.nn.gelu", "relax.nn.gelu_tanh"}
BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.power", "relax.maximum",
          "relax.minimum"}
REDUCTIONS = {"relax.mean", "relax.sum", "relax.max", "relax.min", "relax.variance"}
NORMS = {"relax.nn.rms_norm", "relax.nn.layer_norm"}


def add_last_position_entry(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """``mod`` with ``prefill_last`` added (see the module docstring), and how many of prefill's
    bindings it runs on the last position only."""
    func = relax.utils.copy_with_new_vars(mod[PROMPT])  # no Var may belong to two functions
    seq = func.params[0].ty.shape[1]
    bindings, uses = bindings_and_uses(func)
    output, returned = func.body.body, [None]  # readers that are the function's return
    if isinstance(output, relax.Var) and isinstance(bindings.get(output), relax.Tuple):
        output, returned = bindings[output], [None, output]
    logits = output.fields[0] if isinstance(output, relax.Tuple) else output
    chain = _position_wise_tail(logits, returned, seq, bindings, uses, mod)
    rewriter = _LastPosition(mod, chain, seq, logits)
    body = rewriter.visit_expr(func.body)
    new = relax.Function(list(func.params), body, None, func.is_pure, func.attrs).with_attr("global_symbol", PROMPT_LAST)
    mod = rewriter.builder_.get()
    mod[PROMPT_LAST] = relax.analysis.remove_all_unused(new)
    return mod, len(chain)


def _position_wise_tail(logits, returned: list, seq, bindings: dict, uses: dict, mod) -> set:
    """The bindings upstream of ``logits`` that are position-wise and read by nothing else
    (``logits`` itself by nothing but the ``returned`` readers)."""
    chain: set = set()
    pending = [logits] if isinstance(logits, relax.Var) else []
    changed = True
    while changed:
        changed = False
        for var in list(pending):
            if var in chain or var not in bindings:
                pending.remove(var)
                continue
            allowed = returned if var.same_as(logits) else []
            if any(r not in chain and not any(_same(r, a) for a in allowed) for r in uses.get(var, [])):
                continue  # read elsewhere (maybe only so far): retried after others join the chain
            pending.remove(var)
            if _position_wise(var, bindings[var], seq, mod):
                chain.add(var)
                pending.extend(a for a in _tensor_args(bindings[var]) if isinstance(a, relax.Var))
                changed = True
    return chain


def _same(a, b) -> bool:
    return a is None and b is None or a is not None and b is not None and a.same_as(b)


def _tensor_args(value) -> list:
    """The tensors a call reads (a ``call_tir``'s: its argument tuple's)."""
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
        return []
    args = value.args[1].fields if value.op.name == "relax.call_tir" else value.args
    return [a for a in args if isinstance(a.ty, relax.TensorType)]


def _seq_axis(expr, seq) -> int | None:
    """The one axis of ``expr``'s shape that is ``seq``; ``None`` if none is, -1 if ``seq`` appears
    otherwise (twice, or inside another dimension)."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return -1
    axes = [i for i, d in enumerate(ty.shape) if isinstance(d, tirx.Var) and d.same_as(seq)]
    mentions = sum(1 for d in ty.shape if _mentions(d, seq))
    if mentions == 0:
        return None
    return axes[0] if len(axes) == 1 and mentions == 1 else -1


def _mentions(dim, seq) -> bool:
    return any(var.same_as(seq) for var in tirx.analysis.undefined_vars(dim))


def _position_wise(var, value, seq, mod) -> bool:
    """Whether ``var = value`` computes each position of ``seq`` from the same position alone."""
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
        return False
    out = _seq_axis(var, seq)
    if out is None or out < 0:
        return False
    op, args = value.op.name, value.args
    ndim = len(var.ty.shape)
    if op == "relax.call_tir":
        return _row_kernel(mod, args[0]) and out == 0 and _seq_axis(args[1].fields[0], seq) == 0 and all(
            _seq_axis(a, seq) is None for a in args[1].fields[1:])
    axis = _seq_axis(args[0], seq)
    if axis is None or axis < 0:
        return False
    if op in UNARY:
        return axis == out
    if op in BINARY:  # operands broadcast from the right: seq must sit at the same place from the end
        axes = [(a, _seq_axis(a, seq)) for a in args]
        return all(at is None or (at >= 0 and len(a.ty.shape) - at == ndim - out) for a, at in axes)
    if op in REDUCTIONS or op in NORMS:
        axes = value.attrs.axis if op in REDUCTIONS else value.attrs.axes
        rank = len(args[0].ty.shape)
        reduced = range(rank) if axes is None else [int(a) % rank for a in axes]
        return axis not in reduced and all(_seq_axis(a, seq) is None for a in args[1:])
    if op == "relax.matmul":
        return axis < len(args[0].ty.shape) - 1 and _seq_axis(args[1], seq) is None
    if op == "relax.strided_slice":
        rank = len(args[0].ty.shape)
        return axis == out and axis not in [a % rank for a in _slice_axes(value)]
    if op == "relax.reshape":  # each position's elements stay one block, at the same place
        before, after = list(var.ty.shape), list(args[0].ty.shape)
        analyzer = tvm.sym.Analyzer()
        return (analyzer.can_prove_equal(_product(before[:out]), _product(after[:axis]))
                and analyzer.can_prove_equal(_product(before[out + 1:]), _product(after[axis + 1:])))
    return False


def _slice_axes(value) -> list[int]:
    """A ``strided_slice``'s axes (an attribute in older Relax, a tuple argument in newer)."""
    axes = getattr(value.attrs, "axes", None) if value.attrs is not None else None
    if axes is None:
        axes = value.args[1].fields if isinstance(value.args[1], relax.Tuple) else value.args[1].values
    return [int(getattr(a, "value", a)) for a in axes]  # IntImm fields, or PrimValues wrapping them


def _row_kernel(mod, callee) -> bool:
    """A lowbit linear kernel for any number of rows: ``X[m, K]`` in, ``Y[m, N]`` out, row by row."""
    func = mod[callee] if isinstance(callee, relax.GlobalVar) else None
    return (isinstance(func, tirx.PrimFunc) and func.attrs is not None and KERNEL_ATTR in func.attrs
            and GEMV_ATTR in func.attrs and not bool(func.attrs[GEMV_ATTR]))


def _product(dims):
    result = tirx.const(1, "int64")
    for d in dims:
        result = result * d
    return result


@relax.expr_functor.mutator
class _LastPosition(relax.PyExprMutator):
    """Re-emits ``prefill`` with the chain's inputs sliced to the last position and its shapes'
    ``seq`` bound to 1; the logits are sliced at the end where no chain reaches them."""

    def __init__(self, mod, chain: set, seq, logits):
        super().__init__(mod)
        self.chain, self.seq, self.logits = chain, seq, logits
        self.sliced = {}  # a chain input -> its last position
        self.in_dataflow = False

    def visit_var_binding_(self, binding):
        var, value = binding.var, binding.value
        if var not in self.chain:
            super().visit_var_binding_(binding)
            if var.same_as(self.logits) and not self.chain:
                self._bind(var, self._last(self.get_var_remap(var)))
            return
        if value.op.name == "relax.call_tir":
            out = value.ty_args[0]
            new = relax.call_tir(value.args[0], [self._input(f) for f in value.args[1].fields],
                                 relax.TensorType(self._bound(out.shape), out.dtype))
        elif value.op.name == "relax.reshape":
            new = relax.op.reshape(self._input(value.args[0]), relax.ShapeExpr(self._bound(value.args[1].values)))
        else:
            new = relax.Call(value.op, [self._input(a) for a in value.args], value.attrs, value.ty_args)
        self._bind(var, new)

    def _input(self, arg):
        if isinstance(arg, relax.Var) and arg in self.chain:
            return self.get_var_remap(arg)
        if _seq_axis(arg, self.seq) is None or not isinstance(arg.ty, relax.TensorType):
            return self.visit_expr(arg)
        if arg not in self.sliced:
            self.sliced[arg] = self.builder_.emit(self._last(self.visit_expr(arg)), "last_position")
        return self.sliced[arg]

    def _last(self, expr):
        axis = _seq_axis(expr, self.seq)
        return relax.op.strided_slice(expr, axes=[axis], begin=[self.seq - 1], end=[self.seq])

    def _bound(self, dims):
        analyzer = tvm.sym.Analyzer()
        analyzer.bind(self.seq, tirx.const(1, "int64"))
        return [analyzer.simplify(d) for d in dims]

    def visit_dataflow_block_(self, block):
        self.in_dataflow = True
        try:
            return super().visit_dataflow_block_(block)
        finally:
            self.in_dataflow = False

    def _bind(self, var, value):
        output = self.in_dataflow and not isinstance(var, relax.DataflowVar)
        emit = self.builder_.emit_output if output else self.builder_.emit
        self.set_var_remap(var, emit(value, var.name))
