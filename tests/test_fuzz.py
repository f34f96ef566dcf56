"""Fuzzing every input lowbit parses: each case in its own process, only two outcomes allowed.

Inputs: GGUF files (truncations, bit flips in the header, key-value and tensor tables, wrong
counts), ONNX models (mutated protobufs, dropped initializers and nodes, renamed or retyped graph
inputs and outputs), manifest.json (every field removed or retyped, path-traversal file names,
broken JSON), recipe names and TOML files, command-line arguments (NaN, negative, huge, non-UTF-8)
and token-id arrays through the Python API and ``--prompt-ids``. Cases come from hypothesis
strategies (deterministic by default, so CI sees the same cases each run) and run in children of a
fork server (:mod:`tests.fuzz_server`), so a crash kills only its case.

A case passes when its process exits 0, or exits 2 with exactly one ``lowbit: error:`` line that
names the culprit (the file, field, argument or id), and neither a traceback nor a file outside the
given output appears. Anything else (another exit code, a signal, a hang, a traceback) fails.

``pytest --fuzz-long`` runs ten times as many cases with fresh random seeds. The count of cases per
input kind is printed at the end of the run (and recorded in bench/RESULTS.md).
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from . import forkserver
from .conftest import error_lines

CASES: collections.Counter = collections.Counter()  # input kind -> cases run (printed by conftest)
BUDGET = {"gguf": 20, "onnx": 16, "manifest": 60, "recipe-name": 50, "recipe-toml": 40, "cli": 60,
          "token-ids": 40}


def _settings(kind: str, long_run: bool):
    return settings(max_examples=BUDGET[kind] * (10 if long_run else 1), deadline=None, database=None,
                    derandomize=not long_run, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


LONG = "--fuzz-long" in sys.argv


# -- the fork server -------------------------------------------------------------------------------------

class FuzzServer:
    """The shared fork server (:mod:`tests.forkserver`), counting cases per input kind."""

    def __init__(self, cache: Path):
        self.env = {"LOWBIT_CACHE": str(cache)}

    def run(self, kind: str, cwd: Path, argv=None, python=None, timeout: float = 120, env=None) -> dict:
        CASES[kind] += 1
        return forkserver.server().run(cwd, argv, python, timeout, self.env | (env or {}))


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    return FuzzServer(tmp_path_factory.mktemp("fuzz-cache"))


class Sample(tuple):
    """A fixture's bytes and facts, shown shortly in hypothesis reports."""

    def __repr__(self):
        return f"<{len(self[0])} bytes>"


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def check(outcome: dict, culprits, case: str, before: set[str] | None = None, after: set[str] | None = None,
          allowed: str = "out") -> None:
    """The two acceptable outcomes (see the module docstring); ``culprits``: strings of which the
    error line must contain one."""
    where = f"case {case!r}: exit {outcome}\n{outcome['stderr'][-3000:]}"
    assert "exit" in outcome and outcome["exit"] in (0, 2), where
    assert "Traceback" not in outcome["stderr"], where
    if outcome["exit"] == 2:
        lines = error_lines(outcome["stderr"])
        assert len(lines) == 1, where
        named = [form for c in culprits for form in (c, repr(c)[1:-1])]  # as is, or escaped like repr()
        assert any(c in lines[0] for c in named), f"{where}\nnames none of {culprits}"
    if before is not None:
        new = {p for p in after - before if p != allowed and not p.startswith(f"{allowed}/")}
        assert not new, f"{where}\nwrote outside the output: {sorted(new)}"


def _case_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="case-"))


# -- GGUF ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    import gguf

    from .tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    reader = gguf.GGUFReader(path)
    fields = [(f.offset, sum(p.nbytes for p in f.parts[:3])) for f in reader.fields.values()]  # key + type
    tensors = [(t.field.offset, sum(p.nbytes for p in t.field.parts)) for t in reader.tensors]
    return Sample((path.read_bytes(), fields + tensors, int(reader.tensors[0].data_offset)))


def _mutate_gguf(data: bytes, regions, data_offset: int, draw) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "count", "word"]))
    data = bytearray(data)
    if how == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if how == "count":  # tensor_count (offset 8) or kv_count (offset 16)
        struct.pack_into("<Q", data, draw(st.sampled_from([8, 16])), draw(st.integers(0, 2**64 - 1)))
        return bytes(data)
    start, size = draw(st.sampled_from(regions + [(0, 24)]))
    position = start + draw(st.integers(0, max(size - 1, 0)))
    if how == "flip":
        data[position] ^= 1 << draw(st.integers(0, 7))
    else:
        position = min(position, len(data) - 8)
        struct.pack_into("<Q", data, position, draw(st.integers(0, 2**64 - 1)))
    return bytes(data)


@given(st.data())
def test_fuzz_gguf(fuzz, tiny_gguf, data):
    base, regions, data_offset = tiny_gguf
    mutated = _mutate_gguf(base, regions, data_offset, data.draw)
    cwd = _case_dir()
    try:
        (cwd / "model.gguf").write_bytes(mutated)
        before = _tree(cwd)
        outcome = fuzz.run("gguf", cwd, ["compile", "model.gguf", "-r", "fp32", "-o", "out", "--max-context", "64"],
                           env={"LOWBIT_CACHE": str(cwd / "cache")})
        after = {p for p in _tree(cwd) if p != "cache" and not p.startswith("cache/")}  # the converted model's cache
        check(outcome, ["model.gguf"], "gguf mutation", before, after)
    finally:
        shutil.rmtree(cwd)


test_fuzz_gguf = _settings("gguf", LONG)(test_fuzz_gguf)


# -- ONNX ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """The serialized export and the length of its leading part without weights (nodes, inputs,
    outputs: where a flipped bit changes structure rather than a weight's value)."""
    import onnx

    from transformers import LlamaConfig, LlamaForCausalLM

    from .test_onnx_frontend import _export

    import torch

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = _export(LlamaForCausalLM(config).eval(), tmp_path_factory.mktemp("onnx") / "tiny.onnx",
                   optimum_style=True)
    model = onnx.load(str(path))
    del model.graph.initializer[:]
    return Sample((path.read_bytes(), len(model.SerializeToString())))


_ONNX_MUTATIONS = ("drop-initializer", "drop-node", "rename-input", "rename-output", "retype-input", "redim-input",
                   "op-type", "domain", "drop-node-input", "opset", "truncate", "flip")


def _mutate_onnx(data: bytes, structure: int, draw) -> bytes:
    import onnx

    how = draw(st.sampled_from(_ONNX_MUTATIONS))
    if how in ("truncate", "flip"):
        raw = bytearray(data)
        position = draw(st.integers(0, (len(raw) if how == "truncate" else structure) - 1))
        if how == "truncate":
            return bytes(raw[:position])
        raw[position] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw)
    model = onnx.load_from_string(data)
    graph = model.graph
    pick = lambda items: items[draw(st.integers(0, len(items) - 1))]  # noqa: E731
    if how == "drop-initializer":
        graph.initializer.remove(pick(graph.initializer))
    elif how == "drop-node":
        graph.node.remove(pick(graph.node))
    elif how == "rename-input":
        pick(graph.input).name = draw(st.sampled_from(["ids", "past_key_values.9.key", "input_ids ", ""]))
    elif how == "rename-output":
        pick(graph.output).name = draw(st.sampled_from(["out", "present.0.keys", "logits2", ""]))
    elif how == "retype-input":
        pick(graph.input).type.tensor_type.elem_type = draw(st.integers(0, 16))
    elif how == "redim-input":
        dims = pick(graph.input).type.tensor_type.shape.dim
        if dims:
            pick(dims).dim_value = draw(st.integers(-3, 2**40))
    elif how == "op-type":
        pick(graph.node).op_type = draw(st.sampled_from(["Add", "MatMul", "Softmax", "Gather", "Fancy", "Transpose"]))
    elif how == "domain":
        pick(graph.node).domain = draw(st.sampled_from(["com.microsoft", "acme", "ai.onnx.ml"]))
    elif how == "drop-node-input":
        node = pick(graph.node)
        if node.input:
            node.input.remove(pick(node.input))
    else:
        model.opset_import[0].version = draw(st.integers(-1, 40))
    return model.SerializeToString()


@given(st.data())
def test_fuzz_onnx(fuzz, tiny_onnx, data):
    mutated = _mutate_onnx(*tiny_onnx, data.draw)
    cwd = _case_dir()
    try:
        (cwd / "model.onnx").write_bytes(mutated)
        before = _tree(cwd)
        outcome = fuzz.run("onnx", cwd, ["compile", "model.onnx", "-r", "fp32", "-o", "out", "--max-context", "64"])
        check(outcome, ["model.onnx"], "onnx mutation", before, _tree(cwd))
    finally:
        shutil.rmtree(cwd)


test_fuzz_onnx = _settings("onnx", LONG)(test_fuzz_onnx)


# -- manifest.json -------------------------------------------------------------------------------------------------

def _paths(value, prefix=()):
    """Every key path in a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            yield from _paths(item, (*prefix, index))


_JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                            | st.text(max_size=20), lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
_FILE_NAMES = st.sampled_from(["../../etc/passwd", "/etc/passwd", "sub/x", "..", ".", "", "model.so/", "a\\b",
                               "manifest.json", "manifest.sig", "x" * 300, "ok.bin"])


def _manifest_text(manifest: dict, draw) -> bytes:
    how = draw(st.sampled_from(["remove", "retype", "file-name", "raw"]))
    manifest = json.loads(json.dumps(manifest))
    paths = [p for p in _paths(manifest) if p]
    if how == "raw":
        return draw(st.sampled_from([b"", b"{", b"[]", b"null", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000,
                                     b'{"format_version": NaN}', b'{"format_version": 1e999}']))
    if how == "file-name":
        entry = manifest["files"].pop(draw(st.sampled_from(sorted(manifest["files"]))))
        manifest["files"][draw(_FILE_NAMES)] = entry
    else:
        path = draw(st.sampled_from(paths))
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        if how == "remove":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_JSON_VALUES)
    return json.dumps(manifest).encode()


@pytest.fixture(scope="module")
def artifact_files(tiny_artifact):
    return tiny_artifact, json.loads((tiny_artifact / "manifest.json").read_text())


@given(st.data())
def test_fuzz_manifest(fuzz, artifact_files, data):
    source, manifest = artifact_files
    text = _manifest_text(manifest, data.draw)
    command = data.draw(st.sampled_from(["inspect", "run"]))
    cwd = _case_dir()
    try:
        art = cwd / "art"
        art.mkdir()
        for path in source.iterdir():
            if path.name != "manifest.json":
                os.link(path, art / path.name)
        (art / "manifest.json").write_bytes(text)
        argv = ["inspect", "art", "--json"] if command == "inspect" else [
            "run", "art", "--prompt-ids", "1,2", "--max-new-tokens", "1"]
        before = _tree(cwd)
        outcome = fuzz.run("manifest", cwd, argv)
        check(outcome, ["artifact art"], f"manifest {text[:200]!r}", before, _tree(cwd), allowed="art")
    finally:
        shutil.rmtree(cwd)


test_fuzz_manifest = _settings("manifest", LONG)(test_fuzz_manifest)


# -- recipes -----------------------------------------------------------------------------------------------------------

_NUMBERS = st.sampled_from(["0", "1", "-1", "0.5", "nan", "inf", "-inf", "1e309", "99999999999999999999", "x", "",
                            "auto", "auto-1", "auto0", "auto3", "auto99999999"])
_RECIPE_NAMES = st.builds(
    lambda head, bits, method, group, suffix, compose, options: f"{head}{bits}{method}{group}{suffix}{compose}{options}",
    st.sampled_from(["w", "W", "", "fp", "w8a8-"]),
    st.sampled_from(["4a16", "8a16", "3a16", "2a16", "16a16", "8", "4a8", "x"]),
    st.sampled_from(["-rtn", "-gptq", "-awq", "-awq-gptq", "-smoothquant", "-naive", "-", ""]),
    st.sampled_from(["-g128", "-g32", "-g0", "-g-1", "-g99999999999", "-gx", ""]),
    st.sampled_from(["-asym", "-noact", "-static", "", "-asym-noact"]),
    st.sampled_from(["", "+kv8", "+kv4", "+", "+kv", "+fast"]),
    st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["ignore", "keep", "alpha", "damp", "stages", "x", ""]),
                       _NUMBERS), max_size=3).map(lambda opts: (":" + ";".join(opts)) if opts else ""),
) | st.text(max_size=40)


@given(_RECIPE_NAMES)
def test_fuzz_recipe_names(fuzz, tiny_model_dir, name):
    """A valid recipe is parsed, then the output (a folder that is no artifact) is refused: either
    way one fast exit 2 naming the recipe or the output."""
    cwd = _case_dir()
    try:
        (cwd / "mine").mkdir()
        (cwd / "mine" / "keep.txt").write_text("mine")
        outcome = fuzz.run("recipe-name", cwd, ["compile", tiny_model_dir, "-r", name, "-o", "mine"])
        if name.startswith("-"):  # taken for an option by argparse: its usage error names the argument
            check(outcome, ["argument", "recipe"], name)
        else:
            check(outcome, ["recipe", "output"], name)
        assert outcome["exit"] == 2 and (cwd / "mine" / "keep.txt").read_text() == "mine"
    finally:
        shutil.rmtree(cwd)


test_fuzz_recipe_names = _settings("recipe-name", LONG)(test_fuzz_recipe_names)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (int, str)):
        return json.dumps(value)
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


_TOML_SCALARS = st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=12)
_TOML_TABLE = st.dictionaries(st.sampled_from(["bits", "group_size", "symmetric", "method", "act_order", "damp",
                                               "stages", "granularity", "alpha", "junk"]),
                              _TOML_SCALARS | st.lists(st.integers(0, 9), max_size=2), max_size=4)


def _toml_document(draw) -> str:
    lines = []
    for key in draw(st.lists(st.sampled_from(["name", "base", "ignore", "keep", "keep_auto", "junk"]), unique=True,
                             max_size=3)):
        value = draw(_TOML_SCALARS | st.lists(st.text(max_size=6), max_size=2)
                     | st.sampled_from(["w4a16-rtn-g32", "self.toml", "other.toml", "w8a8-naive"]))
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for table in draw(st.lists(st.sampled_from(["weights", "activations", "smoothing", "extra"]), unique=True,
                               max_size=3)):
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in draw(_TOML_TABLE).items() if v is not None]
    text = "\n".join(lines) + "\n"
    if draw(st.booleans()) and text.strip():  # and now and then, damage the text itself
        position = draw(st.integers(0, len(text) - 1))
        text = text[:position] + draw(st.sampled_from(["", "[", "=", "\"", "\x00", "\udcff"])) + text[position + 1:]
    return text


@given(st.data())
def test_fuzz_recipe_files(fuzz, tiny_model_dir, data):
    text = _toml_document(data.draw)
    cwd = _case_dir()
    try:
        (cwd / "self.toml").write_bytes(text.encode("utf-8", "surrogateescape"))
        (cwd / "other.toml").write_text('base = "self.toml"\n')
        (cwd / "mine").mkdir()
        outcome = fuzz.run("recipe-toml", cwd, ["compile", tiny_model_dir, "-r", "self.toml", "-o", "mine"])
        check(outcome, ["self.toml", "other.toml", "recipe", "output"], text)
        assert outcome["exit"] == 2
    finally:
        shutil.rmtree(cwd)


test_fuzz_recipe_files = _settings("recipe-toml", LONG)(test_fuzz_recipe_files)


# -- command-line arguments ----------------------------------------------------------------------------------------

_VALUES = st.sampled_from(["nan", "-nan", "inf", "-1", "0", "1", "2", "0.5", "1e309", "-0", "9" * 30, "abc", "",
                           "1,2,-3", "1,,2", " 5 ", "0x10", "100000000", b"\xff\xfe", b"caf\xe9", "\u2603"])
_OPTIONS = {
    "run": ["--max-new-tokens", "--temperature", "--top-p", "--seed", "--prompt", "--prompt-ids", "--prompt-file",
            "--trusted-key"],
    "eval": ["--tokens", "--window", "--text", "--calib-samples", "--reference", "-r", "--trusted-key"],
    "inspect": [],
    "bench": ["--prompt-tokens", "--new-tokens", "--repeats", "--warmup", "--trusted-key"],
    "compile": ["--max-context", "--calib-samples", "--calib-seq-len", "-t", "-r", "--calib"],
    "analyze": ["--top", "--calib-samples", "-r", "-t"],
    "sign": ["--key"],
    "targets": [],
}


@given(st.data())
def test_fuzz_command_line(fuzz, tiny_artifact, data):
    """Random options and values for every command; positional arguments that exist or do not.
    Commands that would build a model get an output folder that is no artifact or a missing model, so
    a case takes at most seconds."""
    command = data.draw(st.sampled_from(sorted(_OPTIONS)))
    argv: list = [command]
    if command in ("run", "bench", "eval", "inspect", "sign"):
        argv.append(data.draw(st.sampled_from([str(tiny_artifact), "missing-dir", "file.txt", b"\xff-dir"])))
    elif command in ("compile", "analyze"):
        argv.append(data.draw(st.sampled_from(["missing-model", "file.txt", b"\xff.gguf", "x.onnx"])))
    for option in data.draw(st.lists(st.sampled_from(_OPTIONS[command]), max_size=4)) if _OPTIONS[command] else []:
        argv += [option, data.draw(_VALUES)]
    if command == "compile":
        argv += ["-o", "mine"]
    if data.draw(st.booleans()):
        argv.append(data.draw(st.sampled_from(["--json", "--debug-not", "--", "-x"])))
    cwd = _case_dir()
    try:
        (cwd / "file.txt").write_text("a b c")
        (cwd / "mine").mkdir()
        (cwd / "mine" / "keep.txt").write_text("mine")
        before = _tree(cwd)
        outcome = fuzz.run("cli", cwd, argv, timeout=300)
        # the culprit of a command-line case may be any argument: the line must name one, or the command
        names = [os.fsdecode(a) if isinstance(a, bytes) else a for a in argv[1:]] + [command, "argument"]
        check(outcome, [n for n in names if n], repr(argv), before, _tree(cwd), allowed="mine")
        assert (cwd / "mine" / "keep.txt").read_text() == "mine"
    finally:
        shutil.rmtree(cwd)


test_fuzz_command_line = _settings("cli", LONG)(test_fuzz_command_line)


# -- token ids ------------------------------------------------------------------------------------------------------

_IDS = st.lists(st.integers(-2**63, 2**63 - 1) | st.integers(-3, 49155), max_size=6)


@given(st.data())
def test_fuzz_token_ids(fuzz, tiny_artifact, data):
    ids = data.draw(_IDS)
    dtype = data.draw(st.sampled_from(["list", "int8", "int32", "int64", "uint64", "float32", "bool", "object"]))
    method = data.draw(st.sampled_from(["prefill", "extend", "generate", "decode", "cli"]))
    cwd = _case_dir()
    try:
        if method == "cli":
            outcome = fuzz.run("token-ids", cwd, ["run", tiny_artifact, "--prompt-ids", ",".join(map(str, ids)) or ",",
                                                  "--max-new-tokens", "1"])
        else:
            array = repr(ids) if dtype == "list" else f"np.array({ids!r}, dtype=object).astype({dtype!r})"
            call = {"prefill": f"s.prefill({array})", "extend": f"s.extend({array})",
                    "generate": f"s.generate({array}, 1)", "decode": f"s.decode({ids[0] if ids else None!r})"}[method]
            code = f"import numpy as np\nfrom lowbit.compiler import load\ns = load({str(tiny_artifact)!r})\n{call}\n"
            try:
                np.array(ids, dtype=object).astype(dtype if dtype != "list" else object)
            except (OverflowError, ValueError, TypeError):  # numpy itself refuses: not lowbit's input
                return
            outcome = fuzz.run("token-ids", cwd, python=code)
        check(outcome, ["token id", "integers", "prompt"], f"{method} {dtype} {ids}")
    finally:
        shutil.rmtree(cwd)


test_fuzz_token_ids = _settings("token-ids", LONG)(test_fuzz_token_ids)


def test_fuzz_server_reports_crashes(fuzz, tmp_path):
    """The harness itself: a case that dies of a signal or exits 1 is reported as such, not as a pass."""
    crashed = fuzz.run("harness", tmp_path, python="import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    assert crashed.get("signal") == 11
    with pytest.raises(AssertionError):
        check(crashed, [""], "crash")
    failed = fuzz.run("harness", tmp_path, python="raise ValueError('bug')\n")
    assert failed.get("exit") == 1 and "Traceback" in failed["stderr"]
    with pytest.raises(AssertionError):
        check(failed, [""], "bug")
