"""Shared fixtures: the real SmolLM2 artifacts are compiled once per session and reused."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

PROMPT = "The capital of France is"


from .forkserver import lowbit_cli  # noqa: E402,F401 - the tests' way to run the command


def error_lines(stderr: str) -> list[str]:
    """The ``lowbit: error:`` lines of a command's stderr."""
    return [line for line in stderr.splitlines() if line.startswith("lowbit: error:")]


@pytest.fixture(scope="session")
def smol_source():
    """The default real model, loaded (GGUF converted and cached on first use)."""
    from lowbit.compiler.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Compile SmolLM2 with a recipe once per session: ``artifacts("w8a16-rtn") -> Path``."""
    from lowbit.compiler import compile as lowbit_compile

    root = tmp_path_factory.mktemp("artifacts")
    built: dict[str, Path] = {}

    def get(recipe: str) -> Path:
        if recipe not in built:
            out = root / recipe
            lowbit_compile("smollm2-135m", recipe, "host", out, max_context=1024, progress=False)
            built[recipe] = out
        return built[recipe]

    return get


@pytest.fixture(scope="session")
def eval_tokens(smol_source):
    """A few hundred tokens of real English (Alice in Wonderland, chapter 1 onward)."""
    from tokenizers import Tokenizer

    from lowbit.compiler.datasets import read_text

    text = read_text("alice29")
    start = text.index("CHAPTER I")
    tokenizer = Tokenizer.from_file(str(smol_source.folder / "tokenizer.json"))
    return tokenizer.encode(text[start:start + 6000]).ids[:513]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_source):
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
        shutil.copy2(smol_source.folder / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_model_dir):
    from lowbit.compiler import compile as lowbit_compile

    out = tmp_path_factory.mktemp("tiny-art") / "w4"
    lowbit_compile(str(tiny_model_dir), "w4a16-rtn-g32", "host", out, progress=False)
    return out


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", help="fuzzing suite: ten times the cases, random seeds")


def pytest_sessionfinish(session, exitstatus):
    from . import forkserver

    forkserver.close()


def pytest_terminal_summary(terminalreporter):
    fuzz = sys.modules.get("tests.test_fuzz")
    if fuzz is not None and fuzz.CASES:
        counts = ", ".join(f"{kind} {count}" for kind, count in sorted(fuzz.CASES.items()))
        terminalreporter.write_line(f"fuzz cases run: {counts} (total {sum(fuzz.CASES.values())})")
