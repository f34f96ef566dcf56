"""Targets other than this machine: AArch64 code generation, calibrated recipes compiled for a chip the
host cannot run (calibration runs on the host), what happens without a linker, and a model built
with x86-amx's kernels run on modelled tiles.

Nothing here runs AArch64 code; the tests check that the kernels are lowered to NEON vector
instructions, that an ARM artifact of a calibrated recipe holds the same quantized weights as an x86
build (so calibration ran on the host, not the chip), and that a missing cross compiler is a clear
error. CI installs ``g++-aarch64-linux-gnu`` so that the ARM libraries are linked for real.
"""

import dataclasses
import re
import shutil
from collections import Counter

import numpy as np
import pytest
from safetensors.numpy import load_file

from lowbit.codegen.packing import from_column_tiles, unpack_byte_quads, unpack_int4
from lowbit.compiler import CalibrationText, compile as lowbit_compile, get_recipe, prepare
from lowbit.compiler.runtime.artifact import read_manifest
from lowbit.targets import get_target
from lowbit.targets.x86_amx import AmxW8A8Gemm

from .conftest import lowbit_cli

CALIBRATION_TEXT = "The quick brown fox jumps over the lazy dog near the river bank. " * 40


def _assembly(executable) -> str:
    def modules(module):
        yield module
        for imported in module.imports:
            yield from modules(imported)

    return "".join(m.inspect_source("asm") for m in modules(executable.mod) if m.kind == "llvm")


@pytest.fixture(scope="module")
def tiny_prepared(tiny_model_dir):
    return prepare(str(tiny_model_dir), max_context=64)


@pytest.mark.parametrize("target,recipe,vector_op", [("arm-dotprod", "w4a16-rtn-g32", "fmla"),
                                                     ("arm-i8mm", "w8a8-naive", "usdot")])
def test_aarch64_kernels_use_neon(tiny_prepared, target, recipe, vector_op):
    built = tiny_prepared.build(get_recipe(recipe), get_target(target))
    ops = Counter(re.findall(r"^\s+([a-z0-9.]+)\s+v\d+\.", _assembly(built.executable), re.MULTILINE))
    assert ops[vector_op] > 50, ops.most_common(8)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="no aarch64-linux-gnu-g++ to link the ARM library (CI installs it: .ci/run)")
@pytest.mark.parametrize("recipe", ["w4a16-gptq-g128"])
def test_calibrated_recipes_compile_for_another_chip(tiny_model_dir, tmp_path, recipe):
    """Calibration (here GPTQ's Hessians and its solver; SmoothQuant's activation ranges come from
    the same statistics) runs on the host whatever the target: an ARM artifact holds the same
    formats and codes as the x86 build of the same recipe."""
    text = tmp_path / "calib.txt"
    text.write_text(CALIBRATION_TEXT, encoding="utf-8")
    arm = lowbit_compile(str(tiny_model_dir), recipe, "arm-dotprod", tmp_path / "arm", progress=False,
                         calib=str(text), calib_samples=4, calib_seq_len=64, max_context=64)
    manifest = read_manifest(arm.output)
    assert manifest["target"]["name"] == "arm-dotprod"
    arm_weights = load_file(str(arm.output / "weights.safetensors"))
    calibration = CalibrationText("calib", CALIBRATION_TEXT, 4, 64)
    host = prepare(str(tiny_model_dir), max_context=64, calibration=calibration).build(get_recipe(recipe))
    assert set(host.result.layers) == set(manifest["layers"])
    for name, report in host.result.layers.items():
        host_tag, host_note = report.split(": ", 1)
        arm_tag, arm_note = manifest["layers"][name].split(": ", 1)
        assert host_tag.rsplit("_t", 1)[0] == arm_tag.rsplit("_t", 1)[0], name
        assert _unstacked(host_note) == _unstacked(arm_note), name  # tiles differ: so may what stacks
        host_codes, arm_codes = (_codes(weights, name, note) for weights, note in
                                 ((host.result.ir.params, host_note), (arm_weights, arm_note)))
        np.testing.assert_array_equal(host_codes[:, : arm_codes.shape[1]], arm_codes[:, : host_codes.shape[1]])


def _unstacked(note: str) -> str:
    """A layer's report line less where it sits in a stack of siblings (whole column tiles stack, and
    the tile is the chip's)."""
    return re.sub(r"(; )?channels \d+-\d+ of [^;\s]+", "", note)


def _codes(weights: dict, name: str, note: str) -> np.ndarray:
    """A layer's codes ``[K, N_padded]`` whatever its column-tile layout (int4 and byte quads unpacked), also where
    its report ``note`` says that it runs stacked with its siblings (``channels a-b of STACK``)."""
    stacked = re.search(r"channels (\d+)-(\d+) of ([^;\s]+)", note)
    tiled = weights[f"{stacked[3] if stacked else name}.qweight"]
    if tiled.ndim == 4:  # w8a8's byte quads
        codes = unpack_byte_quads(tiled)
    else:
        codes = from_column_tiles(tiled, tiled.shape[0] * tiled.shape[2])
    codes = codes[:, int(stacked[1]):int(stacked[2])] if stacked else codes
    return unpack_int4(codes) if codes.dtype == np.uint32 else codes


def test_missing_cross_compiler_is_named_before_compiling(tmp_path, tiny_model_dir):
    done = lowbit_cli("compile", tiny_model_dir, "-r", "w4a16-rtn-g32", "-t", "arm-dotprod", "-o", tmp_path / "arm",
                      env={"LOWBIT_CROSS_CXX": "no-such-aarch64-g++"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cross compiler no-such-aarch64-g++" in done.stderr and "LOWBIT_CROSS_CXX" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(get_target("host").family != "x86", reason="the AMX model is called from x86-64 code")
def test_amx_build_matches_its_own_decode_steps_on_modelled_tiles(tiny_prepared, modelled_tiles):
    """x86-amx's rules on a whole w8a8 model, its tile instructions run by the software model and
    the rest on the host's: the prompt's logits (its GEMMs on AMX tiles) equal those of the same
    tokens fed one decode step at a time (the GEMVs on VNNI), which add the same integer products
    and apply the same float epilogue."""
    amx, vnni = get_target("x86-amx"), get_target("x86-vnni")
    modelled = dataclasses.replace(amx, rules=(AmxW8A8Gemm(modelled_tiles), *amx.rules[1:]),
                                   tvm_target=vnni.tvm_target, capabilities=vnni.capabilities)
    if not modelled.runs_on_this_machine():
        pytest.skip(f"needs {', '.join(vnni.capabilities)} besides the modelled tiles")
    built = tiny_prepared.build(get_recipe("w8a8-naive"), modelled)
    assert "amx_model_tdpbsud" in _assembly(built.executable)
    ids = list(range(100, 137))  # 37 tokens: a whole block of 32 rows and a partial one
    before = modelled_tiles.products()
    prompt = built.session().prefill(ids)
    assert modelled_tiles.products() > before
    session = built.session()
    steps = np.stack([session.prefill(ids[:1])[-1], *(session.decode(token) for token in ids[1:])])
    np.testing.assert_allclose(prompt, steps, rtol=1e-4, atol=1e-4 * np.abs(steps).max())
