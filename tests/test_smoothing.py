"""Scale folding, SmoothQuant and AWQ: structure found from the graph, equivalence, error reduction."""

import dataclasses

import numpy as np
import pytest
import torch

from lowbit.passes.awq import output_error
from lowbit.passes.scale_folding import find_smoothing_groups, fold_scales
from lowbit.passes.schemes import WeightGrid
from lowbit.passes.smoothquant import smoothing_scales, w8a8_error
from lowbit.passes.statistics import LinearStatistics


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from lowbit.compiler import prepare

    return prepare(str(tiny_model_dir), max_context=64)


@pytest.fixture(scope="module")
def tiny_ir(tiny):
    return tiny.ir


def test_groups_and_fold_targets_come_from_the_graph(tiny_ir):
    groups = {tuple(u.name.split(".")[-2] for u in g.linears): g for g in find_smoothing_groups(tiny_ir.mod["prefill"])}
    assert groups[("q_proj", "k_proj", "v_proj")].target.name.endswith("input_layernorm.weight")
    assert groups[("gate_proj", "up_proj")].target.name.endswith("post_attention_layernorm.weight")
    assert groups[("down_proj",)].target.name.endswith("up_proj.weight")
    assert groups[("lm_head",)].target is None  # tied to the embedding: scaling it would change the lookup
    value = groups[("o_proj",)].target  # the attention output, through P @ V, into v_proj
    assert value.name.endswith("v_proj.weight")
    heads, kv_heads, head_dim = 4, 2, 16  # the tiny model's grouped-query attention
    assert value.channel_map == tuple(h // (heads // kv_heads) * head_dim + d for h in range(heads)
                                      for d in range(head_dim))


def test_scales_through_attention_are_shared_by_query_heads(tiny_ir):
    group = next(g for g in find_smoothing_groups(tiny_ir.mod["prefill"]) if g.target and g.target.channel_map)
    s = np.random.default_rng(1).uniform(0.5, 2.0, group.width).astype(np.float32)
    with pytest.raises(ValueError, match="admissible"):
        fold_scales(dict(tiny_ir.params), group, s)
    tied = group.admissible(s)
    index = np.asarray(group.target.channel_map)
    for channel in np.unique(index):
        shared = s[index == channel]
        np.testing.assert_allclose(tied[index == channel], np.exp(np.log(shared).mean()), rtol=1e-5)


def _logits(prepared, params, ids):
    """Prefill logits of ``ids`` and, after them, the decode logits of one more token (through the cache)."""
    from lowbit.compiler import get_recipe

    model = dataclasses.replace(prepared, ir=dataclasses.replace(prepared.ir, params=params))
    session = model.build(get_recipe("fp32")).session()
    prefill = session.prefill(ids)
    return np.concatenate([prefill, session.decode(ids[0])[None]])


def test_folding_random_scales_keeps_the_model_function(tiny, tiny_ir):
    rng = np.random.default_rng(0)
    params = dict(tiny_ir.params)
    folded = 0
    for group in find_smoothing_groups(tiny_ir.mod["prefill"]):
        if group.target is not None:
            params |= fold_scales(params, group, group.admissible(rng.uniform(0.25, 4.0, group.width).astype(np.float32)))
            folded += 1
    assert folded == 4 * 2  # q/k/v, o (into v), gate/up and down in both layers
    ids = list(range(100, 140))
    want = _logits(tiny, dict(tiny_ir.params), ids)
    got = _logits(tiny, params, ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    changed = [n for n in params if not np.array_equal(params[n], tiny_ir.params[n])]
    assert changed and all(n.endswith(("layernorm.weight", "proj.weight")) for n in changed)


def _outlier_activations(rng, tokens=512, width=128, outliers=(3, 40, 77)):
    x = rng.standard_normal((tokens, width)).astype(np.float32)
    x[:, list(outliers)] *= 30.0  # a few channels carry most of the magnitude, as in real LLMs
    return x


def test_smoothquant_lowers_the_w8a8_error_on_outlier_channels():
    rng = np.random.default_rng(1)
    x = _outlier_activations(rng)
    weights = [rng.standard_normal((64, 128)).astype(np.float32) * 0.05]
    absmax = np.abs(x).max(axis=0)
    for granularity in ("token", "tensor"):
        naive = w8a8_error(x, weights, np.ones(128, np.float32), granularity, absmax)
        smooth = w8a8_error(x, weights, smoothing_scales(absmax, weights, 0.5), granularity, absmax)
        assert smooth < 0.5 * naive, (granularity, smooth, naive)


def test_awq_scaling_lowers_the_int4_output_error():
    rng = np.random.default_rng(2)
    x = _outlier_activations(rng)
    stats = LinearStatistics.empty(128)
    stats.add(x)
    hessian = torch.from_numpy(stats.hessian())
    weights = [rng.standard_normal((64, 128)).astype(np.float32) * 0.05]
    grid = WeightGrid(4, 32, True)
    plain = output_error(weights, hessian, np.ones(128, np.float32), grid)
    s = (stats.abssum / stats.tokens) ** 0.5
    scaled = output_error(weights, hessian, (s / np.sqrt(s.max() * s.min())).astype(np.float32), grid)
    assert scaled < 0.8 * plain, (scaled, plain)


def test_awq_clipping_never_raises_a_groups_error():
    from lowbit.passes.awq import clip_search

    rng = np.random.default_rng(3)
    x = _outlier_activations(rng)
    hessian = x.T.astype(np.float64) @ x / len(x)
    weight = rng.standard_t(3, (64, 128)).astype(np.float32)  # heavy tails: clipping pays off
    for grid in (WeightGrid(4, 32, True), WeightGrid(4, 32, False), WeightGrid(3, None, True)):
        clamped, ratio = clip_search(weight, hessian, grid)
        errors = []
        for w in (weight, clamped):
            delta = grid.simulate(w) - weight
            errors.append(float(np.einsum("ij,jk,ik->", delta, hessian, delta)))
        assert errors[1] <= errors[0] * (1 + 1e-6) and ratio < 1.0, (grid, errors, ratio)
