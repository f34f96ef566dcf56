"""Each linear kernel format, GEMV and GEMM, built for the host and checked against numpy."""

import numpy as np
import pytest
import tvm
from tvm import te, tirx

from lowbit.codegen.errors import LowbitError
from lowbit.codegen.host_cpu import cpu_flags, request_tile_state
from lowbit.codegen.formats import LinearFormat
from lowbit.codegen.kernels import W8A8_ZERO, linear_kernel
from lowbit.codegen.packing import unpack_byte_quads
from lowbit.compiler.runtime.session import _request_cpu_state
from lowbit.passes.quantize_linears import pack_linear
from lowbit.passes.recipe import ActQuant, Recipe, WeightQuant
from lowbit.passes.schemes import linear_scheme
from lowbit.passes.statistics import LinearStatistics
from lowbit.targets import get_target, schedule
from lowbit.targets.x86_amx import AmxW8A8Gemm

CHIP = get_target("host")
RECIPES = {
    "f32": Recipe("fp32"),
    "int8": Recipe("w8", WeightQuant(8)),
    "int4_g32": Recipe("w4g32", WeightQuant(4, 32)),
    "int4_g128_asym": Recipe("w4g128a", WeightQuant(4, 128, symmetric=False)),
    "int4_channel": Recipe("w4c", WeightQuant(4, None)),
    "int3_g32": Recipe("w3g32", WeightQuant(3, 32)),  # 3-bit codes run in the int4 kernels
    "int3_g32_asym": Recipe("w3g32a", WeightQuant(3, 32, symmetric=False)),
}


def _reference_weight(recipe, weight):
    return weight if recipe.weights is None else linear_scheme(recipe.weights).weight_grid.simulate(weight)


def _run_kernel(packed, m_rows, x):
    m = 1 if m_rows == 1 else tirx.Var("m", "int64")
    n_padded = packed.layout.padded(packed.n)
    func = linear_kernel(packed.fmt, packed.layout, m, n_padded, packed.k).with_attr("global_symbol", "kernel")
    lib = tvm.compile(schedule(func, CHIP).mod, target=CHIP.tvm()).jit()
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in [x, *packed.tensors.values()]]
    out = tvm.runtime.tensor(np.zeros((m_rows, n_padded), np.float32), dev)
    lib["kernel"](*args, out)
    return out.numpy()[:, : packed.n]


@pytest.mark.parametrize("fmt", sorted(RECIPES))
@pytest.mark.parametrize("m_rows", [1, 7, 19])  # GEMV; GEMM with a row tail; whole row blocks and a tail
@pytest.mark.parametrize("n,k", [(48, 64), (40, 200)])  # second: N not a multiple of the tile, partial group
def test_linear_kernel_matches_numpy(fmt, m_rows, n, k):
    rng = np.random.default_rng(n * k + m_rows)
    weight = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m_rows, k)).astype(np.float32)
    recipe = RECIPES[fmt]
    packed = pack_linear(weight, recipe, "layer", CHIP)
    expected_kind = "f32" if recipe.weights is None else "int8" if recipe.weights.bits == 8 else "int4"
    assert packed.fmt.kind == expected_kind
    got = _run_kernel(packed, m_rows, x)
    want = x.astype(np.float64) @ _reference_weight(recipe, weight).T.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_int4_weights_are_an_eighth_of_float():
    weight = np.random.default_rng(1).standard_normal((256, 512)).astype(np.float32)
    packed = pack_linear(weight, RECIPES["int4_g32"], "layer", CHIP)
    assert packed.tensors["qweight"].nbytes == weight.nbytes // 8
    assert isinstance(packed.fmt, LinearFormat) and packed.fmt.group_size == 32


W8A8_RECIPES = {
    "w8a8": Recipe("w8a8-token", WeightQuant(8), ActQuant(8, "token")),
    "w8a8_static": Recipe("w8a8-tensor", WeightQuant(8), ActQuant(8, "tensor")),
}


def _statistics(rows):
    stats = LinearStatistics.empty(rows.shape[1])
    stats.add(rows)
    return stats


def _w8a8_reference(packed, x):
    """The W8A8 kernels' arithmetic in numpy: int8 activation codes, exact int32 dot products."""
    w_codes = unpack_byte_quads(packed.tensors["qweight"])[: packed.k, : packed.n].astype(np.int32) - W8A8_ZERO
    w_scale = packed.tensors["scales"].reshape(-1)[: packed.n]
    if "act_scale" in packed.tensors:
        x_scale = np.full(x.shape[0], packed.tensors["act_scale"][0], np.float32)
    else:
        absmax = np.abs(x).max(axis=1)
        x_scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1)).astype(np.float32)
    x_codes = np.clip(np.rint(x / x_scale[:, None]), -127, 127).astype(np.int32)
    return (x_codes @ w_codes).astype(np.float32) * x_scale[:, None] * w_scale


@pytest.mark.parametrize("kind", sorted(W8A8_RECIPES))
@pytest.mark.parametrize("m_rows", [1, 7, 19])
@pytest.mark.parametrize("n,k", [(48, 64), (40, 200)])
def test_w8a8_kernel_matches_integer_reference(kind, m_rows, n, k):
    rng = np.random.default_rng(n * k + m_rows)
    weight = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m_rows, k)).astype(np.float32)
    x[0, 1] = 9.0  # an outlier: clipped by the static scale, widens its row's dynamic scale
    if m_rows > 1:
        x[-1] = 0.0  # an all-zero row takes the dynamic scale's guard
    calibration = rng.standard_normal((16, k)).astype(np.float32)  # max about 3: static codes clip
    packed = pack_linear(weight, W8A8_RECIPES[kind], "layer", CHIP, _statistics(calibration))
    assert packed.fmt.kind == kind
    got = _run_kernel(packed, m_rows, x)
    want = _w8a8_reference(packed, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


DOT_PATHS = {"x86-vnni": "vpdpbusd", "x86-avxvnni": "{vex}\tvpdpbusd", "x86-avx2": None,
             "arm-dotprod": None, "x86-amx": "vpdpbusd"}  # target -> its byte dot instruction (AMX: K % 64)


@pytest.mark.parametrize("target", sorted(DOT_PATHS))
@pytest.mark.parametrize("m_rows", [1, 6])  # GEMV; a GEMM with a partial row block
def test_w8a8_kernel_per_isa_path(target, m_rows):
    """Each x86/ARM target's W8A8 kernel, compiled whatever the CPU (VNNI's byte dot instruction
    checked in the assembly, AVX-VNNI's in its VEX encoding: AVX2 and plain NEON vectorize the
    definition), run where the CPU can."""
    chip = get_target(target)
    rng = np.random.default_rng(m_rows)
    n, k = 96, 130  # N not a multiple of the tile, K not of the byte quad
    packed = pack_linear(rng.standard_normal((n, k)).astype(np.float32), W8A8_RECIPES["w8a8"], "layer", chip)
    m = 1 if m_rows == 1 else tirx.Var("m", "int64")
    func = linear_kernel(packed.fmt, packed.layout, m, packed.layout.padded(n), k).with_attr("global_symbol", "kernel")
    executable = tvm.compile(schedule(func, chip).mod, target=chip.tvm())
    if DOT_PATHS[target]:
        assert DOT_PATHS[target] in executable.mod.inspect_source("asm")
    if not chip.runs_on_this_machine():
        pytest.skip(f"{target} code does not run on this CPU (needs {', '.join(chip.capabilities)})")
    x = rng.standard_normal((m_rows, k)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((m_rows, packed.layout.padded(n)), np.float32))
    executable.jit()["kernel"](*[tvm.runtime.tensor(a) for a in [x, *packed.tensors.values()]], out)
    want = _w8a8_reference(packed, x)
    np.testing.assert_allclose(out.numpy()[:, :n], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


AMX = get_target("x86-amx")
def _amx_case(kind: str, m_rows: int):
    """A W8A8 layer whose GEMM AMX takes (K a multiple of 64), its input and its kernel for ``x86-amx``."""
    rng = np.random.default_rng(m_rows)
    n, k = 96, 192  # N padded to two column tiles of 64; three 64-input steps
    weight = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m_rows, k)).astype(np.float32)
    x[0, 1] = 9.0
    calibration = rng.standard_normal((16, k)).astype(np.float32)
    packed = pack_linear(weight, W8A8_RECIPES[kind], "layer", AMX, _statistics(calibration))
    assert packed.layout.row_block == 32
    func = linear_kernel(packed.fmt, packed.layout, tirx.Var("m", "int64"), packed.layout.padded(n), k)
    return packed, x, func.with_attr("global_symbol", "kernel")


def _check_amx_run(executable, packed, x):
    out = tvm.runtime.tensor(np.zeros((x.shape[0], packed.layout.padded(packed.n)), np.float32))
    executable.jit()["kernel"](*[tvm.runtime.tensor(a) for a in [x, *packed.tensors.values()]], out)
    want = _w8a8_reference(packed, x)
    np.testing.assert_allclose(out.numpy()[:, : packed.n], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.skipif(CHIP.family != "x86", reason="the AMX model is called from x86-64 code")
@pytest.mark.parametrize("kind", sorted(W8A8_RECIPES))
@pytest.mark.parametrize("m_rows", [5, 40])  # one partial row block; a whole one and a partial one
def test_amx_w8a8_gemm_on_modelled_tiles_matches_integer_reference(modelled_tiles, kind, m_rows):
    """Also counts the tile products: one per 16 x 16 x 64 product of the padded GEMM, none redone."""
    packed, x, func = _amx_case(kind, m_rows)
    sch = AmxW8A8Gemm(modelled_tiles).apply(func, AMX.tvm(), False)
    assert sch is not None
    executable = tvm.compile(sch.mod, target=CHIP.tvm())
    before = modelled_tiles.products()
    _check_amx_run(executable, packed, x)
    row_tiles, channel_tiles, steps = -(-m_rows // 32) * 2, packed.layout.padded(packed.n) // 16, packed.k // 64
    assert modelled_tiles.products() - before == row_tiles * channel_tiles * steps


@pytest.mark.parametrize("m_rows", [5, 40])
def test_amx_w8a8_gemm_per_isa_path(m_rows):
    """The AMX GEMM as built for ``x86-amx`` (its tile instructions checked in the assembly), run
    where the CPU has AMX; the GEMV and inputs not a multiple of 64 stay on VNNI (DOT_PATHS)."""
    packed, x, func = _amx_case("w8a8", m_rows)
    executable = tvm.compile(schedule(func, AMX).mod, target=AMX.tvm())
    asm = executable.mod.inspect_source("asm")
    for instruction in ("ldtilecfg", "tileloadd", "tdpbsud", "tilestored", "tilerelease"):
        assert instruction in asm
    if not AMX.runs_on_this_machine():
        pytest.skip(f"x86-amx code does not run on this CPU (needs {', '.join(AMX.capabilities)})")
    request_tile_state()
    _check_amx_run(executable, packed, x)


def test_tile_state_is_granted_where_the_cpu_has_amx():
    """Linux grants the AMX tile state exactly where the CPU has AMX; elsewhere the request is
    refused with an OSError (which the runtime turns into a message naming the artifact)."""
    if {"amx_tile", "amx_int8"} <= cpu_flags():
        request_tile_state()
        _request_cpu_state("artifact a", AMX.as_dict())
    else:
        with pytest.raises(OSError):
            request_tile_state()
        with pytest.raises(LowbitError, match=r"^artifact a: its kernels use AMX tiles .*-t x86-vnni$"):
            _request_cpu_state("artifact a", AMX.as_dict())


@pytest.mark.parametrize("kind", sorted(W8A8_RECIPES))
@pytest.mark.parametrize("m_rows", [1, 7])
def test_w8a8_kernel_is_close_to_float_matmul(kind, m_rows):
    """Int8 codes on both sides: within 2% of the float product's norm on Gaussian data."""
    rng = np.random.default_rng(m_rows)
    weight = rng.standard_normal((64, 256)).astype(np.float32)
    x = rng.standard_normal((m_rows, 256)).astype(np.float32)
    packed = pack_linear(weight, W8A8_RECIPES[kind], "layer", CHIP, _statistics(x))
    got = _run_kernel(packed, m_rows, x)
    want = x.astype(np.float64) @ weight.T.astype(np.float64)
    assert np.linalg.norm(got - want) < 2e-2 * np.linalg.norm(want)


def test_static_w8a8_without_statistics_names_the_layer():
    weight = np.ones((16, 32), np.float32)
    with pytest.raises(LowbitError, match="layer blocks.0.q_proj"):
        pack_linear(weight, W8A8_RECIPES["w8a8_static"], "blocks.0.q_proj", CHIP)


def _legalized_matmul(a_shape, b_shape):
    """The PrimFunc TVM makes of ``relax.matmul`` on shapes that may hold symbolic lengths."""
    from tvm import relax

    a = relax.Var("a", relax.TensorType(a_shape, "float32"))
    b = relax.Var("b", relax.TensorType(b_shape, "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [a, b]):
        builder.emit_func_output(builder.emit(relax.op.matmul(a, b)))
    mod = relax.transform.LegalizeOps()(builder.get())
    return next(f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc))


@pytest.mark.parametrize("query,keys", [(7, 13), (1, 5), (33, 70)])
def test_attention_matmul_rule_matches_numpy(query, keys):
    """Q K^T and P V as attention legalizes them (symbolic lengths), scheduled by BatchMatmul."""
    from lowbit.targets.simd import BatchMatmul

    n, m = tirx.Var("n", "int64"), tirx.Var("m", "int64")
    rng = np.random.default_rng(0)
    cases = {"qk": (([1, 3, n, 64], [1, 3, 64, m]), (query, 64), (64, keys)),
             "pv": (([1, 3, n, m], [1, 3, m, 64]), (query, keys), (keys, 64))}
    for name, (shapes, a_tail, b_tail) in cases.items():
        sch = BatchMatmul().apply(_legalized_matmul(*shapes), CHIP.tvm(), False)
        assert sch is not None, f"BatchMatmul did not match {name}"
        lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")}), target=CHIP.tvm())
        a = rng.standard_normal((1, 3, *a_tail)).astype(np.float32)
        b = rng.standard_normal((1, 3, *b_tail)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((1, 3, a_tail[0], b_tail[1]), np.float32))
        lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
        np.testing.assert_allclose(out.numpy(), a @ b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_attention_matmul_rule_leaves_other_layouts_alone():
    """A product whose columns are not contiguous in B (``B[..., j, k]``) is not BatchMatmul's."""
    from lowbit.targets.simd import BatchMatmul

    a = te.placeholder((2, 8, 16), name="a")
    b = te.placeholder((2, 12, 16), name="b")
    k = te.reduce_axis((0, 16), name="k")
    c = te.compute((2, 8, 12), lambda g, i, j: te.sum(a[g, i, k] * b[g, j, k], axis=k), name="matmul")
    assert BatchMatmul().apply(te.create_prim_func([a, b, c]), CHIP.tvm(), False) is None


def test_gemm_rules_return_a_tunable_space():
    """Asked for a tunable schedule, the GEMM rule samples its register tile's row count (a space
    MetaSchedule can search); every sample computes the same product."""
    packed = pack_linear(np.random.default_rng(5).standard_normal((48, 64)).astype(np.float32), RECIPES["int4_g32"],
                         "layer", CHIP)
    m = tirx.Var("m", "int64")
    func = linear_kernel(packed.fmt, packed.layout, m, packed.layout.padded(48), 64).with_attr("global_symbol", "k")
    rule = next(r for r in CHIP.rules if r.apply(func, CHIP.tvm(), False) is not None)
    sch = rule.apply(func, CHIP.tvm(), True)
    samples = [inst for inst in sch.trace.insts if inst.kind.name == "SampleCategorical"]
    assert len(samples) == 1
    x = np.random.default_rng(6).standard_normal((13, 64)).astype(np.float32)
    lib = tvm.compile(sch.mod, target=CHIP.tvm()).jit()
    out = tvm.runtime.tensor(np.zeros((13, packed.layout.padded(48)), np.float32))
    lib["k"](*[tvm.runtime.tensor(a) for a in [x, *packed.tensors.values()]], out)
    want = x @ _reference_weight(RECIPES["int4_g32"], np.random.default_rng(5).standard_normal((48, 64))
                                 .astype(np.float32)).T
    np.testing.assert_allclose(out.numpy()[:, :48], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("recipe", ["fp32", "w8a16-rtn", "w4a16-rtn-g32-asym", "w4a8-rtn-g128", "w8a8-smoothquant-static"])
def test_gather_reads_rows_of_the_packed_head(recipe):
    """A tied embedding lookup from the head's packed tensors gives the rows the head computes with
    (its dequantized weight), out-of-range ids clipped; 1-D and 2-D index arrays."""
    from lowbit.codegen.kernels import gather_kernel
    from lowbit.compiler import get_recipe

    rows, k = 300, 200
    rng = np.random.default_rng(5)
    table = rng.standard_normal((rows, k)).astype(np.float32)
    recipe = get_recipe(recipe)
    statistics = LinearStatistics.empty(k, 1)
    statistics.add(rng.standard_normal((4, k)).astype(np.float32))
    packed = pack_linear(table, recipe, "head", CHIP, statistics)
    tensors = [a for s, a in packed.tensors.items() if s not in packed.scheme.shared_tensors]
    want_table = table if packed.quantized is None else packed.quantized.dequantize()
    for ids in (np.array([0, 299, 17, 500, -3], np.int32), np.array([[5, 6, 7], [299, 1, 2]], np.int64)):
        func = gather_kernel(packed.fmt, packed.layout, rows, k, list(ids.shape), str(ids.dtype))
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=CHIP.tvm()).jit()
        out = tvm.runtime.tensor(np.zeros((*ids.shape, k), np.float32), tvm.cpu())
        lib["main"](*[tvm.runtime.tensor(a, tvm.cpu()) for a in (ids, *tensors)], out)
        np.testing.assert_allclose(out.numpy(), want_table[np.clip(ids, 0, rows - 1)], rtol=1e-6, atol=1e-6)
