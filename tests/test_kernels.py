"""Each linear kernel format, GEMV and GEMM, built for the host and checked against numpy."""

import numpy as np
import pytest
import tvm
from tvm import s_tir, tirx

from lowbit.codegen.kernels import LinearFormat, linear_kernel
from lowbit.compiler.recipes import Recipe, WeightQuant
from lowbit.passes.quantize_weights import pack_linear
from lowbit.passes.rtn import quantize_rtn
from lowbit.targets import get_target

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
    wq = recipe.weights
    return weight if wq is None else quantize_rtn(weight, wq.bits, wq.group_size, wq.symmetric).dequantize()


def _run_kernel(packed, m_rows, x):
    m = 1 if m_rows == 1 else tirx.Var("m", "int64")
    n_padded = packed.tensors["qweight" if "qweight" in packed.tensors else "tiled"].shape[0] * packed.fmt.tile
    func = linear_kernel(packed.fmt, m, n_padded, packed.k).with_attr("global_symbol", "kernel")
    sch = s_tir.Schedule(func)
    CHIP.schedule_linear(sch, m_rows == 1, CHIP.linear_tile)
    lib = tvm.compile(sch.mod, target=CHIP.tvm()).jit()
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in [x, *packed.tensors.values()]]
    out = tvm.runtime.tensor(np.zeros((m_rows, n_padded), np.float32), dev)
    lib["kernel"](*args, out)
    return out.numpy()[:, : packed.n]


@pytest.mark.parametrize("fmt", sorted(RECIPES))
@pytest.mark.parametrize("m_rows", [1, 7])
@pytest.mark.parametrize("n,k", [(48, 64), (40, 200)])  # second: N not a multiple of the tile, partial group
def test_linear_kernel_matches_numpy(fmt, m_rows, n, k):
    rng = np.random.default_rng(n * k + m_rows)
    weight = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((m_rows, k)).astype(np.float32)
    recipe = RECIPES[fmt]
    packed = pack_linear(weight, recipe, "layer", CHIP.linear_tile)
    expected_kind = "f32" if recipe.weights is None else "int8" if recipe.weights.bits == 8 else "int4"
    assert packed.fmt.kind == expected_kind
    got = _run_kernel(packed, m_rows, x)
    want = x.astype(np.float64) @ _reference_weight(recipe, weight).T.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_int4_weights_are_an_eighth_of_float():
    weight = np.random.default_rng(1).standard_normal((256, 512)).astype(np.float32)
    packed = pack_linear(weight, RECIPES["int4_g32"], "layer", CHIP.linear_tile)
    assert packed.tensors["qweight"].nbytes == weight.nbytes // 8
    assert isinstance(packed.fmt, LinearFormat) and packed.fmt.group_size == 32
