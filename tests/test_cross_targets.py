"""Targets other than this machine: code generation for AArch64, and what happens without a linker.

Nothing here can run the AArch64 code (no emulator on CI); the tests check that the kernels are
lowered to NEON vector instructions and that a missing cross compiler is a clear error.
"""

import re
from collections import Counter

import pytest

from .conftest import lowbit_cli


def _assembly(executable) -> str:
    def modules(module):
        yield module
        for imported in module.imports:
            yield from modules(imported)

    return "".join(m.inspect_source("asm") for m in modules(executable.mod) if m.kind == "llvm")


@pytest.mark.parametrize("target", ["arm-dotprod", "arm-i8mm"])
@pytest.mark.parametrize("recipe,vector_op", [("w4a16-rtn-g32", "fmla"), ("w8a8-naive", "smull")])
def test_aarch64_kernels_use_neon(tiny_model_dir, target, recipe, vector_op):
    from transformers import AutoModelForCausalLM

    from lowbit.codegen.build import build
    from lowbit.compiler.frontend_torch import import_torch_model
    from lowbit.compiler.pipeline import run_pipeline
    from lowbit.compiler.recipes import get_recipe
    from lowbit.targets import get_target

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32").eval()
    ir = import_torch_model(model, 64)
    chip = get_target(target)
    assembly = _assembly(build(run_pipeline(ir, get_recipe(recipe), chip).ir.mod, chip))
    ops = Counter(re.findall(r"^\s+([a-z0-9.]+)\s+v\d+\.", assembly, re.MULTILINE))  # ops on NEON registers
    assert ops[vector_op] > 50, ops.most_common(8)


def test_missing_cross_compiler_is_named_before_compiling(tmp_path, tiny_model_dir):
    done = lowbit_cli("compile", tiny_model_dir, "-r", "w4a16-rtn-g32", "-t", "arm-dotprod", "-o", tmp_path / "arm",
                      env={"LOWBIT_CROSS_CXX": "no-such-aarch64-g++"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cross compiler no-such-aarch64-g++" in done.stderr and "LOWBIT_CROSS_CXX" in done.stderr
    assert list(tmp_path.iterdir()) == []
