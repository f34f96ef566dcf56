"""The ONNX frontend: a small random Llama exported to ONNX, compiled, and compared with onnxruntime."""

from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from lowbit.compiler import compile as lowbit_compile
from lowbit.compiler import load
from lowbit.codegen.errors import LowbitError
from lowbit.compiler.frontend.torch_export import _ExplicitCacheLM

NUM_LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16
PROMPT_IDS = [5, 17, 300, 42, 7, 511, 128]
NEXT_ID = 99
KV_NAMES = [f"{i}.{part}" for i in range(NUM_LAYERS) for part in ("key", "value")]


class _OptimumStyleLM(torch.nn.Module):
    """``forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``, as optimum exports."""

    def __init__(self, model):
        super().__init__()
        self.lm = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        for layer, key, value in zip(cache.layers, past[::2], past[1::2]):
            layer.dtype, layer.device = key.dtype, key.device
            layer.keys, layer.values, layer.is_initialized = key, value, True
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True)
        return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])


def _export(model, path, optimum_style: bool):
    """Export ``model`` with the ONNX decoder signature, ``seq`` and ``past`` dynamic."""
    ids = torch.zeros((1, 4), dtype=torch.long)
    if optimum_style:
        wrapper, names = _OptimumStyleLM(model), ["input_ids", "attention_mask", "position_ids"]
        example = [ids, torch.ones((1, 7), dtype=torch.long), torch.arange(3, 7)[None]]
    else:
        wrapper, names, example = _ExplicitCacheLM(model, NUM_LAYERS), ["input_ids"], [ids]
    inputs = names + [f"past_key_values.{n}" for n in KV_NAMES]
    outputs = ["logits"] + [f"present.{n}" for n in KV_NAMES]
    example += [torch.zeros((1, KV_HEADS, 3, HEAD_DIM)) for _ in KV_NAMES]
    dynamic = {"input_ids": {1: "seq"}, "attention_mask": {1: "total"}, "position_ids": {1: "seq"},
               "logits": {1: "seq"}}
    dynamic = {n: axes for n, axes in dynamic.items() if n in names + outputs}
    dynamic |= {n: {2: "past"} for n in inputs[len(names):]} | {n: {2: "total"} for n in outputs[1:]}
    # The TorchScript exporter traces shapes as tensors, which torch._check rejects; the checks only
    # guide torch.export, so they are skipped while tracing.
    with mock.patch.object(torch, "_check", lambda *args, **kwargs: None), torch.no_grad():
        torch.onnx.export(wrapper.eval(), tuple(example), str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, dynamo=False, opset_version=17)
    return path


def _tiny(family: str):
    """A random 2-layer model of ``family`` with the cache layout of this module's constants (GPT-NeoX,
    which has a KV head per query head: 2 heads of ``HEAD_DIM``)."""
    import transformers as T

    common = dict(vocab_size=512, intermediate_size=128, num_hidden_layers=NUM_LAYERS, max_position_embeddings=256,
                  pad_token_id=0)
    grouped = dict(common, hidden_size=64, num_attention_heads=4, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)
    config, model_class = {
        "llama": (T.LlamaConfig(**grouped), T.LlamaForCausalLM),
        "qwen2": (T.Qwen2Config(**grouped), T.Qwen2ForCausalLM),
        "qwen3": (T.Qwen3Config(**grouped), T.Qwen3ForCausalLM),
        "phi3": (T.Phi3Config(**grouped, partial_rotary_factor=0.5), T.Phi3ForCausalLM),
        "gpt_neox": (T.GPTNeoXConfig(**common, hidden_size=KV_HEADS * HEAD_DIM, num_attention_heads=KV_HEADS,
                                     rotary_pct=0.5), T.GPTNeoXForCausalLM),
    }[family]
    torch.manual_seed(0)
    return model_class(config).eval()


@pytest.fixture(scope="module")
def tiny_llama():
    return _tiny("llama")


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory, tiny_llama):
    return _export(tiny_llama, tmp_path_factory.mktemp("onnx") / "tiny-llama.onnx", optimum_style=False)


@pytest.fixture(scope="module")
def optimum_onnx_path(tmp_path_factory, tiny_llama):
    return _export(tiny_llama, tmp_path_factory.mktemp("onnx") / "tiny-llama-optimum.onnx", optimum_style=True)


def _onnxruntime_logits(path):
    """onnxruntime's logits for the prompt, then for one more token fed with the returned cache."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}

    def run(ids, past, cache):
        feed = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, past + len(ids)), np.int64),
                "position_ids": np.arange(past, past + len(ids))[None],
                **{f"past_key_values.{n}": c for n, c in zip(KV_NAMES, cache)}}
        return session.run(None, {n: v for n, v in feed.items() if n in wanted})

    logits, *present = run(PROMPT_IDS, 0, [np.zeros((1, KV_HEADS, 0, HEAD_DIM), np.float32)] * len(KV_NAMES))
    step, *_ = run([NEXT_ID], len(PROMPT_IDS), present)
    return logits[0], step[0, 0]


def _compiled_logits(onnx_path, recipe, out):
    lowbit_compile(str(onnx_path), recipe=recipe, target="host", output=out, max_context=256, progress=False)
    session = load(out)
    return session.prefill(PROMPT_IDS), session.decode(NEXT_ID)


def _relative_error(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("exported", ["onnx_path", "optimum_onnx_path"])
def test_fp32_matches_onnxruntime(exported, request, tmp_path):
    path = request.getfixturevalue(exported)
    want_prefill, want_step = _onnxruntime_logits(path)
    prefill, step = _compiled_logits(path, "fp32", tmp_path / "art")
    assert prefill.shape == want_prefill.shape
    assert _relative_error(prefill, want_prefill) < 1e-4
    assert _relative_error(step, want_step) < 1e-4


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3", "gpt_neox"])
def test_optimum_style_exports_of_other_families_match_onnxruntime(family, tmp_path):
    """optimum-style exports (``attention_mask`` and ``position_ids`` inputs, TorchScript) of Qwen2
    (q/k/v biases), Qwen3 (QK-norm), Phi-3 (fused projections, partial rotary) and GPT-NeoX
    (interleaved fused qkv, partial rotary) compile, fp32, and match onnxruntime. Phi-3's and
    GPT-NeoX's exports slice by bounds read from ``Shape`` ops (``x.shape[-1:]``), which the
    frontend resolves to constants where the dims are static."""
    path = _export(_tiny(family), tmp_path / f"tiny-{family}-optimum.onnx", optimum_style=True)
    want_prefill, want_step = _onnxruntime_logits(path)
    prefill, step = _compiled_logits(path, "fp32", tmp_path / "art")
    assert _relative_error(prefill, want_prefill) < 1e-4
    assert _relative_error(step, want_step) < 1e-4


def test_w8a16_quantizes_every_linear_and_stays_close(onnx_path, tmp_path):
    want_prefill, want_step = _onnxruntime_logits(onnx_path)
    prefill, step = _compiled_logits(onnx_path, "w8a16-rtn", tmp_path / "art")
    layers = load(tmp_path / "art").manifest["layers"]
    assert len(layers) == 7 * NUM_LAYERS + 1  # q, k, v, o, gate, up, down per layer, and lm_head
    assert _relative_error(prefill, want_prefill) < 0.1
    assert _relative_error(step, want_step) < 0.1


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("acme", 1)])
    onnx.save(model, str(path))
    return path


def test_unsupported_ops_are_named_with_their_nodes(tmp_path):
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", 8])
    nodes = [helper.make_node("FancyEmbed", ["input_ids"], ["h"], name="embed_fancy", domain="acme"),
             helper.make_node("FancyAttention", ["h"], ["logits"], name="layer0_fancy", domain="acme")]
    path = _save(helper.make_graph(nodes, "g", [x], [y]), tmp_path / "custom.onnx")
    with pytest.raises(LowbitError) as error:
        lowbit_compile(str(path), recipe="fp32", target="host", output=tmp_path / "art", progress=False)
    assert "FancyEmbed at node embed_fancy" in str(error.value)
    assert "FancyAttention at node layer0_fancy" in str(error.value)


def test_graph_without_kv_cache_is_refused_by_name(tmp_path):
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, [1, "seq"])
    node = helper.make_node("Identity", ["input_ids"], ["logits"], name="copy")
    path = _save(helper.make_graph([node], "g", [x], [y]), tmp_path / "no-cache.onnx")
    with pytest.raises(LowbitError, match="past_key_values.0.key"):
        lowbit_compile(str(path), recipe="fp32", target="host", output=tmp_path / "art", progress=False)


def test_unreadable_file_is_refused_by_name(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(LowbitError, match="broken.onnx is not a valid ONNX model"):
        lowbit_compile(str(path), recipe="fp32", target="host", output=tmp_path / "art", progress=False)


def test_smoothing_groups_found_from_the_onnx_graph(tiny_llama, tmp_path):
    """The same fold targets as the torch frontend, from an ONNX graph's pre-transposed weights.

    The norm weights are made distinct first: the exporter merges identical initializers, and a
    norm weight shared by several norms is (rightly) not a fold target."""
    import copy

    from lowbit.compiler.frontend.onnx_file import import_onnx_model
    from lowbit.passes.scale_folding import find_smoothing_groups

    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5)
    path = _export(model, tmp_path / "distinct-norms.onnx", optimum_style=False)
    groups = find_smoothing_groups(import_onnx_model(path, 64).mod["prefill"])
    kinds = [(len(g.linears), g.target.kind if g.target else None) for g in groups]
    assert kinds.count((3, "norm")) == NUM_LAYERS and kinds.count((2, "norm")) == NUM_LAYERS  # q/k/v, gate/up
    assert kinds.count((1, "linear")) == 2 * NUM_LAYERS  # down_proj into up_proj, o_proj into v_proj
    through_attention = [g for g in groups if g.target and g.target.channel_map]
    config = tiny_llama.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    expected = tuple(h // (heads // kv_heads) * head_dim + d for h in range(heads) for d in range(head_dim))
    assert len(through_attention) == NUM_LAYERS
    assert all(g.target.channel_map == expected for g in through_attention)
    assert all(not g.target.transposed for g in groups if g.target and g.target.kind == "linear")


def _compile_error(path, nodes) -> str:
    """The error of compiling a graph of ``nodes`` from ``input_ids`` to ``logits`` (opsets ai.onnx 17
    and com.microsoft 1), saved at ``path``."""
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", 8])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    with pytest.raises(LowbitError) as error:
        lowbit_compile(str(path), recipe="fp32", target="host", output=path.parent / "art", progress=False)
    return str(error.value)


def test_contrib_ops_are_all_named_before_the_checker(tmp_path):
    """ONNX Runtime GenAI's contrib ops: lowbit's own check names every one (onnx.checker stops at the first)."""
    nodes = [helper.make_node("SkipSimplifiedLayerNormalization", ["input_ids", "input_ids"], ["h"], name="norm0",
                              domain="com.microsoft"),
             helper.make_node("GroupQueryAttention", ["h"], ["a"], name="attn0", domain="com.microsoft"),
             helper.make_node("MatMulNBits", ["a"], ["logits"], name="proj0", domain="com.microsoft")]
    message = _compile_error(tmp_path / "genai.onnx", nodes)
    assert "3 node(s)" in message
    for name in ("SkipSimplifiedLayerNormalization at node norm0", "GroupQueryAttention at node attn0",
                 "MatMulNBits at node proj0"):
        assert name in message


def test_onnx_runtime_contrib_ops_are_named_as_such(tmp_path):
    """A tiny graph in ONNX Runtime GenAI's format (its five contrib ops, MatMulNBits twice): one
    error lists each op type once with its domain, its first node and the count, says they are ONNX
    Runtime contrib ops lowbit does not import, and what to export instead."""
    ms = "com.microsoft"
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["input_ids"], ["n"], name="/model/layers.0/norm"),
             helper.make_node("MatMulNBits", ["n"], ["qkv"], name="/model/layers.0/attn/qkv/MatMulNBits", domain=ms),
             helper.make_node("RotaryEmbedding", ["qkv"], ["r"], name="/model/layers.0/attn/rotary", domain=ms),
             helper.make_node("GroupQueryAttention", ["r"], ["a"], name="/model/layers.0/attn/GQA", domain=ms),
             helper.make_node("MatMulNBits", ["a"], ["o"], name="/model/layers.0/attn/o/MatMulNBits", domain=ms),
             helper.make_node("SkipSimplifiedLayerNormalization", ["o", "n"], ["logits"], name="/model/layers.1/norm",
                              domain=ms)]
    message = _compile_error(tmp_path / "genai-style.onnx", nodes)
    assert "6 node(s)" in message
    for line in ("SimplifiedLayerNormalization at node /model/layers.0/norm (domain ai.onnx)",
                 "MatMulNBits at node /model/layers.0/attn/qkv/MatMulNBits and 1 more (domain com.microsoft)",
                 "RotaryEmbedding at node /model/layers.0/attn/rotary (domain com.microsoft)",
                 "GroupQueryAttention at node /model/layers.0/attn/GQA (domain com.microsoft)",
                 "SkipSimplifiedLayerNormalization at node /model/layers.1/norm (domain com.microsoft)"):
        assert line in message
    assert message.count("MatMulNBits at node") == 1
    assert ("SimplifiedLayerNormalization, MatMulNBits, RotaryEmbedding, GroupQueryAttention, "
            "SkipSimplifiedLayerNormalization are ONNX Runtime contrib ops") in message
    assert "lowbit does not import" in message and "torch.onnx.export(..., dynamo=True)" in message


def test_export_config_gives_eos_and_a_missing_tokenizer_is_said(onnx_path, tmp_path):
    import json
    import shutil
    import warnings

    from lowbit.codegen.errors import LowbitWarning

    from .conftest import lowbit_cli

    folder = tmp_path / "export"
    folder.mkdir()
    path = Path(shutil.copy2(onnx_path, folder / "model.onnx"))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 2, "vocab_size": 512}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowbit_compile(str(path), recipe="fp32", target="host", output=tmp_path / "art", max_context=64,
                       progress=False)
    assert any(issubclass(w.category, LowbitWarning) and "--prompt-ids" in str(w.message) for w in caught)
    assert load(tmp_path / "art").manifest["eos_token_ids"] == [2]
    done = lowbit_cli("run", tmp_path / "art", "--prompt-ids", "5,17,300", "--max-new-tokens", "3", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["prompt_tokens"] == 3 and 1 <= len(result["token_ids"]) <= 3
    assert all(0 <= t < 512 for t in result["token_ids"])
