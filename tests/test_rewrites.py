"""Graph rewrites checked structurally, as TVM's own pass tests do: a small Relax function before, the
function expected after, ``tvm.ir.assert_structural_equal``. The numeric end-to-end tests of the same
passes are in test_smoothing.py, test_gptq.py and test_end_to_end.py."""

import numpy as np
import tvm
from tvm import relax, tirx

from lowbit.codegen.formats import LinearFormat
from lowbit.codegen.kernels import kernel_name, linear_kernel
from lowbit.passes.bounded_gather import bounded_gather
from lowbit.passes.instrument import instrument_linear_inputs
from lowbit.passes.quantize_linears import QuantizeLinears
from lowbit.passes.recipe import Recipe, WeightQuant
from lowbit.passes.scale_folding import find_smoothing_groups
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
    ws = relax.Var("layer.weight.scales", relax.TensorType(scales.shape, "float32"))
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
