"""Graph rewrites checked structurally, as TVM's own pass tests do: a small Relax function before, the
function expected after, ``tvm.ir.assert_structural_equal``. The numeric end-to-end tests of the same
passes are in test_smoothing.py, test_gptq.py and test_end_to_end.py."""

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from lowbit.codegen.formats import LinearFormat
from lowbit.codegen.kernels import kernel_name, linear_kernel
from lowbit.compiler import CalibrationText, get_recipe, prepare
from lowbit.passes.bounded_gather import bounded_gather
from lowbit.passes.instrument import instrument_linear_inputs
from lowbit.passes.quantize_linears import QuantizeLinears
from lowbit.passes.recipe import Recipe, WeightQuant
from lowbit.passes.scale_folding import find_smoothing_groups
from lowbit.passes.schemes import linear_scheme
from lowbit.targets import get_target

K, N = 64, 40  # N is not a multiple of any column tile: the rewrite pads and slices


def _entry(build_body, *params, num_input=1):
    """An entry function (``num_input`` attribute, weights as trailing parameters) from a body builder."""
    builder = relax.BlockBuilder()
    with builder.function("prefill", list(params), attrs={"num_input": num_input}, pure=True):
        builder.emit_func_output(build_body(builder, *params))
    return builder.get()


def _linear_module():
    seq = tirx.Var("seq", "int64")
    x = relax.Var("x", relax.TensorType([1, seq, K], "float32"))
    w = relax.Var("layer.weight", relax.TensorType([N, K], "float32"))
    return _entry(lambda b, x, w: b.emit(relax.op.matmul(x, b.emit(relax.op.permute_dims(w, [1, 0])))), x, w), seq


def test_quantize_linears_calls_the_schemes_kernel_on_packed_weights():
    mod, _ = _linear_module()
    chip = get_target("host")
    params = {"layer.weight": np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)}
    quantize = QuantizeLinears(Recipe("w4", WeightQuant(4, 32)), params, chip)
    after = quantize(mod)

    fmt = LinearFormat("int4", 32)
    layout = chip.linear_layout(fmt)
    padded = layout.padded(N)
    qweight, scales = (quantize.params[f"layer.weight.{s}"] for s in ("qweight", "scales"))
    assert qweight.shape == (padded // layout.tile, K // 8, layout.tile) and qweight.dtype == np.uint32
    assert "layer.weight" in params and "layer.weight.qweight" not in params  # the caller's dict is unchanged

    seq = tirx.Var("seq", "int64")
    x = relax.Var("x", relax.TensorType([1, seq, K], "float32"))
    w = relax.Var("layer.weight", relax.TensorType([N, K], "float32"))
    wq = relax.Var("layer.weight.qweight", relax.TensorType(qweight.shape, "uint32"))
    ws = relax.Var("layer.weight.scales", relax.TensorType(scales.shape, str(scales.dtype)))
    m = tirx.Var("m", "int64")
    name = kernel_name(fmt, layout, m, padded, K)
    kernel = linear_kernel(fmt, layout, m, padded, K).with_attrs({"op_pattern": 8, "global_symbol": name})
    builder = relax.BlockBuilder()
    with builder.function("prefill", [x, w, wq, ws], attrs={"num_input": 1}, pure=True):
        builder.emit(relax.op.permute_dims(w, [1, 0]))  # now dead: Finalize's DCE removes it
        x2 = builder.emit(relax.op.reshape(x, relax.ShapeExpr([seq, K])))
        gv = builder.add_func(kernel, name)
        y = builder.emit(relax.call_tir(gv, [x2, wq, ws], relax.TensorType([seq, padded], "float32")))
        y = builder.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[N]))
        builder.emit_func_output(builder.emit(relax.op.reshape(y, relax.ShapeExpr([1, seq, N]))))
    tvm.ir.assert_structural_equal(after, builder.get(), map_free_vars=True)
    assert quantize.report["layer.weight"].startswith(f"int4_g32_{layout.tag}: 4-bit group 32")


def test_bounded_gather_clips_every_take():
    seq = tirx.Var("seq", "int64")
    ids = relax.Var("ids", relax.TensorType([1, seq], "int64"))
    table = relax.Var("embed.weight", relax.TensorType([100, 8], "float32"))

    def gather(mode):
        return _entry(lambda b, i, t: b.emit(relax.op.take(t, i, axis=0, mode=mode)), ids, table)

    tvm.ir.assert_structural_equal(bounded_gather(gather("fast")), gather("clip"), map_free_vars=True)


def test_instrumented_function_returns_each_linear_input_once():
    mod, _ = _linear_module()
    calibrate, sites = instrument_linear_inputs(mod["prefill"])
    assert [(s.weights, s.width) for s in sites] == [(["layer.weight"], K)]

    seq = tirx.Var("seq", "int64")
    x = relax.Var("x", relax.TensorType([1, seq, K], "float32"))
    w = relax.Var("layer.weight", relax.TensorType([N, K], "float32"))
    builder = relax.BlockBuilder()
    with builder.function("calibrate", [x, w], attrs={"num_input": 1}, pure=True):
        transposed = builder.emit(relax.op.permute_dims(w, [1, 0]))
        builder.emit(relax.op.matmul(x, transposed))
        rows = builder.emit(relax.op.reshape(x, relax.ShapeExpr([-1, K])))
        builder.emit_func_output(relax.Tuple([rows]))
    tvm.ir.assert_structural_equal(calibrate, builder.get()["calibrate"], map_free_vars=True)


def _norm_then_linears(shared_gamma: bool):
    """``h * gamma`` read by two linears (q/k-like), and a second norm that may share ``gamma``."""
    seq = tirx.Var("seq", "int64")
    h = relax.Var("h", relax.TensorType([1, seq, K], "float32"))
    gamma = relax.Var("norm.weight", relax.TensorType([K], "float32"))
    other = relax.Var("other_norm.weight", relax.TensorType([K], "float32"))
    wq = relax.Var("q.weight", relax.TensorType([N, K], "float32"))
    wk = relax.Var("k.weight", relax.TensorType([N, K], "float32"))

    def body(b, h, gamma, other, wq, wk):
        x = b.emit(relax.op.multiply(h, gamma))
        q = b.emit(relax.op.matmul(x, b.emit(relax.op.permute_dims(wq, [1, 0]))))
        k = b.emit(relax.op.matmul(x, b.emit(relax.op.permute_dims(wk, [1, 0]))))
        second = b.emit(relax.op.multiply(h, gamma if shared_gamma else other))
        return b.emit(relax.Tuple([q, k, second]))

    return _entry(body, h, gamma, other, wq, wk)["prefill"]


def test_smoothing_groups_fold_into_a_norm_weight_only_when_it_has_one_reader():
    (group,) = find_smoothing_groups(_norm_then_linears(shared_gamma=False))
    assert [u.name for u in group.linears] == ["q.weight", "k.weight"] and group.width == K
    assert (group.target.kind, group.target.name) == ("norm", "norm.weight")
    (shared,) = find_smoothing_groups(_norm_then_linears(shared_gamma=True))
    assert shared.target is None  # scaling gamma would change the second norm too


def _siblings_module(widths):
    """``x`` read by one linear per width in ``widths`` (the q/k/v shape of a block), outputs summed
    pairwise into a tuple so that every linear stays live."""
    seq = tirx.Var("seq", "int64")
    x = relax.Var("x", relax.TensorType([1, seq, K], "float32"))
    weights = [relax.Var(f"block.{name}.weight", relax.TensorType([n, K], "float32"))
               for name, n in zip("qkv", widths)]

    def body(b, x, *ws):
        return b.emit(relax.Tuple([b.emit(relax.op.matmul(x, b.emit(relax.op.permute_dims(w, [1, 0])))) for w in ws]))
    return _entry(body, x, *weights)


def _kernel_calls(mod, entry: str = "prefill") -> list:
    calls = []
    call_tir = tvm.ir.Op.get("relax.call_tir")
    relax.analysis.post_order_visit(mod[entry].body, lambda e: calls.append(e) if isinstance(e, relax.Call)
                                    and e.op.same_as(call_tir) else None)
    return calls


def test_linears_reading_one_input_run_as_one_kernel():
    chip = get_target("host")
    tile = chip.linear_layout(LinearFormat("int4", 32)).tile
    widths = (2 * tile, tile, tile)
    rng = np.random.default_rng(0)
    params = {f"block.{name}.weight": rng.standard_normal((n, K)).astype(np.float32) for name, n in zip("qkv", widths)}
    quantize = QuantizeLinears(Recipe("w4", WeightQuant(4, 32)), params, chip)
    after = quantize(_siblings_module(widths))
    calls = _kernel_calls(after)
    assert len(calls) == 1
    stacked = "block.q+k+v.weight"
    assert [v.name for v in calls[0].args[1].fields[1:]] == [f"{stacked}.qweight", f"{stacked}.scales"]
    for suffix in ("qweight", "scales"):  # members' tiles, one after another
        np.testing.assert_array_equal(quantize.params[f"{stacked}.{suffix}"], np.concatenate(
            [quantize.params[f"block.{name}.weight.{suffix}"] for name in "qkv"]))
    assert quantize.report["block.k.weight"].endswith(f"channels {2 * tile}-{3 * tile} of {stacked}")
    slices = [b.value for b in after["prefill"].body.blocks[0].bindings
              if isinstance(b.value, relax.Call) and b.value.op.name == "relax.strided_slice"]
    assert [(int(s.args[2][0].value), int(s.args[3][0].value)) for s in slices] == [(0, 2 * tile), (2 * tile, 3 * tile),
                                                                             (3 * tile, 4 * tile)]


def test_siblings_that_do_not_pack_alike_stay_apart():
    chip = get_target("host")
    tile = chip.linear_layout(LinearFormat("int4", 32)).tile
    widths = (tile, tile + 8)  # the second is padded to whole tiles: it cannot sit inside a stack
    rng = np.random.default_rng(0)
    params = {f"block.{name}.weight": rng.standard_normal((n, K)).astype(np.float32) for name, n in zip("qk", widths)}
    assert len(_kernel_calls(QuantizeLinears(Recipe("w4", WeightQuant(4, 32)), params, chip)(
        _siblings_module(widths)))) == 2
    params["block.k.weight"] = params["block.k.weight"][:tile]
    assert len(_kernel_calls(QuantizeLinears(Recipe("w4", WeightQuant(4, 32)), params, chip, kept=["block.k.weight"])(
        _siblings_module((tile, tile))))) == 2  # int8 beside int4: two formats
    assert len(_kernel_calls(QuantizeLinears(Recipe("w4", WeightQuant(4, 32)), params, chip, merge_siblings=False)(
        _siblings_module((tile, tile))))) == 2


@pytest.mark.parametrize("recipe", ["w4a16-rtn-g32", "w8a8-smoothquant-static"])  # fp32: test_end_to_end
def test_stacked_siblings_compute_what_the_layers_compute(tiny_model_dir, recipe):
    """A real (tiny, random) Llama built with and without stacking: fewer kernels, the same logits."""
    calibration = CalibrationText("calib", "The quick brown fox jumps over the lazy dog. " * 40, 4, 32)
    prepared = prepare(str(tiny_model_dir), max_context=64, calibration=calibration)
    stacked, apart = (prepared.build(get_recipe(recipe), merge_siblings=merge) for merge in (True, False))
    calls = [len(_kernel_calls(model.result.ir.mod, "decode")) for model in (stacked, apart)]
    layers = stacked.result.ir.kv.num_layers
    parsed = get_recipe(recipe)
    tile = get_target("host").linear_layout(linear_scheme(parsed.weights, parsed.activations).format(64)).tile
    kv_width, up_width = 32, 128  # the tiny Llama's k/v and gate/up widths; members stack in whole tiles
    merged = (2 if kv_width % tile == 0 else 0) + (1 if up_width % tile == 0 else 0)  # q/k/v: 3 -> 1, gate/up: 2 -> 1
    assert merged > 0 and calls[0] == calls[1] - merged * layers
    ids = [5, 900, 17, 4242, 31, 77, 1234, 8]
    sessions = [model.session() for model in (stacked, apart)]
    logits = [session.prefill(ids[:-2]) for session in sessions]
    np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-5 * np.abs(logits[1]).max())
    for token in ids[-2:]:
        steps = [session.decode(token) for session in sessions]
        np.testing.assert_allclose(steps[0], steps[1], rtol=0, atol=1e-5 * np.abs(steps[1]).max())


EXPERTS, CHOSEN = 4, 3  # a mixture's expert table: EXPERTS matrices of [N, K]; CHOSEN gathered per call


@pytest.mark.parametrize("rows_first", [True, False], ids=["W_e@x", "x@W_e"])
@pytest.mark.parametrize("bits, group", [(8, None), (4, 32)])
def test_gathered_experts_are_stored_packed_and_multiply_by_their_rounded_weights(rows_first, bits, group):
    """A 3-D weight gathered per token and read by batched matmuls (a mixture of experts, stored
    ``[E, N, K]`` or ``[E, K, N]``) is packed as one stacked weight, and each chosen expert's
    product is the one with its round-to-nearest weight (float rounding only: rtol 1e-5)."""
    from lowbit.passes.schemes import linear_scheme
    from lowbit.targets import build

    chip = get_target("host")
    rng = np.random.default_rng(4)
    table = rng.standard_normal((EXPERTS, N, K) if rows_first else (EXPERTS, K, N)).astype(np.float32)
    ids = relax.Var("ids", relax.TensorType([CHOSEN], "int64"))
    x = relax.Var("x", relax.TensorType([CHOSEN, K, 1] if rows_first else [CHOSEN, 1, K], "float32"))
    w = relax.Var("experts.weight", relax.TensorType(table.shape, "float32"))

    def body(b, ids, x, w):
        chosen = b.emit(relax.op.take(w, ids, axis=0))
        return b.emit(relax.op.matmul(chosen, x) if rows_first else relax.op.matmul(x, chosen))

    weights = WeightQuant(bits, group)
    quantize = QuantizeLinears(Recipe("w", weights), {"experts.weight": table}, chip)
    after = quantize(_entry(body, ids, x, w, num_input=2))
    assert quantize.report["experts.weight"].startswith("int8" if bits == 8 else "int4_g32")
    assert f"{EXPERTS} experts of [{N}, {K}] gathered per token" in quantize.report["experts.weight"]

    stacked = table if rows_first else table.transpose(0, 2, 1)  # [E, N, K]
    rounded = linear_scheme(weights).weight_grid.quantize(stacked.reshape(-1, K)).dequantize().reshape(stacked.shape)
    chosen = np.array([2, 0, 2])
    inputs = rng.standard_normal([int(d) for d in x.ty.shape]).astype(np.float32)
    want = np.stack([rounded[e] @ inputs[i] if rows_first else inputs[i] @ rounded[e].T
                     for i, e in enumerate(chosen)])
    params = after["prefill"].params[2:]
    vm = relax.VirtualMachine(build(after, chip), tvm.cpu())
    got = vm["prefill"](tvm.runtime.tensor(chosen), tvm.runtime.tensor(inputs),
                        *[tvm.runtime.tensor(quantize.params[p.name]) for p in params]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _head_module(vocab=N):
    """A prompt function's tail: a position-wise op, a mean over positions (mixes them), a residual
    add, RMSNorm, the head (quantized by QuantizeLinears), soft-capping; the pre-norm state is
    returned too (read elsewhere, as a cache would be)."""
    seq = tirx.Var("seq", "int64")
    x = relax.Var("x", relax.TensorType([1, seq, K], "float32"))
    gamma = relax.Var("norm.weight", relax.TensorType([K], "float32"))
    w = relax.Var("head.weight", relax.TensorType([vocab, K], "float32"))

    def body(b, x, gamma, w):
        h = b.emit(relax.op.multiply(x, relax.const(2.0, "float32")))
        mixed = b.emit(relax.op.add(h, b.emit(relax.op.mean(h, axis=[1], keepdims=True))))
        normed = b.emit(relax.op.nn.rms_norm(mixed, gamma, axes=[-1]))
        logits = b.emit(relax.op.matmul(normed, b.emit(relax.op.permute_dims(w, [1, 0]))))
        capped = b.emit(relax.op.multiply(relax.op.tanh(relax.op.divide(logits, relax.const(30.0, "float32"))),
                                          relax.const(30.0, "float32")))
        return b.emit(relax.Tuple([capped, h]))
    return _entry(body, x, gamma, w, num_input=1)


def test_last_position_entry_runs_the_tail_on_the_last_row():
    """prefill_last = prefill's last row, with the norm and the quantized head on one row (their
    shapes bound to 1) while the mean over positions still reads every position."""
    from lowbit.passes.last_position import add_last_position_entry
    from lowbit.passes.model_ir import sync_params

    chip = get_target("host")
    rng = np.random.default_rng(0)
    params = {"norm.weight": rng.standard_normal(K).astype(np.float32) + 1,
              "head.weight": rng.standard_normal((N, K)).astype(np.float32)}
    quantize = QuantizeLinears(Recipe("w4", WeightQuant(4, 32)), params, chip)
    mod, chained = add_last_position_entry(quantize(_head_module()))
    assert chained >= 6  # the residual add, the norm, the head's reshapes, kernel call and slice, capping
    head_calls = [c for c in _kernel_calls(mod, "prefill_last") if len(c.ty.shape) == 2]
    assert head_calls and all(isinstance(c.ty.shape[0], tirx.IntImm) and int(c.ty.shape[0]) == 1
                              for c in head_calls)
    mod, params = sync_params(relax.transform.DeadCodeElimination(["prefill", "prefill_last"])(mod), quantize.params)
    vm = relax.VirtualMachine(tvm.compile(mod, target=chip.tvm()), tvm.cpu())
    x = rng.standard_normal((1, 7, K)).astype(np.float32)
    weights = [tvm.runtime.tensor(array) for array in params.values()]
    full = vm["prefill"](tvm.runtime.tensor(x), *weights)
    last = vm["prefill_last"](tvm.runtime.tensor(x), *weights)
    assert last[0].numpy().shape == (1, 1, N)
    np.testing.assert_allclose(last[0].numpy()[0, 0], full[0].numpy()[0, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(last[1].numpy(), full[1].numpy())  # the other output whole


def test_feed_returns_the_last_rows_logits_of_prefill(tiny_model_dir):
    """Session.feed runs prefill_last: the logits of prefill's last row, for a prompt in chunks."""
    built = prepare(str(tiny_model_dir), max_context=128).build(get_recipe("w4a16-rtn-g32"))
    ids = list(np.random.default_rng(1).integers(0, 49152, 80))  # more than one feed chunk
    session = built.session()
    full = session.prefill(ids)
    session.reset()
    last = session.feed(ids)
    np.testing.assert_allclose(last, full[-1], rtol=0, atol=1e-4 * np.abs(full[-1]).max())
    assert session.position == len(ids)
