"""torch.export of a Hugging Face causal LM into Relax, with the KV cache as explicit inputs/outputs.

The model is wrapped so that its signature is the one ONNX decoder exports use
(``input_ids, past_key_values.{i}.key, past_key_values.{i}.value`` -> ``logits, present.{i}.*``),
exported once with a dynamic sequence length and a dynamic past length, imported with TVM's
``from_exported_program``, and specialized into ``prefill`` / ``decode`` (see :mod:`model_ir`).
"""

from __future__ import annotations

import contextlib
import os

import torch
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from lowbit.codegen.errors import LowbitError
from lowbit.passes.model_ir import KVLayout, ModelIR, kv_names, make_entry_module, rename_params, sync_params
from .unsupported import check_exported_ops


def _same_tensor(node, importer):
    """``Tensor.to(device)``: lowbit compiles for one device, so a device move is the identity."""
    return importer.env[node.args[0]]


def _attention(node, importer):
    """``scaled_dot_product_attention`` as matmul / softmax / matmul on ``[batch, heads, seq, dim]``.

    TVM's converter accepts float masks only and drops ``scale``; transformers passes a boolean
    mask and the model's own scale. Written out, the two matmuls are ordinary Relax ops that the
    rest of the pipeline (calibration, KV-cache passes, schedules) sees like any other.
    """
    bb = importer.block_builder
    query, key, value = (importer.env[a] for a in node.args[:3])
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    is_causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
    if (node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)) != 0.0:
        raise LowbitError(f"node {node.name}: attention dropout must be 0 at inference")
    dtype = str(query.ty.dtype)
    head_dim = query.ty.shape[-1]
    if scale is None:
        scale = 1.0 / float(head_dim) ** 0.5
    scores = bb.emit(relax.op.matmul(query, relax.op.permute_dims(key, [0, 1, 3, 2])))
    scores = bb.emit(relax.op.multiply(scores, relax.const(float(scale), dtype)))
    if mask is not None:
        bias = importer.env[mask]
        if str(bias.ty.dtype) == "bool":
            bias = bb.emit(relax.op.where(bias, relax.const(0.0, dtype), relax.const(_MASKED, dtype)))
        scores = bb.emit(relax.op.add(scores, bias))
    if is_causal:  # torch aligns the causal mask top-left
        q_len, kv_len = query.ty.shape[2], key.ty.shape[2]
        allowed = bb.emit(relax.op.tril(relax.op.ones(relax.ShapeExpr([q_len, kv_len]), "bool")))
        scores = bb.emit(relax.op.where(allowed, scores, relax.const(_MASKED, dtype)))
    probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
    return bb.emit(relax.op.matmul(probs, value))


_MASKED = -3.0e38  # finite, so a fully masked row gives zeros instead of NaN


def _output_dtype(node, importer) -> str:
    """The Relax dtype of ``node``'s result, as torch.export recorded it."""
    return importer._convert_data_type(node.meta["val"].dtype)


def _new_ones(node, importer):
    """``Tensor.new_ones(size, dtype=...)``: ones in the dtype the node asks for.

    TVM's converter gives the result the input's dtype and ignores ``dtype=``; transformers' masks
    call ``positions.new_ones((), dtype=torch.bool)`` on int64 positions, and the mask then came out
    int64 and could not be added to the attention scores.
    """
    size = importer.retrieve_args(node)[1]
    dtype = _output_dtype(node, importer)
    return importer.block_builder.emit(relax.op.full(relax.ShapeExpr(list(size)), relax.const(1, dtype), dtype))


def _where_scalar_other(node, importer):
    """``torch.where(condition, tensor, scalar)`` (eager attention's float masks): TVM converts only
    the tensor-tensor form."""
    condition, values, other = importer.retrieve_args(node)[:3]
    dtype = _output_dtype(node, importer)
    if str(values.ty.dtype) != dtype:
        values = importer.block_builder.emit(relax.op.astype(values, dtype))
    return importer.block_builder.emit(relax.op.where(condition, values, relax.const(other, dtype)))


def _layer_norm(node, importer):
    """``layer_norm`` with or without weight and bias (OLMo's norms have neither): TVM's converter
    looks up a missing weight and fails."""
    args = list(node.args) + [None] * (5 - len(node.args))
    x, shape, weight, bias, eps = args[0], args[1], args[2], args[3], args[4]
    env = importer.env
    return importer._layer_norm_impl(env[x], None if weight is None else env[weight],
                                     None if bias is None else env[bias], 1e-5 if eps is None else eps, shape)


def _in_place(op: str):
    """An in-place op (``a.div_(b)``: Mixtral's router normalizing its weights; ``a.clamp_(...)``:
    OLMo's ``clip_qkv``) as its out-of-place ``op``, with later readers of ``a`` reading the
    result too. TVM has no converters for these."""

    def convert(node, importer):
        result = importer.convert_map[op](node)
        importer.env[node.args[0]] = result
        return result

    return convert


def _repeat_interleave(node, importer):
    """``x.repeat_interleave(n, dim)`` with a whole-number ``n`` (a mixture of experts' batched
    form repeats each token once per chosen expert); without ``dim`` it repeats the flattened
    tensor, as torch does."""
    x, repeats = importer.retrieve_args(node)[:2]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if dim is None:
        x, dim = importer.block_builder.emit(relax.op.reshape(x, [-1])), 0
    return importer.block_builder.emit(relax.op.repeat(x, repeats, axis=dim))


EXTRA_CONVERTERS = {
    "to.device": _same_tensor,
    "scaled_dot_product_attention.default": _attention,
    "new_ones.default": _new_ones,
    "where.ScalarOther": _where_scalar_other,
    "layer_norm.default": _layer_norm,
    "div_.Tensor": _in_place("div.Tensor"),
    "clamp_.default": _in_place("clamp.default"),
    "repeat_interleave.self_int": _repeat_interleave,
}


class _ExplicitCacheLM(torch.nn.Module):
    """``forward(input_ids, *past) -> (logits, *present)`` around a transformers causal LM.

    Requires ``past`` to be ``2 * num_layers`` tensors ``[1, kv_heads, past, head_dim]`` (key, value
    per layer) with one ``past`` length for every layer. Guarantees every layer's ``present`` is its
    ``past`` concatenated with the new tokens' keys/values, whatever cache class transformers would
    pick for the layer: every layer gets a full :class:`~transformers.cache_utils.DynamicLayer`,
    so a sliding-window layer keeps all of its past too and its window is applied by the attention
    mask the model computes from positions (what the window means), not by trimming the cache.
    (The in-place cache, :mod:`lowbit.passes.kv_cache`, then keeps such a layer's cache as a ring.)
    """

    def __init__(self, model, num_layers: int):
        super().__init__()
        self.lm = model
        self.num_layers = num_layers

    def forward(self, input_ids, *past):
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = DynamicCache()  # no config: transformers would give sliding layers a trimmed cache
        cache.layers = [DynamicLayer() for _ in range(self.num_layers)]
        past_len = past[0].shape[2]
        for i, layer in enumerate(cache.layers):
            key, value = past[2 * i], past[2 * i + 1]
            torch._check(key.shape[2] == past_len)
            torch._check(value.shape[2] == past_len)
            layer.dtype, layer.device = key.dtype, key.device
            layer.keys, layer.values, layer.is_initialized = key, value, True
        positions = torch.arange(past_len, past_len + input_ids.shape[1]).unsqueeze(0)
        out = self.lm(input_ids=input_ids, past_key_values=cache, position_ids=positions, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def kv_layout_of(config) -> KVLayout:
    """The KV cache layout of a transformers config (its decoder's text config): ``head_dim`` as
    the config gives it (Gemma, Qwen3: not ``hidden_size / heads``) or else ``hidden_size / heads``;
    ``num_key_value_heads``, or one KV head per query head where the config has none (GPT-NeoX);
    the sliding windows as transformers applies them (:func:`_windows`)."""
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return KVLayout(
        num_layers=text.num_hidden_layers,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        windows=_windows(text),
    )


def _windows(text) -> tuple:
    """Per layer, the sliding window its attention mask applies, as transformers' models choose
    their masks: ``layer_types`` names each layer's (``"sliding_attention"``: ``sliding_window``),
    and without it a ``sliding_window`` applies to every layer (Mistral, Phi-3, Mixtral); empty
    when no layer has one. The window only sizes the layer's cache (a ring): the mask itself is
    imported with the graph, and the parity tests check the two agree."""
    window = getattr(text, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        return ()
    types = getattr(text, "layer_types", None)
    if types is None:
        windows = (window,) * text.num_hidden_layers
    else:
        windows = tuple(window if kind == "sliding_attention" else None for kind in types)
    return windows if any(windows) else ()


@contextlib.contextmanager
def _batched_experts(model):
    """Mixture-of-experts layers in transformers' ``batched_mm`` form for the duration.

    The default ``grouped_mm`` form sorts tokens by expert (``histc``) and calls a custom op that
    Relax cannot import; ``batched_mm`` gathers each token's chosen experts' weights and runs
    batched matmuls, plain ops with static shapes and the same result. The gather copies the chosen
    experts' weights once per token: right for decode (one token reads its experts anyway), heavy
    for long prefills of large experts. Models without experts are unaffected; the model's own
    setting is restored on exit.
    """
    if not hasattr(model, "set_experts_implementation"):
        yield
        return
    saved = model.get_experts_implementation()
    model.set_experts_implementation("batched_mm")
    try:
        yield
    finally:
        model.set_experts_implementation(saved)


def _export_failure(model, exc: Exception) -> LowbitError:
    """The error for a model ``torch.export`` cannot take: the innermost submodule of ``model``
    that was running (its name in the model and its class), the innermost line of code outside
    torch that was running (the model's own line that failed), torch's reason, and what to try."""
    names = {id(module): name for name, module in model.named_modules()}
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    module, line = None, None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if id(frame.f_locals.get("self")) in names:
            module = frame.f_locals["self"]
        if not frame.f_code.co_filename.startswith(torch_dir):
            line = f"{frame.f_code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    where = "" if module is None else f" in {names[id(module)] or 'the model itself'} ({type(module).__name__})"
    where += "" if line is None else f" at {line}"
    reason = next(iter(str(exc).splitlines()), "")
    return LowbitError(
        f"torch.export failed for {type(model).__name__}{where}: {type(exc).__name__}: {reason}. "
        "Try another implementation the model's config offers (attn_implementation, experts_implementation) or "
        "another transformers version whose modeling code exports; torch.export.draft_export lists every problem"
    )


def import_torch_model(model, max_context: int | None = None) -> ModelIR:
    """Export ``model`` (a transformers causal LM in float32) and import it into Relax."""
    config = model.config
    kv = kv_layout_of(config)
    text = config.get_text_config(decoder=True)
    context = max_context or getattr(text, "max_position_embeddings", 2048)
    wrapper = _ExplicitCacheLM(model, kv.num_layers).eval()

    example_ids = torch.zeros((1, 4), dtype=torch.long)
    example_past = [torch.zeros((1, kv.num_kv_heads, 3, kv.head_dim)) for _ in range(2 * kv.num_layers)]
    seq = torch.export.Dim("seq", min=1, max=context - 1)
    past = torch.export.Dim("past", min=0, max=context - 1)
    dynamic = {"input_ids": {1: seq}, "past": tuple({2: past} for _ in example_past)}
    try:
        with torch.no_grad(), _batched_experts(model):
            program = torch.export.export(wrapper, (example_ids, *example_past), dynamic_shapes=dynamic)
    except Exception as exc:  # torch raises many types here; all mean "this model does not export"
        raise _export_failure(model, exc) from exc
    check_exported_ops(program, EXTRA_CONVERTERS)
    signature = program.graph_signature
    placeholder_to_fqn = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    num_input = 1 + 2 * kv.num_layers

    # The un-decomposed graph keeps linear/sdpa whole and imports ~40x faster than a decomposed one.
    mod = from_exported_program(
        program, keep_params_as_input=True, run_ep_decomposition=False, custom_convert_map=EXTRA_CONVERTERS
    )
    mod, detached = relax.frontend.detach_params(mod)
    names = [placeholder_to_fqn.get(v.name, v.name).removeprefix("lm.") for v in mod["main"].params[num_input:]]
    mod["main"] = rename_params(mod["main"], names)
    params = {n: t.numpy() for n, t in zip(names, detached["main"])}
    mod = make_entry_module(mod, num_input)
    mod, params = sync_params(mod, params)
    return ModelIR(
        mod=mod,
        params=params,
        input_names=["input_ids"] + kv_names("past_key_values", kv.num_layers),
        output_names=["logits"] + kv_names("present", kv.num_layers),
        kv=kv,
        vocab_size=text.vocab_size,
        max_context=context,
    )
