"""The mainstream decoder architectures through the torch.export frontend, against transformers.

Each family is a tiny random-weight model built from its config (nothing is downloaded): 2
layers, hidden 64, vocab 512, float32, saved as a Hugging Face folder and compiled through the
public API as a user's folder would be. Per family: fp32 prefill logits over a prompt longer than
any sliding window, and 8 greedy decode steps past it, match transformers' (each with its own cache
classes: sliding layers trimmed there, full in lowbit's ABI with the window in the mask); w8a16-rtn
quantizes every linear layer (fused ``qkv_proj`` / ``gate_up_proj`` included) and stays close to
float.

Measured (max |lowbit - transformers| / max |logit|): 3e-7 to 1.4e-6 for prefill and decode
(Gemma 2 the largest); the tolerance is rtol 1e-4 with atol 1e-5 of the largest logit. w8a16-rtn
mean KL against float: 8e-7 to 5e-6 nats (Gemma 2/3 the largest). Random tiny models predict
nearly uniform distributions, so any KL is small: the bound, 1e-4, is 20x the worst measured.
Qwen3-MoE passes the same checks (3e-7 / 4e-7 / 1e-6) and is left out for time: it takes the
same experts path as Mixtral. The experts' weights of a mixture of experts stay float (they are
gathered per token, not linear layers); the router is quantized.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from lowbit.codegen.errors import LowbitError

PROMPT_LEN, DECODE_STEPS = 20, 8
WINDOW = 8  # sliding window of the families that have one, well inside the prompt
RTOL = 1e-4
ATOL = 1e-5  # times the largest |logit| of the compared logits
MAX_W8A16_KL = 1e-4  # nats, mean over positions
_COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs():
    """``name -> (config, model class)``, each with the features its family is known by."""
    import transformers as T

    common = dict(_COMMON)
    return {
        "llama": (T.LlamaConfig(**common), T.LlamaForCausalLM),  # GQA, untied head
        "mistral": (T.MistralConfig(**common, sliding_window=WINDOW), T.MistralForCausalLM),
        "qwen2": (T.Qwen2Config(**common), T.Qwen2ForCausalLM),  # biases on q/k/v
        "qwen3": (T.Qwen3Config(**common, head_dim=24), T.Qwen3ForCausalLM),  # QK-norm, head_dim != hidden/heads
        # sandwich norms with 1 + weight, embedding scaling, attention and final soft-capping, local/global
        # layers, multi-query attention (one KV head)
        "gemma2": (T.Gemma2Config(**common | {"num_key_value_heads": 1}, head_dim=16, sliding_window=WINDOW),
                   T.Gemma2ForCausalLM),
        # and QK-norm, a rotary base per layer type
        "gemma3": (T.Gemma3TextConfig(**common, head_dim=16, sliding_window=WINDOW,
                                      layer_types=["sliding_attention", "full_attention"]), T.Gemma3ForCausalLM),
        # fused qkv_proj and gate_up_proj, partial rotary
        "phi3": (T.Phi3Config(**common, partial_rotary_factor=0.5), T.Phi3ForCausalLM),
        # fused interleaved query_key_value, LayerNorm with bias, parallel residual, partial rotary,
        # and no num_key_value_heads in the config
        "gpt_neox": (T.GPTNeoXConfig(**{k: v for k, v in common.items() if k != "num_key_value_heads"},
                                     rotary_pct=0.5), T.GPTNeoXForCausalLM),
        "olmo": (T.OlmoConfig(**common, clip_qkv=8.0), T.OlmoForCausalLM),  # LayerNorm without weights, clipped qkv
        # a mixture of experts, top-2 of 4 (exported in transformers' batched_mm form)
        "mixtral": (T.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2), T.MixtralForCausalLM),
    }


ARCHITECTURES = list(_configs())
SLIDING = ["mistral", "gemma2", "gemma3"]


@dataclasses.dataclass
class Arch:
    """One family's tiny model: lowbit's prepared import and fp32 session, transformers' model."""

    name: str
    prepared: object
    session: object  # fp32

    @property
    def reference(self):
        """transformers' model as lowbit loaded it from the folder (its default implementations)."""
        return self.prepared.source.model


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request, tmp_path_factory) -> Arch:
    from lowbit.compiler import get_recipe, prepare

    config, model_class = _configs()[request.param]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    model_class(config).eval().save_pretrained(folder)
    prepared = prepare(str(folder), max_context=64)
    return Arch(request.param, prepared, prepared.build(get_recipe("fp32")).session())


def _prompt() -> list[int]:
    return [int(t) for t in np.random.default_rng(0).integers(3, 512, PROMPT_LEN)]


def _assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * np.abs(want).max(), err_msg=what)


def test_prefill_matches_transformers(arch):
    ids = _prompt()
    with torch.no_grad():
        want = arch.reference(torch.tensor([ids])).logits[0].numpy()
    _assert_close(arch.session.prefill(ids), want, f"{arch.name}: prefill logits")


def test_greedy_decode_matches_transformers(arch):
    """8 steps past the prompt, each token transformers' greedy choice, fed to both; transformers
    keeps its own cache (sliding layers trimmed to the window)."""
    ids = _prompt()
    arch.session.prefill(ids)
    with torch.no_grad():
        out = arch.reference(torch.tensor([ids]), use_cache=True)
        for step in range(DECODE_STEPS):
            token = int(out.logits[0, -1].argmax())
            out = arch.reference(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            _assert_close(arch.session.decode(token), out.logits[0, -1].numpy(), f"{arch.name}: decode step {step}")


SOFT_CAPPED = {"gemma2"}  # tanh on the attention scores: not the fused kernel's computation


def test_decode_attention_is_fused_where_it_is_plain_attention(arch):
    """The in-place cache's pattern (GQA/MQA repetition, scale, mask, softmax) is found in every
    family's graph; soft-capped attention is left to the generic kernels (and still matches, above)."""
    kv = arch.session.manifest["kv_cache"]
    want = 0 if arch.name in SOFT_CAPPED else kv["attention_layers"]
    assert kv["attention_fused"] == want


@pytest.mark.parametrize("name", SLIDING)
def test_sliding_window_is_exercised(name):
    """The prompt is long enough for the window to change transformers' logits (so the parity
    tests above check it); the model alone, no lowbit build."""
    config, model_class = _configs()[name]
    torch.manual_seed(0)
    model = model_class(config).eval()
    ids = torch.tensor([_prompt()])
    with torch.no_grad():
        windowed = model(ids).logits
        model.config.sliding_window = 10 * PROMPT_LEN
        unwindowed = model(ids).logits
    assert (windowed - unwindowed).abs().max() > 1e-3 * windowed.abs().max()


def test_w8a16_quantizes_every_linear_and_stays_close(arch):
    """Every ``nn.Linear`` of the model (fused projections included) is in the layer report as
    int8; the mean KL of the output distribution against float on random ids stays small."""
    from lowbit.compiler import get_recipe

    built = arch.prepared.build(get_recipe("w8a16-rtn"))
    linears = {f"{name}.weight" for name, module in arch.reference.named_modules()
               if isinstance(module, torch.nn.Linear)}
    assert linears <= {name for name, fmt in built.result.layers.items() if fmt.startswith("int8")}
    ids = [int(t) for t in np.random.default_rng(1).integers(3, 512, 32)]
    kl = _mean_kl(arch.session.prefill(ids), built.session().prefill(ids))
    assert kl < MAX_W8A16_KL, f"{arch.name}: w8a16-rtn mean KL {kl:.2e} nats"


def _mean_kl(float_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(float || quantized) of the softmax distributions, in nats."""
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    p, q = log_softmax(float_logits), log_softmax(logits)
    return float((np.exp(p) * (p - q)).sum(axis=-1).mean())


def test_export_failure_names_the_module_the_reason_and_what_to_try():
    """A submodule whose code branches on a tensor's value cannot be exported: the error says
    which submodule, torch's reason, and what to try."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.compiler.frontend.torch_export import import_torch_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**_COMMON)).eval()
    mlp = model.model.layers[1].mlp
    forward = mlp.forward
    mlp.forward = lambda x: forward(x) if x.sum() > 0 else x
    with pytest.raises(LowbitError) as error:
        import_torch_model(model, 64)
    message = str(error.value)
    assert "torch.export failed for LlamaForCausalLM in model.layers.1.mlp (LlamaMLP) at " in message
    assert "test_architectures.py" in message  # the line that branched
    assert "data-dependent" in message and "Try another implementation" in message
