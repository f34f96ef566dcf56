"""The Python API: ``compile`` a model into an artifact, ``load`` an artifact into a Session."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path

from .artifact import MANIFEST, write_artifact
from .calibration import Calibration
from .datasets import DEFAULT_CALIB_TEXT, DEFAULT_EVAL_TEXT, read_text
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


@dataclasses.dataclass
class BuiltModel:
    """A model imported, quantized and built in memory (what an artifact holds, before writing)."""

    source: object
    recipe: object
    chip: object
    ir: object  # the imported ModelIR, before quantization
    result: object  # PipelineResult
    executable: object
    tokenizer_folder: Path | None
    eos: object

    @property
    def manifest(self) -> dict:
        return _manifest(self.source, self.recipe, self.chip, self.result, self.eos)

    def session(self) -> Session:
        tokenizer = None if self.tokenizer_folder is None else Path(self.tokenizer_folder) / "tokenizer.json"
        manifest = dict(self.manifest, weight_names=list(self.result.ir.params))
        return Session.in_memory(self.executable, self.result.ir.params, manifest,
                                 tokenizer if tokenizer is not None and tokenizer.is_file() else None)

    def rebuilt(self, recipe: str) -> "BuiltModel":
        """The same imported model under another (calibration-free) recipe, e.g. the fp32 reference."""
        from lowbit.codegen.build import build

        recipe_obj = get_recipe(recipe)
        result = run_pipeline(self.ir, recipe_obj, self.chip)
        return dataclasses.replace(self, recipe=recipe_obj, result=result, executable=build(result.ir.mod, self.chip))


def build_model(model: str = DEFAULT_MODEL, recipe: str = DEFAULT_RECIPE, target: str = "host",
                max_context: int | None = None, progress: bool | None = None, calib: str = DEFAULT_CALIB_TEXT,
                calib_samples: int = 64, calib_seq_len: int = 512, stages: "_Stages | None" = None) -> BuiltModel:
    """Load, import, calibrate (if the recipe needs it), quantize and build ``model`` in memory.

    ``stages``: the caller's stage display (it then owns closing it); by default one of our own.
    """
    from lowbit.codegen.build import build
    from lowbit.targets import get_target

    recipe_obj = get_recipe(recipe)  # validate cheap arguments before the expensive work
    chip = get_target(target)
    if max_context is not None and max_context < 2:
        raise LowbitError(f"max_context must be at least 2, got {max_context}")
    if calib_samples < 1:
        raise LowbitError(f"calib_samples must be at least 1, got {calib_samples}")
    show = _show(progress)
    own_stages = stages is None
    stages = stages or _Stages(4 + recipe_obj.needs_calibration, show)
    try:
        with stages.stage(f"loading {model}"):
            source = resolve_model(str(model))
        with stages.stage("importing into TVM Relax"):
            ir, tokenizer_folder, eos = _import(source, max_context)
        calibration = None
        if recipe_obj.needs_calibration:
            with stages.stage(f"calibrating on {calib}"):
                calibration = _calibrate(ir, chip, tokenizer_folder, calib, calib_samples, calib_seq_len, show)
        with stages.stage(f"applying {recipe_obj.name}"), _bar(len(ir.params), "quantizing", show) as bar:
            result = run_pipeline(ir, recipe_obj, chip, calibration, bar)
        with stages.stage(f"building for {chip.name}"):
            executable = build(result.ir.mod, chip)
    finally:
        if own_stages:
            stages.close()
    return BuiltModel(source, recipe_obj, chip, ir, result, executable, tokenizer_folder, eos)


def compile(model: str = DEFAULT_MODEL, recipe: str = DEFAULT_RECIPE, target: str = "host",
            output: str | Path | None = None, max_context: int | None = None,
            progress: bool | None = None, calib: str = DEFAULT_CALIB_TEXT, calib_samples: int = 64,
            calib_seq_len: int = 512) -> CompileResult:
    """Compile ``model`` (a name, HF folder, .gguf or .onnx) with ``recipe`` for ``target`` into ``output``.

    Recipes that need calibration (GPTQ, AWQ, SmoothQuant, static activation scales, ``keep=autoN``)
    read ``calib_samples`` windows of ``calib_seq_len`` tokens of ``calib`` (a bundled text name or a
    UTF-8 file; the default is disjoint from ``lowbit eval``'s).
    """
    started = time.perf_counter()
    recipe_obj = get_recipe(recipe)
    output = Path(output or f"out/{Path(str(model)).stem}-{recipe_obj.name.replace(':', '_')}")
    from lowbit.targets import get_target

    library_compiler = get_target(target).library_compiler()  # a missing cross compiler fails before the work
    stages = _Stages(5 + recipe_obj.needs_calibration, _show(progress))
    try:
        built = build_model(model, recipe, target, max_context, progress, calib, calib_samples, calib_seq_len,
                            stages)
        with stages.stage(f"writing {output}"):
            write_artifact(output, built.executable, built.result.ir.params, built.manifest, built.tokenizer_folder,
                           library_compiler)
    finally:
        stages.close()
    return CompileResult(output=Path(output).resolve(), recipe=built.recipe.name, target=built.chip.name,
                         seconds=time.perf_counter() - started, weight_bytes=built.result.ir.param_bytes(),
                         layers=built.result.layers)


def _show(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


@contextlib.contextmanager
def _bar(total: int, description: str, enabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, disable=not enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _calibrate(ir, chip, tokenizer_folder, text_spec, samples, seq_len, show) -> Calibration:
    """Calibration over ``samples`` windows of ``text_spec``: the statistics, a recalibration with
    other weights (GPTQ's stages) and an output probe on the first window, built when first asked."""
    from .calibration import Calibrator, calibration_samples
    from .output_probe import OutputProbe

    tokenizer_file = None if tokenizer_folder is None else Path(tokenizer_folder) / "tokenizer.json"
    if tokenizer_file is None or not tokenizer_file.is_file():
        raise LowbitError("calibration needs the model's tokenizer.json next to the model file")
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(read_text(text_spec)).ids
    windows = calibration_samples(ids, samples, min(seq_len, ir.max_context - 1))
    calibrator = Calibrator(ir, chip, windows)
    with _bar(len(windows), "calibration samples", show) as bar:
        statistics = calibrator.collect(progress=bar)

    def recalibrate(params, layers):
        with _bar(len(windows), f"recalibrating {len(layers)} layers", show) as bar:
            return calibrator.collect(params, layers, bar)

    probe: list[OutputProbe] = []

    def output_kl(name, weight_nk):
        if not probe:
            probe.append(OutputProbe(ir, chip, windows[0]))
        return probe[0].kl(name, weight_nk)

    return Calibration(statistics, recalibrate, output_kl)


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


def evaluate(model: str, recipe: str | None = None, target: str = "host", text: str = DEFAULT_EVAL_TEXT,
             tokens: int = 4096, window: int = 512, reference: str | None = None, progress: bool | None = None,
             calib: str = DEFAULT_CALIB_TEXT, calib_samples: int = 64, calib_seq_len: int = 512) -> dict:
    """Perplexity of an artifact directory, or of a model under ``recipe`` built in memory.

    A model evaluated under a quantized recipe is compared with its own fp32 build on the same
    windows (``kl_vs_float``, ``top1_agreement``); an artifact is compared with ``reference`` (an
    fp32 artifact directory or a model) when given. See :mod:`lowbit.compiler.evaluate`.
    """
    from .evaluate import evaluate_session, windows

    if tokens < 2:
        raise LowbitError(f"tokens must be at least 2, got {tokens}")
    show = _show(progress)
    if _is_artifact(model):
        if recipe is not None:
            raise LowbitError(f"{model} is an artifact, already compiled with its recipe; drop -r/--recipe")
        session = load(model)
        recipe_name = session.manifest["recipe"]["name"]
        reference_session = None if reference is None else _reference_session(reference, target)
    else:
        built = build_model(model, recipe or "fp32", target, progress=progress, calib=calib,
                            calib_samples=calib_samples, calib_seq_len=calib_seq_len)
        session, recipe_name = built.session(), built.recipe.name
        reference_session = None
        if reference is not None:
            reference_session = _reference_session(reference, target)
        elif built.recipe.weights is not None:
            reference_session = built.rebuilt("fp32").session()
    ids = session.encode(read_text(text))[: tokens + 1]
    window = min(window, session.max_context - 1)
    with _bar(len(windows(ids, window)), "evaluating", show) as bar:
        result = evaluate_session(session, ids, window, reference_session, bar)
    return dict(result.as_dict(), recipe=recipe_name, text=text)


def _is_artifact(path: str) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _reference_session(reference: str, target: str) -> Session:
    if _is_artifact(reference):
        return load(reference)
    return build_model(reference, "fp32", target).session()


def analyze(model: str, recipe: str = "w8a8-naive", target: str = "host", progress: bool | None = None,
            calib: str = DEFAULT_CALIB_TEXT, calib_samples: int = 8, calib_seq_len: int = 512) -> dict:
    """Rank ``model``'s linear layers by the output error ``recipe``'s quantization causes, worst first.

    See :mod:`lowbit.passes.sensitivity`; ``keep=autoN`` keeps the first ``N`` of this ranking.
    """
    from lowbit.passes.linear_match import find_linears
    from lowbit.passes.sensitivity import rank_layers
    from lowbit.targets import get_target

    recipe_obj = get_recipe(recipe)
    if recipe_obj.weights is None:
        raise LowbitError(f"recipe {recipe_obj.name} quantizes nothing; analyze a quantized recipe")
    chip = get_target(target)
    show = _show(progress)
    stages = _Stages(4, show)
    try:
        with stages.stage(f"loading {model}"):
            source = resolve_model(str(model))
        with stages.stage("importing into TVM Relax"):
            ir, tokenizer_folder, _ = _import(source, None)
        with stages.stage(f"calibrating on {calib}"):
            calibration = _calibrate(ir, chip, tokenizer_folder, calib, calib_samples, calib_seq_len, show)
        linears = find_linears(ir.mod["prefill"])
        with stages.stage("measuring each layer"), _bar(len(linears), "layers", show) as bar:
            ranked = rank_layers(linears, ir.params, calibration.statistics, recipe_obj, calibration.output_kl, bar)
    finally:
        stages.close()
    tokens = next(iter(calibration.statistics.values())).tokens
    return {"model": source.name, "recipe": recipe_obj.name, "calibration_tokens": tokens,
            "layers": [{"layer": e.layer, "relative_error": e.relative_error}
                       | ({} if e.output_kl is None else {"output_kl": e.output_kl}) for e in ranked]}
