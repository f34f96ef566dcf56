"""The Python API: ``compile`` a model into an artifact, ``load`` an artifact into a Session.

Everything that can be checked before the model loads is checked first (argument types and
ranges, the recipe and its options, the target's buildability and linker, the output folder, the
calibration text); what needs the graph (layer patterns, the tokenizer against the embedding table)
is checked right after import, before calibration. Long work reports its stages (:mod:`.progress`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import warnings
from pathlib import Path

from .artifact import MANIFEST, check_output, remove_stale_temporaries, write_artifact
from .calibration import Calibration
from .datasets import DEFAULT_CALIB_TEXT, DEFAULT_EVAL_TEXT, read_text
from .errors import LowbitArgumentError, LowbitError, LowbitWarning
from .models import DEFAULT_MODEL, HFModel, resolve_model
from .pipeline import check_layer_patterns, run_pipeline
from .progress import Stages, bar
from .recipes import DEFAULT_RECIPE, get_recipe
from .runtime import Session

MAX_CONTEXT_LIMIT = 1 << 20  # tokens; beyond it every cache and position table is absurd
_PATH = (str, os.PathLike)


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


@dataclasses.dataclass(frozen=True)
class CalibrationText:
    """Calibration input, read and checked before the model loads."""

    name: str
    text: str
    samples: int
    seq_len: int


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
    eos: list[int]

    @property
    def manifest(self) -> dict:
        return _manifest(self.source, self.recipe, self.chip, self.result, self.eos)

    def session(self) -> Session:
        tokenizer = None if self.tokenizer_folder is None else Path(self.tokenizer_folder) / "tokenizer.json"
        return Session.in_memory(self.executable, self.result.ir.params, self.manifest,
                                 tokenizer if tokenizer is not None and tokenizer.is_file() else None)

    def rebuilt(self, recipe: str) -> "BuiltModel":
        """The same imported model under another (calibration-free) recipe, e.g. the fp32 reference."""
        from lowbit.codegen.build import build

        recipe_obj = get_recipe(recipe)
        result = run_pipeline(self.ir, recipe_obj, self.chip)
        return dataclasses.replace(self, recipe=recipe_obj, result=result, executable=build(result.ir.mod, self.chip))


# -- argument checks ---------------------------------------------------------------------------------

def _require(name: str, value, kinds, what: str) -> None:
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise LowbitArgumentError(f"argument {name} must be {what}, got {type(value).__name__} {value!r}")


def _require_count(name: str, value, minimum: int, maximum: int | None = None) -> None:
    _require(name, value, (int,), "a whole number")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise LowbitError(f"argument {name} must be {bound}, got {value}")


def _check_model_arguments(model, recipe, target, max_context, calib, calib_samples, calib_seq_len) -> None:
    _require("model", model, _PATH, "a model name or path")
    _require("recipe", recipe, _PATH, "a recipe name or .toml path")
    _require("target", target, (str,), "a target name")
    if max_context is not None:
        _require_count("max_context", max_context, 2, MAX_CONTEXT_LIMIT)
    _require("calib", calib, _PATH, "a bundled text name or a text file path")
    _require_count("calib_samples", calib_samples, 1, 100_000)
    _require_count("calib_seq_len", calib_seq_len, 2, MAX_CONTEXT_LIMIT)


def _buildable_target(target: str):
    from lowbit.targets import get_target

    chip = get_target(target)
    if not chip.can_build:
        raise LowbitError(f"target {chip.name}: lowbit has no schedule rules for {chip.family} kernels yet; "
                          "compile for an x86 or ARM target (see `lowbit targets`)")
    return chip


def _calibration_text(recipe, calib, calib_samples, calib_seq_len) -> CalibrationText | None:
    if not recipe.needs_calibration:
        return None
    return CalibrationText(str(calib), read_text(str(calib)), calib_samples, calib_seq_len)


# -- building ----------------------------------------------------------------------------------------

def build_model(model: str = DEFAULT_MODEL, recipe: str = DEFAULT_RECIPE, target: str = "host",
                max_context: int | None = None, progress: bool | None = None, calib: str = DEFAULT_CALIB_TEXT,
                calib_samples: int = 64, calib_seq_len: int = 512) -> BuiltModel:
    """Load, import, calibrate (if the recipe needs it), quantize and build ``model`` in memory."""
    _check_model_arguments(model, recipe, target, max_context, calib, calib_samples, calib_seq_len)
    recipe_obj = get_recipe(str(recipe))
    chip = _buildable_target(target)
    calibration_text = _calibration_text(recipe_obj, calib, calib_samples, calib_seq_len)
    stages = Stages(4 + recipe_obj.needs_calibration, progress)
    try:
        return _build(str(model), recipe_obj, chip, max_context, calibration_text, stages, progress)
    finally:
        stages.close()


def _build(model: str, recipe, chip, max_context, calibration_text, stages: Stages, progress) -> BuiltModel:
    from lowbit.codegen.build import build

    with stages.stage(f"loading {model}"):
        source = resolve_model(model)
    with stages.stage("importing into TVM Relax"):
        ir, tokenizer_folder, eos = _import(source, max_context)
        check_layer_patterns(recipe, ir)
        _check_tokenizer(tokenizer_folder, ir.vocab_size, source.name)
    calibration = None
    if calibration_text is not None:
        with stages.stage(f"calibrating on {calibration_text.name}"):
            calibration = _calibrate(ir, chip, tokenizer_folder, calibration_text, progress)
    with stages.stage(f"applying {recipe.name}"), bar(len(ir.params), "quantizing", progress) as quantized:
        result = run_pipeline(ir, recipe, chip, calibration, quantized)
    with stages.stage(f"building for {chip.name}"):
        executable = build(result.ir.mod, chip)
    return BuiltModel(source, recipe, chip, ir, result, executable, tokenizer_folder, eos)


def compile(model: str = DEFAULT_MODEL, recipe: str = DEFAULT_RECIPE, target: str = "host",
            output: str | Path | None = None, max_context: int | None = None,
            progress: bool | None = None, calib: str = DEFAULT_CALIB_TEXT, calib_samples: int = 64,
            calib_seq_len: int = 512) -> CompileResult:
    """Compile ``model`` (a name, HF folder, .gguf or .onnx) with ``recipe`` for ``target`` into ``output``.

    Recipes that need calibration (GPTQ, AWQ, SmoothQuant, static activation scales, ``keep=autoN``)
    read ``calib_samples`` windows of ``calib_seq_len`` tokens of ``calib`` (a bundled text name or a
    UTF-8 file; the default is disjoint from ``lowbit eval``'s). ``output`` may not exist yet or be
    a lowbit artifact, which is replaced; anything else is refused before any work.
    """
    started = time.perf_counter()
    _check_model_arguments(model, recipe, target, max_context, calib, calib_samples, calib_seq_len)
    if output is not None:
        _require("output", output, _PATH, "a folder path")
    recipe_obj = get_recipe(str(recipe))
    chip = _buildable_target(target)
    library_compiler = chip.library_compiler()  # a missing cross compiler fails before the work
    output = check_output(Path(output) if output is not None else _default_output(model, recipe_obj.name))
    remove_stale_temporaries(output)
    calibration_text = _calibration_text(recipe_obj, calib, calib_samples, calib_seq_len)
    stages = Stages(5 + recipe_obj.needs_calibration, progress)
    try:
        built = _build(str(model), recipe_obj, chip, max_context, calibration_text, stages, progress)
        with stages.stage(f"writing {output}"):
            write_artifact(output, built.executable, built.result.ir.params, built.manifest, built.tokenizer_folder,
                           library_compiler)
    finally:
        stages.close()
    return CompileResult(output=output, recipe=built.recipe.name, target=built.chip.name,
                         seconds=time.perf_counter() - started, weight_bytes=built.result.ir.param_bytes(),
                         layers=built.result.layers)


def _default_output(model, recipe_name: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{Path(str(model)).stem}-{recipe_name}")
    return Path("out") / stem.lstrip(".")


def _calibrate(ir, chip, tokenizer_folder, calibration_text: CalibrationText, progress) -> Calibration:
    """Calibration over the text's windows: the statistics, a recalibration with other weights
    (GPTQ's stages) and an output probe on the first window, built when first asked."""
    from .calibration import Calibrator, calibration_samples
    from .output_probe import OutputProbe

    tokenizer_file = None if tokenizer_folder is None else Path(tokenizer_folder) / "tokenizer.json"
    if tokenizer_file is None or not tokenizer_file.is_file():
        raise LowbitError("calibration needs the model's tokenizer.json next to the model file")
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(calibration_text.text).ids
    windows = calibration_samples(ids, calibration_text.samples, min(calibration_text.seq_len, ir.max_context - 1))
    calibrator = Calibrator(ir, chip, windows)
    with bar(len(windows), "calibration samples", progress) as samples:
        statistics = calibrator.collect(progress=samples)

    def recalibrate(params, layers):
        with bar(len(windows), f"recalibrating {len(layers)} layers", progress) as samples:
            return calibrator.collect(params, layers, samples)

    probe: list[OutputProbe] = []

    def output_kl(name, weight_nk):
        if not probe:
            probe.append(OutputProbe(ir, chip, windows[0]))
        return probe[0].kl(name, weight_nk)

    return Calibration(statistics, recalibrate, output_kl)


def _import(source, max_context):
    """``(ModelIR, tokenizer folder or None, end-of-sequence ids)`` of a resolved model."""
    if isinstance(source, HFModel):
        from .frontend_torch import import_torch_model

        ir = import_torch_model(source.model, max_context)
        return ir, source.folder, _eos_ids(source.model.config.eos_token_id, f"model {source.name}")
    from .frontend_onnx import import_onnx_model

    ir = import_onnx_model(source.path, max_context)
    if source.tokenizer_folder is None:
        warnings.warn(LowbitWarning(
            f"no tokenizer.json next to {source.path}: the artifact takes token ids, not text "
            "(lowbit run --prompt-ids 1,2,3); put the model's tokenizer.json beside the .onnx file to include it"))
    return ir, source.tokenizer_folder, _onnx_eos(Path(source.path))


def _eos_ids(value, where: str) -> list[int]:
    if value is None:
        return []
    values = [value] if isinstance(value, int) else value
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in values):
        raise LowbitError(f"{where}: eos_token_id {value!r} is not a token id or a list of them")
    return list(values)


def _onnx_eos(path: Path) -> list[int]:
    """End-of-sequence ids from ``generation_config.json`` or ``config.json`` beside an ONNX file
    (optimum and ONNX Runtime GenAI exports ship them there)."""
    for name in ("generation_config.json", "config.json"):
        config_path = path.parent / name
        if not config_path.is_file():
            continue
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise LowbitError(f"{config_path} (next to {path.name}) is not valid JSON ({exc})") from None
        if isinstance(config, dict) and config.get("eos_token_id") is not None:
            return _eos_ids(config["eos_token_id"], str(config_path))
    return []


def _check_tokenizer(tokenizer_folder, vocab_size: int, model_name: str) -> None:
    """A tokenizer whose ids reach past the embedding table would index out of it: refuse it now."""
    if tokenizer_folder is None or not (Path(tokenizer_folder) / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer

    path = Path(tokenizer_folder) / "tokenizer.json"
    try:
        size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises its own exception type for any bad file
        raise LowbitError(f"tokenizer {path} cannot be read ({exc})") from None
    if size > vocab_size:
        raise LowbitError(f"tokenizer {path} has {size} tokens but model {model_name} embeds only {vocab_size}; "
                          "its ids would read past the embedding table: use the model's own tokenizer")


def _manifest(source, recipe, chip, result, eos: list[int]) -> dict:
    ir = result.ir
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
        "eos_token_ids": [i for i in eos if i < ir.vocab_size],
        "weight_bytes": ir.param_bytes(),
        "layers": result.layers,
    }


def load(path: str | Path, trusted_keys=None) -> Session:
    """Verify and load an artifact directory; returns a :class:`Session`.

    ``trusted_keys``: ed25519 public keys (PEM files or raw bytes); when given, the artifact must be
    signed by one of them (``lowbit sign``) or nothing of it is loaded.
    """
    _require("path", path, _PATH, "an artifact folder path")
    if trusted_keys is not None:
        _require("trusted_keys", trusted_keys, (list, tuple), "a list of public keys")
    return Session(path, trusted_keys)


def evaluate(model: str, recipe: str | None = None, target: str = "host", text: str = DEFAULT_EVAL_TEXT,
             tokens: int = 4096, window: int = 512, reference: str | None = None, progress: bool | None = None,
             calib: str = DEFAULT_CALIB_TEXT, calib_samples: int = 64, calib_seq_len: int = 512,
             trusted_keys=None) -> dict:
    """Perplexity of an artifact directory, or of a model under ``recipe`` built in memory.

    A model evaluated under a quantized recipe is compared with its own fp32 build on the same
    windows (``kl_vs_float``, ``top1_agreement``); an artifact is compared with ``reference`` (an
    fp32 artifact directory or a model) when given. See :mod:`lowbit.compiler.evaluate`.
    """
    from .evaluate import evaluate_session, windows

    _require("text", text, _PATH, "a bundled text name or a text file path")
    _require_count("tokens", tokens, 2)
    _require_count("window", window, 1)
    text_ids_source = read_text(str(text))  # a bad text fails before any model work
    if _is_artifact(model):
        if recipe is not None:
            raise LowbitError(f"{model} is an artifact, already compiled with its recipe; drop -r/--recipe")
        session = load(model, trusted_keys)
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
    ids = session.encode(text_ids_source)[: tokens + 1]
    if len(ids) - 1 < tokens:
        warnings.warn(LowbitWarning(f"text {text} has only {len(ids)} tokens: scoring {max(len(ids) - 1, 0)} of the "
                                    f"{tokens} asked for; the perplexity of a short text is a rough figure"))
    window = min(window, session.max_context - 1)
    with bar(len(windows(ids, window)), "evaluating", progress) as evaluated:
        result = evaluate_session(session, ids, window, reference_session, evaluated)
    return dict(result.as_dict(), recipe=recipe_name, text=str(text), requested_tokens=tokens)


def _is_artifact(path) -> bool:
    return isinstance(path, _PATH) and (Path(path) / MANIFEST).is_file()


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

    _check_model_arguments(model, recipe, target, None, calib, calib_samples, calib_seq_len)
    recipe_obj = get_recipe(str(recipe))
    if recipe_obj.weights is None:
        raise LowbitError(f"recipe {recipe_obj.name} quantizes nothing; analyze a quantized recipe")
    chip = _buildable_target(target)
    calibration_text = CalibrationText(str(calib), read_text(str(calib)), calib_samples, calib_seq_len)
    stages = Stages(4, progress)
    try:
        with stages.stage(f"loading {model}"):
            source = resolve_model(str(model))
        with stages.stage("importing into TVM Relax"):
            ir, tokenizer_folder, _ = _import(source, None)
            check_layer_patterns(recipe_obj, ir)
        with stages.stage(f"calibrating on {calib}"):
            calibration = _calibrate(ir, chip, tokenizer_folder, calibration_text, progress)
        linears = find_linears(ir.mod["prefill"])
        with stages.stage("measuring each layer"), bar(len(linears), "layers", progress) as measured:
            ranked = rank_layers(linears, ir.params, calibration.statistics, recipe_obj, calibration.output_kl,
                                 measured)
    finally:
        stages.close()
    tokens = next(iter(calibration.statistics.values())).tokens
    return {"model": source.name, "recipe": recipe_obj.name, "calibration_tokens": tokens,
            "layers": [{"layer": e.layer, "relative_error": e.relative_error}
                       | ({} if e.output_kl is None else {"output_kl": e.output_kl}) for e in ranked]}
