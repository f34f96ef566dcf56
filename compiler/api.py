"""The Python API: ``compile`` a model into an artifact, ``load`` an artifact into a Session."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path

from .artifact import write_artifact
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
            progress: bool | None = None) -> CompileResult:
    """Compile ``model`` (a name, HF folder, .gguf or .onnx) with ``recipe`` for ``target`` into ``output``."""
    from lowbit.codegen.build import build
    from lowbit.targets import get_target

    started = time.perf_counter()
    recipe_obj = get_recipe(recipe)  # validate cheap arguments before the expensive work
    chip = get_target(target)
    if max_context is not None and max_context < 2:
        raise LowbitError(f"max_context must be at least 2, got {max_context}")
    output = Path(output or f"out/{Path(str(model)).stem}-{recipe_obj.name.replace(':', '_')}")
    stages = _Stages(5, sys.stderr.isatty() if progress is None else progress)
    try:
        with stages.stage(f"loading {model}"):
            source = resolve_model(str(model))
        with stages.stage("importing into TVM Relax"):
            ir, tokenizer_folder, eos = _import(source, max_context)
        with stages.stage(f"applying {recipe_obj.name}"):
            result = run_pipeline(ir, recipe_obj, chip)
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
