"""GPTQ numerics and the calibration mechanism."""

import numpy as np
import pytest
import torch

from lowbit.compiler import LowbitError
from lowbit.compiler.calibration import Calibrator, calibration_samples
from lowbit.passes.gptq import quantize_gptq
from lowbit.passes.schemes import WeightGrid


def _correlated_inputs(rng, tokens=4096, width=256, rank=32):
    mixing = rng.standard_normal((rank, width)).astype(np.float32)
    return rng.standard_normal((tokens, rank)).astype(np.float32) @ mixing + 0.1 * rng.standard_normal(
        (tokens, width)).astype(np.float32)


@pytest.mark.parametrize("bits,group,symmetric,act_order", [
    (4, 64, True, False), (4, 64, True, True), (4, None, False, False), (3, 64, True, False),
])
def test_gptq_output_error_well_below_rtn(bits, group, symmetric, act_order):
    rng = np.random.default_rng(bits * 10 + int(act_order))
    x = _correlated_inputs(rng)
    weight = rng.standard_normal((96, x.shape[1])).astype(np.float32)
    hessian = x.T.astype(np.float64) @ x / len(x)
    grid = WeightGrid(bits, group, symmetric)
    result = quantize_gptq(weight, hessian, grid, act_order=act_order)
    q = result.weight
    assert q.codes.max() <= 2**bits - 1 and np.isfinite(q.scales).all()
    reference = x @ weight.T
    gptq_err = np.mean((x @ q.dequantize().T - reference) ** 2)
    rtn_err = np.mean((x @ grid.simulate(weight).T - reference) ** 2)
    assert gptq_err < 0.5 * rtn_err, (gptq_err, rtn_err)


def test_gptq_raises_dampening_on_singular_hessian_and_never_returns_nan():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 64)).astype(np.float32)
    x = rng.standard_normal((8, 64))  # rank 8 < 64
    hessian = -(x.T @ x)  # negative semidefinite: no dampening in range can fix it
    with pytest.raises(LowbitError, match="not positive definite"):
        quantize_gptq(weight, hessian, WeightGrid(4, 32, True), damp=0.01, name="layer.x")
    hessian = x.T @ x - 1e-3 * np.eye(64)  # slightly indefinite: a larger dampening fixes it
    result = quantize_gptq(weight, hessian, WeightGrid(4, 32, True), damp=1e-4)
    assert result.damp > 1e-4 and np.isfinite(result.weight.dequantize()).all()


def test_calibration_samples_validate_length():
    assert calibration_samples(list(range(10)), 3, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(LowbitError, match="shorter than one sample of 16"):
        calibration_samples(list(range(10)), 3, 16)


def test_statistics_from_compiled_graph_match_torch(tiny_model_dir):
    """X^T X of q_proj's input from the instrumented Relax graph equals torch's activations."""
    from lowbit.compiler import prepare

    prepared = prepare(str(tiny_model_dir), max_context=128)
    ir, model = prepared.ir, prepared.source.model
    samples = [list(range(100, 140)), list(range(500, 540))]
    stats = Calibrator(ir, samples).collect()
    assert set(stats) == {n for n in ir.params if n.endswith("proj.weight")} | {"lm_head.weight"}
    captured = []
    hook = model.model.layers[1].self_attn.q_proj.register_forward_hook(
        lambda _m, inputs, _o: captured.append(inputs[0][0].detach().numpy()))
    with torch.no_grad():
        for sample in samples:
            model(torch.tensor([sample]))
    hook.remove()
    rows = np.concatenate(captured)
    got = stats["model.layers.1.self_attn.q_proj.weight"]
    assert got is stats["model.layers.1.self_attn.k_proj.weight"]  # q/k/v share their input
    assert got.tokens == 80
    np.testing.assert_allclose(got.xtx, rows.T.astype(np.float64) @ rows, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got.absmax, np.abs(rows).max(0), rtol=1e-5)


@pytest.mark.parametrize("recipe", ["w4a16-gptq-g32", "w4a16-awq-gptq-g32", "w4a16-gptq-g32:stages=2"])
def test_gptq_compile_end_to_end_on_small_model(tiny_model_dir, tmp_path, recipe):
    from lowbit.compiler import compile as lowbit_compile
    from lowbit.compiler import load

    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog near the river bank. " * 40, encoding="utf-8")
    result = lowbit_compile(str(tiny_model_dir), recipe, "host", tmp_path / "art",
                            progress=False, calib=str(text), calib_samples=4, calib_seq_len=64)
    assert all("gptq act-order" in note for note in result.layers.values())
    if recipe.startswith("w4a16-awq"):  # AWQ scaled the foldable groups first
        assert any("awq ratio" in note for note in result.layers.values())
    session = load(result.output)
    logits = session.prefill(session.encode("The quick brown fox"))
    assert np.isfinite(logits).all()

    short = tmp_path / "short.txt"
    short.write_text("Too short.", encoding="utf-8")
    with pytest.raises(LowbitError, match="shorter than one sample of 64"):
        lowbit_compile(str(tiny_model_dir), "w4a16-gptq-g32", "host", tmp_path / "art2",
                       progress=False, calib=str(short), calib_seq_len=64)
    assert not (tmp_path / "art2").exists()


def test_staged_gptq_calibrates_later_layers_on_quantized_earlier_ones(tiny_model_dir):
    """With ``stages=2`` the second half of the layers (graph order) is calibrated again, with the
    first half replaced by the weights their codes stand for, and quantized from those statistics;
    the caller's statistics are not changed."""
    from lowbit.compiler import get_recipe, prepare
    from lowbit.compiler.calibration import Calibration
    from lowbit.compiler.pipeline import run_pipeline
    from lowbit.passes.linear_match import find_linears
    from lowbit.targets import get_target

    ir = prepare(str(tiny_model_dir), max_context=128).ir
    calibrator = Calibrator(ir, [list(range(start, start + 48)) for start in (100, 700, 1300, 1900)])
    float_stats = calibrator.collect()
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(calibrator.collect(dict(ir.params), [name])[name].xtx, float_stats[name].xtx)

    calls = []

    def recalibrate(params, layers):
        collected = calibrator.collect(params, layers)
        calls.append((dict(params), list(layers), collected))
        return collected

    stats = dict(float_stats)
    xtx_before = stats[name].xtx.copy()
    run_pipeline(ir, get_recipe("w4a16-gptq-g32:stages=2"), get_target("host"), Calibration(stats, recalibrate))
    linears = list(find_linears(ir.mod["prefill"]))
    assert len(calls) == 1
    params, later, collected = calls[0]
    assert 0 < len(later) < len(linears) and later == linears[-len(later):] and name in later
    earlier = linears[0]
    assert not np.array_equal(params[earlier], ir.params[earlier])  # dequantized int4
    np.testing.assert_allclose(params[earlier], ir.params[earlier], atol=np.abs(ir.params[earlier]).max() / 7)
    np.testing.assert_array_equal(params[later[0]], ir.params[later[0]])  # still float
    assert all(stats[n] is float_stats[n] for n in float_stats) and np.array_equal(stats[name].xtx, xtx_before)
    assert collected[name].tokens == float_stats[name].tokens
    relative = np.abs(collected[name].xtx - float_stats[name].xtx).max() / np.abs(float_stats[name].xtx).max()
    assert 1e-4 < relative < 0.5, relative  # the quantized first half changed the later inputs, a little


def test_output_probe_matches_torch_with_one_layer_replaced(tiny_model_dir):
    """The probe's KL with one weight replaced equals torch's on the same tokens, and the session
    gets its float weight back afterwards."""
    from lowbit.compiler import get_recipe, prepare
    from lowbit.compiler.output_probe import OutputProbe

    prepared = prepare(str(tiny_model_dir), max_context=128)
    model = prepared.source.model
    ids = list(range(300, 360))
    probe = OutputProbe(prepared.build(get_recipe("fp32")).session(), ids)
    name = "model.layers.0.mlp.down_proj.weight"
    weight = model.get_parameter(name).detach().numpy().copy()
    quantized = WeightGrid(4, 32, True).simulate(weight)
    got = probe.kl(name, quantized)
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        model.get_parameter(name).copy_(torch.from_numpy(quantized))
        changed = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    want = float((reference.exp() * (reference - changed)).sum(-1).mean())
    assert want > 0 and abs(got - want) <= 0.02 * want, (got, want)
    assert probe.kl(name, weight) < 1e-3 * want


def _statistics(samples):
    from lowbit.passes.statistics import LinearStatistics

    stats = LinearStatistics.empty(samples[0].shape[1], len(samples))
    for rows in samples:
        stats.add(rows)
    return stats


def test_validated_gptq_keeps_gptq_where_it_generalizes():
    from lowbit.passes.gptq import quantize_gptq_validated

    rng = np.random.default_rng(0)
    mix = rng.standard_normal((64, 64)) * 0.3 + np.eye(64)
    samples = [(rng.standard_normal((256, 64)) @ mix).astype(np.float32) for _ in range(4)]
    weight = rng.standard_normal((32, 64)).astype(np.float32)
    _, note = quantize_gptq_validated(weight, _statistics(samples), WeightGrid(4, 32, True))
    assert note.startswith("gptq") and "held-out error" in note


def test_validated_gptq_falls_back_to_rtn_when_calibration_misleads():
    """Channels that merely echo others, faintly, in the fitting half but carry their own signal in the
    held-out half: GPTQ fitted on the first half loads them with error."""
    from lowbit.passes.gptq import quantize_gptq_validated

    rng = np.random.default_rng(1)
    samples = []
    for index in range(4):
        rows = rng.standard_normal((256, 64)).astype(np.float32)
        if index % 2 == 0:  # the samples GPTQ is fitted on
            rows[:, 32:] = rows[:, :32] * 1e-2 + rows[:, 32:] * 1e-4
        samples.append(rows)
    weight = rng.standard_normal((32, 64)).astype(np.float32)
    grid = WeightGrid(4, 32, True)
    quantized, note = quantize_gptq_validated(weight, _statistics(samples), grid)
    assert note.startswith("rtn")
    np.testing.assert_array_equal(quantized.codes, grid.quantize(weight).codes)
