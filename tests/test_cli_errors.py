"""The ``lowbit`` command and its errors: exit code 2, a message naming the culprit, no traceback."""

import json
import subprocess
import sys

import pytest
import torch

from lowbit.compiler import LowbitError, load
from lowbit.compiler.frontend.unsupported import check_exported_ops
from lowbit.targets import get_target

from .conftest import lowbit_cli

lowbit = lowbit_cli


def test_targets_json_lists_registry():
    done = lowbit("targets", "--json")
    assert done.returncode == 0
    targets = {t["name"]: t for t in json.loads(done.stdout)}
    assert targets[get_target("host").name]["host"] and targets["cuda-sm90"]["family"] == "cuda"


def test_compile_run_inspect_json(tmp_path, tiny_model_dir):
    out = tmp_path / "art"
    done = lowbit("compile", tiny_model_dir, "-r", "w8a16-rtn", "-t", "host", "-o", out, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"output", "recipe", "target", "seconds", "weight_bytes"} <= set(result)
    assert result["recipe"] == "w8a16-rtn" and result["target"] == get_target("host").name
    assert result["weight_bytes"] > 0

    done = lowbit("run", out, "--prompt", "Hello there", "--max-new-tokens", "5", "--json")
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert {"text", "prompt_tokens", "new_tokens", "prefill_tokens_per_s", "decode_tokens_per_s"} <= set(run)
    assert run["prompt_tokens"] == 2 and 1 <= run["new_tokens"] <= 5

    done = lowbit("inspect", out, "--json")
    manifest = json.loads(done.stdout)
    assert manifest["recipe"]["name"] == "w8a16-rtn" and "model.so" in manifest["files"]


def test_artifact_for_instructions_this_cpu_lacks_is_refused_before_it_loads(tmp_path, tiny_model_dir):
    """An x86 target this CPU cannot run (cross-compiled here) would die with SIGILL in its first
    kernel; ``run`` refuses it with exit code 2 naming the target and the missing feature."""
    from lowbit.targets import list_targets

    lacking = [t for t in list_targets() if t.family == "x86" and t.can_build and not t.runs_on_this_machine()]
    if not lacking:
        pytest.skip("this CPU runs every x86 target lowbit has")
    target = lacking[0]
    out = tmp_path / "other-cpu"
    done = lowbit("compile", tiny_model_dir, "-r", "w4a8-rtn-g32", "-t", target.name, "-o", out)
    assert done.returncode == 0, done.stderr
    done = lowbit("run", out, "--prompt", "Hello", "--max-new-tokens", "2")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"compiled for target {target.name}" in done.stderr and "-t host" in done.stderr


def test_sampling_is_seeded(tiny_artifact):
    session = load(tiny_artifact)
    a = session.generate("Once upon a time", 8, temperature=1.0, top_p=0.9, seed=3)
    b = session.generate("Once upon a time", 8, temperature=1.0, top_p=0.9, seed=3)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("args,needle", [
    (["compile", "no-such-model"], "'no-such-model' is neither a registered name (smollm2-135m)"),
    (["compile", "/nonexistent/model.gguf"], "neither a registered name"),
    (["compile", "smollm2-135m", "-r", "w5a16"], "unknown recipe 'w5a16'; valid recipes: fp32"),
    (["compile", "smollm2-135m", "-t", "tpu"], "unknown target 'tpu'; valid targets: host, "),
    (["run", "/nonexistent/artifact", "--prompt", "x"], "artifact /nonexistent/artifact does not exist"),
])
def test_bad_input_exits_2_naming_the_culprit(args, needle):
    done = lowbit(*args)
    assert done.returncode == 2
    assert needle in done.stderr
    assert "Traceback" not in done.stderr


def test_changed_or_missing_artifact_file_is_named(tmp_path, tiny_artifact):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifact, copy)
    with open(copy / "weights.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(LowbitError, match="file weights.safetensors does not match its checksum"):
        load(copy)
    (copy / "tokenizer.json").unlink()
    done = lowbit("run", copy, "--prompt", "x")
    assert done.returncode == 2 and "tokenizer.json is missing" in done.stderr


def test_prompt_longer_than_context(tiny_artifact):
    session = load(tiny_artifact)
    with pytest.raises(LowbitError, match="exceeds the context of 256 tokens"):
        session.generate("word " * 300, max_new_tokens=4)


def test_quantized_kv_cache_on_the_command_line(tmp_path, tiny_model_dir):
    """+kv4 compiles and runs with a cache allocated once (--max-context), and inspect, run and eval
    report its bytes per token (tiny Llama: 2 layers, 2 KV heads, head_dim 16); a group that does not
    divide head_dim and a conversation past the cache are refused naming both numbers."""
    out = tmp_path / "kv4"
    done = lowbit("compile", tiny_model_dir, "-r", "fp32+kv4:group=16;residual=4", "-o", out, "--json")
    assert done.returncode == 0, done.stderr
    done = lowbit("run", out, "--prompt-ids", "1,2,3", "--max-new-tokens", "20", "--max-context", "32", "--json")
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    # per layer and role: codes 2x32x8 B, scales and minimums 64 fp16 each, window 2x20x16 fp16
    assert run["kv_cache_bytes"] == 2 * 2 * (512 + 2 * 128 + 1280) and run["kv_context"] == 32
    assert run["kv_bytes_per_token"] == run["kv_cache_bytes"] / 32 and run["kv_fp32_bytes_per_token"] == 512
    inspected = json.loads(lowbit("inspect", out, "--context", "32", "--json").stdout)
    assert inspected["kv_bytes_per_token"] == run["kv_bytes_per_token"]
    assert inspected["kv_cache"]["scheme"] == "kv4:group=16;residual=4"
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 20, encoding="utf-8")
    done = lowbit("eval", out, "--text", text, "--tokens", "64", "--window", "32", "--chunk", "8", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["chunk"] == 8
    done = lowbit("run", out, "--prompt-ids", "1,2,3", "--max-new-tokens", "40", "--max-context", "32")
    assert done.returncode == 2 and "prompt of 3 tokens plus 40 new tokens exceeds the KV cache of 32" in done.stderr
    done = lowbit("compile", tiny_model_dir, "-r", "fp32+kv4:group=48", "-o", tmp_path / "bad")
    assert done.returncode == 2 and "group=48 does not divide the model's head_dim 16" in done.stderr
    assert not (tmp_path / "bad").exists()


def test_failed_compile_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch):
    import lowbit.compiler.building as building
    from lowbit.compiler import compile as lowbit_compile

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(building, "build_library", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lowbit_compile(str(tiny_model_dir), "fp32", "host", tmp_path / "art", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_while_writing_leaves_nothing(tmp_path, tiny_model_dir, monkeypatch):
    from lowbit.compiler import compile as lowbit_compile

    def broken_save(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", broken_save)
    with pytest.raises(LowbitError, match="disk full.*nothing was written"):
        lowbit_compile(str(tiny_model_dir), "fp32", "host", tmp_path / "art", progress=False)
    assert list(tmp_path.iterdir()) == []


class _Unsupported(torch.nn.Module):
    def forward(self, x):
        y = torch.special.bessel_j0(x)
        return torch.special.bessel_y0(y) + x


def test_unsupported_torch_ops_are_all_named_with_node_and_source():
    program = torch.export.export(_Unsupported(), (torch.ones(3),))
    with pytest.raises(LowbitError) as info:
        check_exported_ops(program)
    message = str(info.value)
    assert "2 node(s)" in message
    assert "special_bessel_j0.default at node special_bessel_j0" in message
    assert "special_bessel_y0.default at node special_bessel_y0" in message
    assert "test_cli_errors.py" in message  # the source line that produced the op


def test_eval_reports_perplexity(tiny_artifact, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 20, encoding="utf-8")
    done = lowbit("eval", tiny_artifact, "--text", text, "--tokens", "64", "--window", "32", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["tokens"] == 64 and result["perplexity"] > 1
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    done = lowbit("eval", tiny_artifact, "--text", empty)
    assert done.returncode == 2 and f"text file {empty} is empty" in done.stderr


def test_eval_model_with_recipe_compares_to_float(tiny_model_dir, tmp_path):
    """A model evaluated under a recipe is built in memory and compared with its own fp32 build."""
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 20, encoding="utf-8")
    common = ("--text", text, "--tokens", "64", "--window", "32", "--json")
    done = lowbit("eval", tiny_model_dir, "-r", "w4a16-rtn-g32", *common)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["recipe"] == "w4a16-rtn-g32" and result["tokens"] == 64
    assert 0 < result["kl_vs_float"] < 0.05 and 0.9 <= result["top1_agreement"] <= 1
    assert result["perplexity_gap"] == pytest.approx(result["perplexity"] / result["float_perplexity"] - 1, abs=1e-3)
    done = lowbit("eval", tiny_model_dir, *common)  # fp32: nothing to compare with
    assert done.returncode == 0, done.stderr
    assert "kl_vs_float" not in json.loads(done.stdout)


def test_analyze_ranks_every_linear_worst_first(tiny_model_dir):
    done = lowbit("analyze", tiny_model_dir, "-r", "w8a8-naive", "--calib-samples", "2", "--calib-seq-len", "64",
                  "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    errors = [entry["relative_error"] for entry in result["layers"]]
    assert len(errors) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
    assert errors == sorted(errors, reverse=True) and 0 < errors[-1] and errors[0] < 0.1


def test_analyze_weight_only_recipe_ranks_by_output_kl(tiny_model_dir):
    done = lowbit("analyze", tiny_model_dir, "-r", "w4a16-rtn-g32", "--calib-samples", "2", "--calib-seq-len", "64",
                  "--json")
    assert done.returncode == 0, done.stderr
    kls = [entry["output_kl"] for entry in json.loads(done.stdout)["layers"]]
    assert len(kls) == 2 * 7 + 1 and kls == sorted(kls, reverse=True) and kls[-1] > 0


@pytest.mark.parametrize("recipe,needle", [
    ("w4a16-rtn-g32:keep=nothing.*", "keep pattern 'nothing.*' matches no linear layer"),
    ("w4a16-rtn-g32:ignore=lm_head", "ignore pattern 'lm_head' matches no linear layer"),
])
def test_layer_patterns_that_match_nothing_are_errors(tiny_model_dir, tmp_path, recipe, needle):
    done = lowbit("compile", tiny_model_dir, "-r", recipe, "-o", tmp_path / "out")
    assert done.returncode == 2 and needle in done.stderr
    assert not (tmp_path / "out").exists()


def test_bench_reports_medians_of_its_repeats(tiny_artifact):
    done = lowbit("bench", tiny_artifact, tiny_artifact, "--prompt-tokens", "16", "--new-tokens", "8", "--repeats",
                  "3", "--warmup", "0", "--json")
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)["runs"]
    assert len(runs) == 2 and runs[0]["recipe"] == "w4a16-rtn-g32" and runs[0]["threads"] >= 1
    for run in runs:
        for phase in ("prefill", "decode"):
            rate = run[f"{phase}_tokens_per_s"]
            assert len(rate["all"]) == 3 and 0 < rate["min"] <= rate["median"] <= rate["max"]
    done = lowbit("bench", tiny_artifact, "--prompt-tokens", "200", "--new-tokens", "100")
    assert done.returncode == 2 and "200 prompt tokens plus 100 new tokens exceed the context" in done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_run_loads_the_runtime_only(tiny_artifact):
    """``lowbit run`` generates without TVM's compiler library or torch in its process (a fresh
    interpreter: the tests' fork server has both loaded already)."""
    script = ("import sys; from lowbit.compiler.cli import main; "
              "code = main(['run', sys.argv[1], '--prompt', 'Once upon a time', '--max-new-tokens', '4', '--json']); "
              "print(code, 'libtvm_compiler' in open('/proc/self/maps').read(), sys.modules.get('torch') is not None)")
    done = subprocess.run([sys.executable, "-c", script, str(tiny_artifact)], capture_output=True, text=True,
                          timeout=600)
    assert done.stdout.split()[-3:] == ["0", "False", "False"], done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[0])["new_tokens"] == 4
