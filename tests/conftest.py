"""Shared fixtures: the real SmolLM2 is prepared and calibrated once per session, and each recipe's
build is made once and shared by the accuracy tests (in memory) and the end-to-end tests (saved as
an artifact and loaded)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _share_the_cores() -> None:
    """Under ``pytest -n N`` each worker's kernel threads (TVM's pool, OpenMP's for torch) take its
    share of the cores, not all of them: N pools of all the cores on those cores spend their time
    waiting on one another (on 2 cores, 2 workers of 2 threads took a fifth longer on the kernel
    tests). Set before TVM's pool or torch starts; an explicit setting wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = str(max(1, len(os.sched_getaffinity(0)) // workers))
        for variable in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ.setdefault(variable, share)


_share_the_cores()

PROMPT = "The capital of France is"


from .forkserver import lowbit_cli  # noqa: E402,F401 - the tests' way to run the command


def error_lines(stderr: str) -> list[str]:
    """The ``lowbit: error:`` lines of a command's stderr."""
    return [line for line in stderr.splitlines() if line.startswith("lowbit: error:")]


SMOL_CALIBRATION = {"samples": 16, "seq_len": 256, "probe_tokens": 32}  # keep=autoN's probe: 256 by default


class Smol:
    """SmolLM2-135M prepared for a context of 1024 and calibrated on ``SMOL_CALIBRATION`` windows of
    the bundled calibration text; :meth:`built` builds a recipe for the host once."""

    def __init__(self):
        from lowbit.compiler import CalibrationText, prepare
        from lowbit.compiler.sources.texts import read_text

        calibration = CalibrationText("lcet10", read_text("lcet10"), **SMOL_CALIBRATION)
        self.prepared = prepare("smollm2-135m", max_context=1024, calibration=calibration)
        self._built: dict = {}

    def built(self, recipe: str):
        from lowbit.compiler import get_recipe

        if recipe not in self._built:
            self._built[recipe] = self.prepared.build(get_recipe(recipe))
        return self._built[recipe]


@pytest.fixture(scope="session")
def smol() -> Smol:
    return Smol()


@pytest.fixture(scope="session")
def smol_source(smol):
    """The default real model as loaded (GGUF converted and cached on first use)."""
    return smol.prepared.source


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, smol):
    """SmolLM2 under a recipe as an artifact, written once per session: ``artifacts("w8a16-rtn") -> Path``."""
    root = tmp_path_factory.mktemp("artifacts")
    saved: dict[str, Path] = {}

    def get(recipe: str) -> Path:
        if recipe not in saved:
            saved[recipe] = smol.built(recipe).save(root / recipe)
        return saved[recipe]

    return get


@pytest.fixture(scope="session")
def smol_folder() -> Path:
    """The default real model's Hugging Face folder (its tokenizer), without loading or calibrating
    the model: tests that need only the tokenizer stay off the SmolLM2 worker."""
    from lowbit.compiler.sources.models import registered_model_folder

    return registered_model_folder("smollm2-135m")


@pytest.fixture(scope="session")
def eval_tokens(smol_folder):
    """A few hundred tokens of real English (Alice in Wonderland, chapter 1 onward)."""
    from tokenizers import Tokenizer

    from lowbit.compiler.sources.texts import read_text

    text = read_text("alice29")
    start = text.index("CHAPTER I")
    tokenizer = Tokenizer.from_file(str(smol_folder / "tokenizer.json"))
    return tokenizer.encode(text[start:start + 6000]).ids[:513]


class ModelledTiles:
    """The ``instruction`` of :class:`lowbit.targets.x86_amx.AmxW8A8Gemm` that makes each AMX tile
    instruction a call into a software model of it (tests/amx_model.c), so that code with AMX's
    kernels runs on any x86-64 CPU: the kernels' addresses, strides, tile configuration and operand
    roles are checked against the instructions' definitions on every machine, and the tile products
    they run are counted."""

    def __init__(self, folder: Path):
        library = folder / "amx_model.so"
        source = Path(__file__).with_name("amx_model.c")
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
        self._library = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)  # TVM's code resolves amx_model_* here
        self._library.amx_model_tile_products.restype = ctypes.c_long

    def __call__(self, op: str, *args):
        from tvm.script import tirx as T

        return T.call_extern("int32", f"amx_model_{op}", *args)

    def products(self) -> int:
        """The tile products (``tdpbsud``) run so far in this process."""
        return self._library.amx_model_tile_products()


@pytest.fixture(scope="session")
def modelled_tiles(tmp_path_factory) -> ModelledTiles:
    return ModelledTiles(tmp_path_factory.mktemp("amx"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_folder):
    """A small random Llama with SmolLM2's real tokenizer, as a Hugging Face folder (fast to compile)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(smol_folder / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_model_dir):
    from lowbit.compiler import compile as lowbit_compile

    out = tmp_path_factory.mktemp("tiny-art") / "w4"
    lowbit_compile(str(tiny_model_dir), "w4a16-rtn-g32", "host", out, progress=False)
    return out


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", help="fuzzing suite: ten times the cases, random seeds")


def pytest_collection_modifyitems(items):
    """Under ``pytest -n N --dist loadgroup`` (``make test``): every test of a module runs on one
    worker (its module fixtures are made once), except that the tests of one architecture (the
    ``arch`` fixture's parameter) form a group of their own; and every test that needs the session's
    SmolLM2 runs on the same worker (it is prepared and built once)."""
    for item in items:
        group = "smollm2" if "smol" in getattr(item, "fixturenames", ()) else item.module.__name__
        family = getattr(getattr(item, "callspec", None), "params", {}).get("arch")
        if family is not None and group != "smollm2":  # test_architectures: one group per family
            group = f"{group}[{family}]"
        item.add_marker(pytest.mark.xdist_group(group))


_FUZZ_CASES: dict[str, int] = {}  # summed over xdist workers


def _fuzz_cases() -> dict[str, int]:
    fuzz = sys.modules.get("tests.test_fuzz")
    return dict(fuzz.CASES) if fuzz is not None else {}


def pytest_sessionfinish(session, exitstatus):
    from . import forkserver

    forkserver.close()
    if hasattr(session.config, "workeroutput"):  # an xdist worker: report its fuzz counts to the controller
        session.config.workeroutput["fuzz_cases"] = _fuzz_cases()


def pytest_testnodedown(node, error):
    for kind, count in getattr(node, "workeroutput", {}).get("fuzz_cases", {}).items():
        _FUZZ_CASES[kind] = _FUZZ_CASES.get(kind, 0) + count


def pytest_terminal_summary(terminalreporter):
    cases = dict(_FUZZ_CASES)
    for kind, count in _fuzz_cases().items():
        cases[kind] = cases.get(kind, 0) + count
    if cases:
        counts = ", ".join(f"{kind} {count}" for kind, count in sorted(cases.items()))
        terminalreporter.write_line(f"fuzz cases run: {counts} (total {sum(cases.values())})")
