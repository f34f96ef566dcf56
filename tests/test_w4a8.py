"""The W4A8 kernels (int4 codes times int8 activations on a byte dot product), per x86 ISA path.

Each path is compiled here whatever the CPU (its instructions are checked in the assembly) and run
only where the CPU has them; the skip reason names the missing instruction set, so the test report
records which paths ran. Integer results are checked bit-exactly: inputs whose activation scales
come out as exactly 1 and weight scales that are powers of two make every float in the kernel an
exact integer, so the output must equal numpy's int64 dot products exactly.
"""

import numpy as np
import pytest
import tvm
from tvm import tirx

from lowbit.codegen.formats import LinearFormat
from lowbit.codegen.kernels import linear_kernel, w4a8_padded_k
from lowbit.compiler import get_recipe
from lowbit.passes.quantize_linears import pack_linear
from lowbit.passes.schemes import linear_scheme
from lowbit.targets import get_target, schedule

PATHS = {"x86-vnni": "vpdpbusd", "x86-avxvnni": "{vex}\tvpdpbusd", "x86-avx2": "vpmaddubsw",
         "arm-dotprod": "sdot"}  # target -> its dot instruction


def _build(chip, fmt, m, n, k):
    layout = chip.linear_layout(fmt)
    m_arg = 1 if m == 1 else tirx.Var("m", "int64")
    func = linear_kernel(fmt, layout, m_arg, layout.padded(n), k).with_attr("global_symbol", "kernel")
    return tvm.compile(schedule(func, chip).mod, target=chip.tvm()), layout


def _run(executable, arrays, m, n_padded):
    lib = executable.jit()
    out = tvm.runtime.tensor(np.zeros((m, n_padded), np.float32), tvm.cpu())
    lib["kernel"](*[tvm.runtime.tensor(a, tvm.cpu()) for a in arrays], out)
    return out.numpy()


def _exact_case(rng, m, n, k, group, asym):
    """Activations with a 127 in every group (scale exactly 1), codes, power-of-two scales, and the
    integer result ``sum_g scale * (x . (code - zero))`` in int64."""
    k_padded = w4a8_padded_k(k, group)
    x = rng.integers(-127, 128, (m, k_padded))
    x[:, k:] = 0
    for g in range(k_padded // group):
        x[:, g * group + (g % min(group, k - g * group))] = 127 * rng.choice([-1, 1], m)
    x = x[:, :k]
    codes = rng.integers(0, 16, (k, n))
    groups = k_padded // group
    scales = (2.0 ** rng.integers(-3, 4, (groups, n))).astype(np.float32)
    zeros = rng.integers(0, 16, (groups, n)).astype(np.float32) if asym else np.full((groups, n), 8.0, np.float32)
    padded_x = np.zeros((m, k_padded), np.int64)
    padded_x[:, :k] = x
    padded_codes = np.full((k_padded, n), 8, np.int64)
    padded_codes[:k] = codes
    dots = np.einsum("mgr,grn->mgn", padded_x.reshape(m, groups, group),
                     padded_codes.reshape(groups, group, n)) - padded_x.reshape(m, groups, group).sum(2)[:, :, None] * zeros
    want = (dots * scales[None]).sum(1)
    return x.astype(np.float32), codes.astype(np.uint8), scales, zeros, want


@pytest.mark.parametrize("target", sorted(PATHS))
@pytest.mark.parametrize("m,n,k,group,asym", [
    (1, 192, 576, 128, False),  # decode; K padded to whole groups (576 -> 640)
    (1, 128, 256, 32, True),  # zero points
    (7, 192, 576, 64, False),  # prefill GEMM rows
])
def test_w4a8_integer_results_are_exact(target, m, n, k, group, asym):
    chip = get_target(target)
    fmt = LinearFormat("w4a8", group, asym)
    executable, layout = _build(chip, fmt, m, n, k)
    assembly = executable.mod.inspect_source("asm")
    assert PATHS[target] in assembly, f"{target} kernel does not use {PATHS[target]}"
    if not chip.runs_on_this_machine():
        pytest.skip(f"{target} code does not run on this CPU (needs {', '.join(chip.capabilities)}); "
                    "compiled and checked for its instructions only")
    x, codes, scales, zeros, want = _exact_case(np.random.default_rng(m * n + k), m, n, k, group, asym)
    tensors = [layout.pack_quads(codes, w4a8_padded_k(k, group), pad_code=8), layout.pack(scales).astype(np.float16)]
    if asym:
        tensors.append(layout.pack(zeros).astype(np.float16))
    got = _run(executable, [x, *tensors], m, layout.padded(n))[:, :n]
    np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("recipe", ["w4a8-rtn-g32", "w4a8-rtn-g128-asym", "w4a8-rtn"])
def test_w4a8_scheme_matches_its_numpy_grids(recipe):
    """Real-valued weights and activations: the host kernel equals the scheme's own numpy grids
    (activations through the ActivationGrid, weights dequantized) to float rounding."""
    chip = get_target("host")
    rng = np.random.default_rng(1)
    n, k, m = 200, 576, 3
    weight = rng.standard_normal((n, k)).astype(np.float32)
    x = (rng.standard_normal((m, k)) * np.linspace(0.1, 4, k)).astype(np.float32)
    recipe = get_recipe(recipe)
    packed = pack_linear(weight, recipe, "layer", chip)
    assert packed.fmt.kind == "w4a8"
    executable, layout = _build(chip, packed.fmt, m, n, k)
    got = _run(executable, [x, *packed.tensors.values()], m, layout.padded(n))[:, :n]
    scheme = linear_scheme(recipe.weights, recipe.activations)
    want = scheme.activation_grid.simulate(x, None).astype(np.float64) @ packed.quantized.dequantize().T
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    float_result = x.astype(np.float64) @ weight.T.astype(np.float64)
    assert np.abs(got - float_result).max() < 0.2 * np.abs(float_result).max()  # and still the same product
