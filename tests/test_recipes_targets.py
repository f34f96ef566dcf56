"""Recipe names and files, target registry."""

import json

import pytest

from lowbit.compiler import LowbitError, get_recipe
from lowbit.targets import get_target, list_targets


def test_recipe_names_parse():
    r = get_recipe("w4a16-rtn-g128")
    assert (r.weights.bits, r.weights.group_size, r.weights.symmetric) == (4, 128, True)
    assert get_recipe("w8a16-rtn").weights.group_size is None
    assert get_recipe("w4a16-rtn-g32-asym").weights.symmetric is False
    assert get_recipe("fp32").weights is None
    r = get_recipe("w4a16-rtn-g64:ignore=lm_head*,model.layers.0.*")
    assert r.is_ignored("lm_head.weight") and r.is_ignored("model.layers.0.mlp.up_proj.weight")
    assert not r.is_ignored("model.layers.1.mlp.up_proj.weight")


def test_accuracy_recipes_parse():
    sq = get_recipe("w8a8-smoothquant:alpha=auto")
    assert sq.weights.bits == 8 and sq.activations.granularity == "token" and sq.smoothing.alpha is None
    assert get_recipe("w8a8-naive-static").activations.granularity == "tensor"
    assert get_recipe("w8a8-naive").smoothing is None
    awq = get_recipe("w4a16-awq-g128")
    assert awq.weights.method == "awq" and awq.needs_calibration
    keep = get_recipe("w4a16-gptq-g128:keep=auto5;damp=0.1")
    assert keep.keep.auto == 5 and keep.weights.damp == 0.1
    assert get_recipe("w4a16-rtn-g128:keep=lm_head*").is_kept("lm_head.weight")
    assert get_recipe("w4a16-gptq-g128").weights.act_order  # GPTQ defaults to act-order
    assert not get_recipe("w4a16-gptq-g128-noact").weights.act_order
    assert not get_recipe("w4a16-awq-g128").weights.act_order
    assert get_recipe("w4a16-gptq-g128:stages=3").weights.stages == 3


@pytest.mark.parametrize("name,needle", [
    ("int4", "w8a16-rtn"),             # lists valid recipes
    ("w4a16-foo", "method .foo."),
    ("w4a16-rtn-g100", "group size 100"),
    ("w2a16-rtn-g128", "bits 2"),
    ("w8a16-rtn-g128", "per output channel"),
    ("w4a16-rtn-g128:frobnicate=3", "frobnicate=3"),
    ("w8a8-smoothquant:alpha=1.5", "alpha 1.5 out of range"),
    ("w8a8-smoothquant:alpha=high", "alpha='high' is not a number"),
    ("w4a16-rtn-g128:alpha=0.5", "smoothquant recipes only"),
    ("w4a16-awq-g128+kv3", "components are \\+kv16, \\+kv8 and \\+kv4"),
    ("w4a16-rtn-g128+kv8+kv4", "more than one KV-cache component"),
    ("w4a16-rtn-g128+kv8:group=64", "add \\+kv4"),
    ("w4a16-rtn-g128+kv4:group=40", "group=40 must be a multiple of 16"),
    ("w4a16-rtn-g128+kv4:residual=x", "residual='x' is not a whole number"),
    ("w4a16-rtn-g128+fast", "unknown component"),
    ("w4a16-rtn-g128-noact", "gptq only"),
    ("w4a16-awq-g128:stages=2", "gptq recipes only"),
    ("w4a16-gptq-g128:stages=0", "stages=0 out of range"),
    ("w4a16-gptq-g128:stages=two", "not a whole number"),
])
def test_bad_recipes_name_the_problem(name, needle):
    with pytest.raises(LowbitError, match=needle):
        get_recipe(name)


def test_kv_cache_components_parse():
    assert get_recipe("w4a16-rtn-g128").kv is None
    kv8 = get_recipe("w4a16-rtn-g128+kv8")
    assert kv8.kv.bits == 8 and kv8.weights.group_size == 128 and kv8.kv.name == "kv8"
    kv4 = get_recipe("w4a16-awq-g128+kv4:group=32;residual=16")
    assert (kv4.kv.bits, kv4.kv.group, kv4.kv.residual, kv4.weights.method) == (4, 32, 16, "awq")
    assert get_recipe("fp32+kv4").kv.name == "kv4:group=64;residual=32"
    assert get_recipe("w8a16-rtn+kv16").kv.name == "kv16"


def test_recipe_toml(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\nignore = ["lm_head*"]\n[weights]\nbits = 4\ngroup_size = 64\nsymmetric = false\n')
    r = get_recipe(str(path))
    assert r.name == "mine" and r.weights.group_size == 64 and not r.weights.symmetric and r.ignore == ("lm_head*",)
    path.write_text('[weights]\nbits = 4\ngroupsize = 64\n')
    with pytest.raises(LowbitError, match=r"\[weights\] takes"):
        get_recipe(str(path))


def test_targets_registry():
    names = {t.name for t in list_targets()}
    assert {"x86-avx2", "x86-avxvnni", "x86-vnni", "arm-dotprod", "arm-i8mm", "cuda-sm80", "cuda-sm90"} <= names
    host = get_target("host")
    assert host.runs_on_this_machine() and host.family == "x86"
    assert get_target("arm-i8mm").tvm().attrs["mtriple"] == "aarch64-linux-gnu"
    with pytest.raises(LowbitError, match="valid targets: host, "):
        get_target("riscv")


def test_pipeline_steps_come_from_the_recipe():
    from lowbit.compiler import explain

    steps = explain("w4a16-awq-gptq-g128:keep=auto2;stages=2")
    assert [s["step"] for s in steps] == ["KeepLayers", "ScaleForWeights", "RoundInStages", "QuantizeLinearLayers",
                                          "CacheInPlace", "LastPositionEntry", "Finalize"]
    assert [s["needs_calibration"] for s in steps] == [True, True, True, True, False, False, False]
    assert [s["step"] for s in explain("w8a8-smoothquant")][:1] == ["SmoothActivations"]
    plain = explain("w4a16-rtn-g128")
    assert [s["step"] for s in plain] == ["QuantizeLinearLayers", "CacheInPlace", "LastPositionEntry", "Finalize"]
    assert not plain[0]["needs_calibration"]
    assert all(s["requires"] and s["guarantees"] for s in steps)


def test_explain_on_the_command_line_loads_nothing():
    from .conftest import lowbit_cli

    done = lowbit_cli("compile", "no-such-model", "-r", "w8a8-smoothquant", "--explain", "--json")
    assert done.returncode == 0, done.stderr
    assert [s["step"] for s in json.loads(done.stdout)] == ["SmoothActivations", "QuantizeLinearLayers",
                                                             "CacheInPlace", "LastPositionEntry", "Finalize"]
