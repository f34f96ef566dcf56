"""The Python API: ``compile`` a model into an artifact, ``load`` an artifact into a Session."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path

from .artifact import write_artifact
from .datasets import DEFAULT_CALIB_TEXT, read_text
from .errors import LowbitError
from .models import DEFAULT_MODEL, HFModel, resolve_model
from .pipeline import run_pipeline
from .recipes import DEFAULT_RECIPE, get_recipe
from .runtime import Session


@dataclasses.dataclass
class CompileResult:
    output: Path
    recipe: str
    target: str
    seconds: float
    weight_bytes: int
    layers: dict[str, str]

    def as_dict(self) -> dict:
        return {"output": str(self.output), "recipe": self.recipe, "target": self.target,
                "seconds": round(self.seconds, 2), "weight_bytes": self.weight_bytes,
                "layers": len(self.layers)}


class _Stages:
    """One progress line per compile stage, on a terminal only."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, disable=not enabled, bar_format="{desc:<40} {n}/{total} [{elapsed}]")

    @contextlib.contextmanager
    def stage(self, name: str):
        self.bar.set_description_str(name)
        yield
        self.bar.update(1)

    def close(self):
        self.bar.close()


def compile(model: str = DEFAULT_MODEL, recipe: str = DEFAULT_RECIPE, target: str = "host",
            output: str | Path | None = None, max_context: int | None = None,
            progress: bool | None = None, calib: str = DEFAULT_CALIB_TEXT, calib_samples: int = 64,
            calib_seq_len: int = 512) -> CompileResult:
    """Compile ``model`` (a name, HF folder, .gguf or .onnx) with ``recipe`` for ``target`` into ``output``.

    Recipes that need calibration (GPTQ) read ``calib_samples`` windows of ``calib_seq_len`` tokens
    of ``calib`` (a bundled text name or a UTF-8 file; the default is disjoint from ``lowbit eval``'s).
    """
    from lowbit.codegen.build import build
    from lowbit.targets import get_target

    started = time.perf_counter()
    recipe_obj = get_recipe(recipe)  # validate cheap arguments before the expensive work
    chip = get_target(target)
    if max_context is not None and max_context < 2:
        raise LowbitError(f"max_context must be at least 2, got {max_context}")
    if calib_samples < 1:
        raise LowbitError(f"calib_samples must be at least 1, got {calib_samples}")
    output = Path(output or f"out/{Path(str(model)).stem}-{recipe_obj.name.replace(':', '_')}")
    calibrate = recipe_obj.weights is not None and recipe_obj.weights.needs_calibration
    show = sys.stderr.isatty() if progress is None else progress
    stages = _Stages(6 if calibrate else 5, show)
    try:
        with stages.stage(f"loading {model}"):
            source = resolve_model(str(model))
        with stages.stage("importing into TVM Relax"):
            ir, tokenizer_folder, eos = _import(source, max_context)
        statistics = None
        if calibrate:
            with stages.stage(f"calibrating on {calib}"):
                statistics = _calibrate(ir, chip, tokenizer_folder, calib, calib_samples, calib_seq_len, show)
        with stages.stage(f"applying {recipe_obj.name}"), _bar(len(ir.params), "quantizing", show) as bar:
            result = run_pipeline(ir, recipe_obj, chip, statistics, bar)
        with stages.stage(f"building for {chip.name}"):
            executable = build(result.ir.mod, chip)
        with stages.stage(f"writing {output}"):
            manifest = _manifest(source, recipe_obj, chip, result, eos)
            write_artifact(output, executable, result.ir.params, manifest, tokenizer_folder)
    finally:
        stages.close()
    return CompileResult(output=Path(output).resolve(), recipe=recipe_obj.name, target=chip.name,
                         seconds=time.perf_counter() - started, weight_bytes=result.ir.param_bytes(),
                         layers=result.layers)


@contextlib.contextmanager
def _bar(total: int, description: str, enabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, disable=not enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _calibrate(ir, chip, tokenizer_folder, text_spec, samples, seq_len, show):
    from .calibration import calibration_samples, collect_statistics

    tokenizer_file = None if tokenizer_folder is None else Path(tokenizer_folder) / "tokenizer.json"
    if tokenizer_file is None or not tokenizer_file.is_file():
        raise LowbitError("calibration needs the model's tokenizer.json next to the model file")
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(read_text(text_spec)).ids
    windows = calibration_samples(ids, samples, min(seq_len, ir.max_context - 1))
    with _bar(len(windows), "calibration samples", show) as bar:
        return collect_statistics(ir, chip, windows, bar)


def _import(source, max_context):
    if isinstance(source, HFModel):
        from .frontend_torch import import_torch_model

        ir = import_torch_model(source.model, max_context)
        eos = source.model.config.eos_token_id
        return ir, source.folder, eos
    from .frontend_onnx import import_onnx_model

    return import_onnx_model(source.path, max_context), source.tokenizer_folder, None


def _manifest(source, recipe, chip, result, eos) -> dict:
    ir = result.ir
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return {
        "model": {"name": source.name, "kind": source.kind},
        "recipe": recipe.as_dict(),
        "target": chip.as_dict(),
        "inputs": ir.input_names,
        "outputs": ir.output_names,
        "entry_functions": ["prefill", "decode"],
        "kv_cache": dataclasses.asdict(ir.kv) | {"layout": "[1, num_kv_heads, seq, head_dim]"},
        "vocab_size": ir.vocab_size,
        "max_context": ir.max_context,
        "eos_token_ids": eos_ids,
        "weight_bytes": ir.param_bytes(),
        "layers": result.layers,
    }


def load(path: str | Path) -> Session:
    """Verify and load an artifact directory; returns a :class:`Session`."""
    return Session(path)
