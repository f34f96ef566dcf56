"""The in-place KV cache: its kernels against numpy, the rewrite on a hand-built attention (fused
and not), and on SmolLM2 (every layer fused; decode through a growing cache equals one prefill)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from lowbit.codegen.attention import decode_attention_kernel, kv_append_kernel
from lowbit.passes.kv_cache import cache_in_place
from lowbit.passes.model_ir import KVLayout, ModelIR, kv_names, make_entry_module
from lowbit.targets import build, get_target
from lowbit.targets.pipeline import schedule

HOST = get_target("host")


def _run_kernel(func, *args):
    lib = tvm.compile(schedule(func.with_attr("global_symbol", "main"), HOST).mod, target=HOST.tvm())
    lib["main"](*args)


def test_append_writes_the_new_positions_in_place():
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((1, 2, 16, 8)).astype(np.float32)
    new = rng.standard_normal((1, 2, 3, 8)).astype(np.float32)
    device = tvm.runtime.tensor(cache)
    _run_kernel(kv_append_kernel(2, 8), device, tvm.runtime.tensor(new), 5)
    want = cache.copy()
    want[:, :, 5:8] = new
    np.testing.assert_array_equal(device.numpy(), want)


@pytest.mark.parametrize("bias_heads", [None, 1, 6])
def test_decode_attention_matches_numpy_and_reads_only_the_prefix(bias_heads):
    """Grouped-query attention (6 query heads on 2 KV heads) over 11 of 32 positions; the unused
    positions hold NaN, so reading one would poison the result."""
    rng = np.random.default_rng(1)
    length, scale = 11, 0.3
    q = rng.standard_normal((1, 6, 1, 16)).astype(np.float32)
    keys, values = (np.full((1, 2, 32, 16), np.nan, np.float32) for _ in range(2))
    keys[:, :, :length] = rng.standard_normal((1, 2, length, 16))
    values[:, :, :length] = rng.standard_normal((1, 2, length, 16))
    scores = q @ np.repeat(keys[:, :, :length], 3, axis=1).transpose(0, 1, 3, 2) * scale
    args = [q, keys, values]
    if bias_heads is not None:
        bias = np.where(rng.random((1, bias_heads, 1, length)) < 0.3, -3.0e38, 0.0).astype(np.float32)
        bias[..., 0] = 0.0  # every row keeps a position
        scores = scores + bias
        args.append(bias)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = (probs / probs.sum(-1, keepdims=True)) @ np.repeat(values[:, :, :length], 3, axis=1)
    out = tvm.runtime.tensor(np.zeros((1, 6, 1, 16), np.float32))
    _run_kernel(decode_attention_kernel(6, 2, 16, scale, bias_heads), *map(tvm.runtime.tensor, args), length, out)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)


# -- the rewrite on a hand-built one-layer attention --------------------------------------------
VOCAB, Q_HEADS, KV_HEADS, DIM = 32, 4, 2, 8


def _attention_model(softcap: bool) -> relax.Function:
    """``input_ids`` -> logits ``[1, seq, Q_HEADS * DIM]``: q/k/v looked up from tables, the cache
    concatenated and returned, grouped-query attention as torch.export imports it; with
    ``softcap``, ``tanh`` on the scores (an attention the fused kernel does not compute)."""
    seq, past = tirx.Var("seq", "int64"), tirx.Var("past", "int64")
    ids = relax.Var("input_ids", relax.TensorType([1, seq], "int64"))
    cache_in = [relax.Var(n, relax.TensorType([1, KV_HEADS, past, DIM], "float32"))
                for n in kv_names("past_key_values", 1)]
    tables = [relax.Var(n, relax.TensorType([VOCAB, h * DIM], "float32"))
              for n, h in (("wq", Q_HEADS), ("wk", KV_HEADS), ("wv", KV_HEADS))]
    bb = relax.BlockBuilder()
    with bb.function("main", [ids, *cache_in, *tables]):
        with bb.dataflow():
            def heads(table, count):
                rows = bb.emit(relax.op.take(table, relax.op.reshape(ids, [seq]), axis=0))
                return bb.emit(relax.op.permute_dims(relax.op.reshape(rows, [1, seq, count, DIM]), [0, 2, 1, 3]))

            q, k, v = heads(tables[0], Q_HEADS), heads(tables[1], KV_HEADS), heads(tables[2], KV_HEADS)
            keys = bb.emit(relax.op.concat([cache_in[0], k], axis=2))
            values = bb.emit(relax.op.concat([cache_in[1], v], axis=2))

            def repeat(x):
                wide = bb.emit(relax.op.broadcast_to(relax.op.expand_dims(x, [2]),
                                                     [1, KV_HEADS, Q_HEADS // KV_HEADS, past + seq, DIM]))
                return bb.emit(relax.op.reshape(wide, [1, Q_HEADS, past + seq, DIM]))

            scores = bb.emit(relax.op.matmul(q, relax.op.permute_dims(repeat(keys), [0, 1, 3, 2])))
            scores = bb.emit(relax.op.multiply(scores, relax.const(0.25, "float32")))
            if softcap:
                scores = bb.emit(relax.op.tanh(scores))
            probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
            mixed = bb.emit(relax.op.matmul(probs, repeat(values)))
            logits = bb.emit(relax.op.reshape(relax.op.permute_dims(mixed, [0, 2, 1, 3]), [1, seq, Q_HEADS * DIM]))
            out = bb.emit_output(relax.Tuple([logits, keys, values]))
        bb.emit_func_output(out)
    return bb.get()["main"]


def _model(softcap: bool) -> ModelIR:
    rng = np.random.default_rng(2)
    params = {n: rng.standard_normal((VOCAB, h * DIM)).astype(np.float32)
              for n, h in (("wq", Q_HEADS), ("wk", KV_HEADS), ("wv", KV_HEADS))}
    mod = make_entry_module(_attention_model(softcap), _attention_model(softcap), 3)
    return ModelIR(mod, params, ["input_ids"] + kv_names("past_key_values", 1), ["logits"] + kv_names("present", 1),
                   KVLayout(1, KV_HEADS, DIM), VOCAB, 64)


@pytest.mark.parametrize("softcap", [False, True], ids=["fused", "copied"])
def test_cache_in_place_computes_what_the_imported_graph_computes(softcap):
    ir = _model(softcap)
    rewritten, summary = cache_in_place(ir)
    assert summary["attention_fused"] == (0 if softcap else 1)
    assert rewritten.input_names[:2] == ["input_ids", "past_length"]
    before = relax.VirtualMachine(build(ir.mod, HOST), tvm.cpu())
    after = relax.VirtualMachine(build(rewritten.mod, HOST), tvm.cpu())
    weights = [tvm.runtime.tensor(a) for a in ir.params.values()]
    caches = [tvm.runtime.tensor(np.zeros((1, KV_HEADS, 16, DIM), np.float32)) for _ in range(2)]
    past = [tvm.runtime.tensor(np.zeros((1, KV_HEADS, 0, DIM), np.float32)) for _ in range(2)]
    position = 0
    for entry, ids in [("prefill", [3, 1, 4, 1, 5]), ("decode", [9]), ("decode", [2]), ("prefill", [6, 5])]:
        tokens = tvm.runtime.tensor(np.array([ids], np.int64))
        want = before[entry](tokens, *past, *weights)
        got = after[entry](tokens, tvm.runtime.ShapeTuple([position]), *caches, *weights)
        np.testing.assert_allclose(got[0].numpy(), want[0].numpy(), rtol=1e-5, atol=1e-6)
        past = [want[1], want[2]]
        position += len(ids)
        np.testing.assert_array_equal(caches[0].numpy()[:, :, :position], past[0].numpy())


def test_an_unexpected_cache_reader_is_named():
    from lowbit.codegen.errors import LowbitError

    length = tirx.Var("past", "int64")
    keys, values = (relax.Var(n, relax.TensorType([1, KV_HEADS, length, DIM], "float32"))
                    for n in kv_names("past_key_values", 1))
    bb = relax.BlockBuilder()
    with bb.function("f", [relax.Var("input_ids", relax.TensorType([1, 1], "int64")), keys, values]):
        with bb.dataflow():
            out = bb.emit_output(relax.Tuple([relax.op.sum(keys), values]))
        bb.emit_func_output(out)
    func = bb.get()["f"].with_attr("num_input", 3)
    broken = ModelIR(tvm.IRModule({"prefill": func, "decode": func}), {}, ["input_ids"] + kv_names("past_key_values", 1),
                     ["logits"], KVLayout(1, KV_HEADS, DIM), VOCAB, 64)
    with pytest.raises(LowbitError, match=r"KV-cache input past_key_values\.0\.key is read by relax\.sum"):
        cache_in_place(broken)


# -- SmolLM2 ------------------------------------------------------------------------------------
def test_smollm2_decode_attends_in_place_through_a_growing_cache(smol, smol_source):
    """Every layer's decode attention is fused; decoding across the session's first capacity
    (256 positions) gives the logits one prefill of the whole sequence gives."""
    built = smol.built("fp32")
    assert built.manifest["kv_cache"]["attention_fused"] == built.manifest["kv_cache"]["attention_layers"] == 30
    session = built.session()
    ids = [(37 * i + 11) % 49152 for i in range(262)]
    full = session.prefill(ids)
    session.prefill(ids[:250])
    steps = np.stack([session.decode(token) for token in ids[250:]])
    assert session.capacity >= 262
    rel = np.abs(steps - full[250:]).max() / np.abs(full[250:]).max()
    assert rel < 1e-4, f"decode through the cache differs from prefill by {rel:.2e} (relative)"
