"""The Python API: ``compile`` a model into an artifact, ``build`` one in memory, ``load`` an artifact
into a Session, ``evaluate`` and ``analyze``.

Everything that can be checked before the model loads is checked first (argument types and
ranges, the recipe and its options, the target's buildability and linker, the output folder, the
calibration text); what needs the graph (layer patterns, the tokenizer against the embedding table)
is checked right after import, before calibration. Long work reports its stages (:mod:`.progress`).
"""

from __future__ import annotations

import dataclasses
import re
import time
import warnings
from pathlib import Path

from lowbit.codegen.errors import LowbitError, LowbitWarning
from lowbit.targets import get_target

from .building import BuiltModel, prepare
from .calibration import CalibrationText
from .progress import Stages, bar
from .recipes import DEFAULT_RECIPE, get_recipe
from .runtime.artifact import MANIFEST, check_output, remove_stale_temporaries
from .runtime.loading import MAX_CONTEXT_LIMIT, PATH, load, require, require_count
from .runtime.session import Session
from .sources.models import DEFAULT_MODEL
from .sources.texts import DEFAULT_CALIB_TEXT, DEFAULT_EVAL_TEXT, read_text

KV_EVAL_CHUNK = 64  # tokens per call when a quantized KV cache is evaluated


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


# -- argument checks ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Plan:
    """A build's inputs, checked before any model work."""

    model: str
    recipe: object
    chip: object
    max_context: int | None
    calibration: CalibrationText | None


def _plan(model, recipe, target, max_context, calib, calib_samples, calib_seq_len, calibrate=None) -> _Plan:
    require("model", model, PATH, "a model name or path")
    require("recipe", recipe, PATH, "a recipe name or .toml path")
    require("target", target, (str,), "a target name")
    if max_context is not None:
        require_count("max_context", max_context, 2, MAX_CONTEXT_LIMIT)
    require("calib", calib, PATH, "a bundled text name or a text file path")
    require_count("calib_samples", calib_samples, 1, 100_000)
    require_count("calib_seq_len", calib_seq_len, 2, MAX_CONTEXT_LIMIT)
    recipe_obj = get_recipe(str(recipe))
    chip = get_target(target)
    if not chip.can_build:
        raise LowbitError(f"target {chip.name}: lowbit has no schedule rules for {chip.family} kernels yet; "
                          "compile for an x86 or ARM target (see `lowbit targets`)")
    needs_text = recipe_obj.needs_calibration if calibrate is None else calibrate
    calibration = CalibrationText(str(calib), read_text(str(calib)), calib_samples, calib_seq_len) \
        if needs_text else None
    return _Plan(str(model), recipe_obj, chip, max_context, calibration)


def _built(plan: _Plan, stages: Stages, progress) -> BuiltModel:
    prepared = prepare(plan.model, plan.recipe, plan.max_context, plan.calibration, stages, progress)
    return prepared.build(plan.recipe, plan.chip, progress, stages)


# -- the API ---------------------------------------------------------------------------------------------

def build(model: str = DEFAULT_MODEL, recipe: str = DEFAULT_RECIPE, target: str = "host",
          max_context: int | None = None, progress: bool | None = None, calib: str = DEFAULT_CALIB_TEXT,
          calib_samples: int = 64, calib_seq_len: int = 512) -> BuiltModel:
    """Load, import, calibrate (if the recipe needs it, on the host), quantize and build ``model``
    in memory; ``.session()`` runs it, ``.save(dir)`` writes the artifact."""
    plan = _plan(model, recipe, target, max_context, calib, calib_samples, calib_seq_len)
    stages = Stages(4 + (plan.calibration is not None), progress)
    try:
        return _built(plan, stages, progress)
    finally:
        stages.close()


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
    plan = _plan(model, recipe, target, max_context, calib, calib_samples, calib_seq_len)
    if output is not None:
        require("output", output, PATH, "a folder path")
    plan.chip.library_compiler()  # a missing cross compiler fails before the work
    output = check_output(Path(output) if output is not None else _default_output(model, plan.recipe.name))
    remove_stale_temporaries(output)
    stages = Stages(5 + (plan.calibration is not None), progress)
    try:
        built = _built(plan, stages, progress)
        with stages.stage(f"writing {output}"):
            built.save(output)
    finally:
        stages.close()
    return CompileResult(output=output, recipe=built.recipe.name, target=built.chip.name,
                         seconds=time.perf_counter() - started, weight_bytes=built.result.ir.param_bytes(),
                         layers=built.result.layers)


def _default_output(model, recipe_name: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{Path(str(model)).stem}-{recipe_name}")
    return Path("out") / stem.lstrip(".")


def explain(recipe: str = DEFAULT_RECIPE) -> list[dict]:
    """The pipeline steps ``recipe`` runs, in order: each one's requirements, guarantees and whether
    it needs calibration (``lowbit compile --explain``); nothing is loaded."""
    from .pipeline import build_steps

    require("recipe", recipe, PATH, "a recipe name or .toml path")
    return [step.describe() for step in build_steps(get_recipe(str(recipe)))]


def evaluate(model: str, recipe: str | None = None, target: str = "host", text: str = DEFAULT_EVAL_TEXT,
             tokens: int = 4096, window: int = 512, reference: str | None = None, progress: bool | None = None,
             calib: str = DEFAULT_CALIB_TEXT, calib_samples: int = 64, calib_seq_len: int = 512,
             trusted_keys=None, chunk: int | None = None) -> dict:
    """Perplexity of an artifact directory, or of a model under ``recipe`` built in memory.

    A model evaluated under a quantized recipe is compared with its own fp32 build on the same
    windows (``kl_vs_float``, ``top1_agreement``); an artifact is compared with ``reference`` (an
    fp32 artifact directory or a model) when given. See :mod:`lowbit.compiler.runtime.evaluation`.
    ``chunk``: tokens fed per call within a window; by default ``KV_EVAL_CHUNK`` when the model's KV
    cache is quantized (every later token attends through the quantized cache), else the whole
    window. A model under a ``+kv`` recipe is also scored with the same recipe on a float cache
    (``kv_perplexity_gap``), on the same protocol.
    """
    from .runtime.evaluation import evaluate_session, windows

    require("text", text, PATH, "a bundled text name or a text file path")
    require_count("tokens", tokens, 2)
    require_count("window", window, 1)
    if chunk is not None:
        require_count("chunk", chunk, 1)
    text_content = read_text(str(text))  # a bad text fails before any model work
    if _is_artifact(model):
        if recipe is not None:
            raise LowbitError(f"{model} is an artifact, already compiled with its recipe; drop -r/--recipe")
        session = load(model, trusted_keys)
        recipe_name = session.manifest["recipe"]["name"]
        reference_session = None if reference is None else _reference_session(reference, target)
        cache_baseline = None
    else:
        plan = _plan(model, recipe or "fp32", target, None, calib, calib_samples, calib_seq_len)
        stages = Stages(4 + (plan.calibration is not None), progress)
        try:
            prepared = prepare(plan.model, plan.recipe, None, plan.calibration, stages, progress)
            built = prepared.build(plan.recipe, plan.chip, progress, stages)
        finally:
            stages.close()
        session, recipe_name = built.session(), built.recipe.name
        reference_session = None
        if reference is not None:
            reference_session = _reference_session(reference, target)
        elif built.recipe.weights is not None or built.recipe.kv is not None:
            reference_session = prepared.build(get_recipe("fp32"), plan.chip).session()
        cache_baseline = None
        if built.recipe.kv is not None:
            float_cache = dataclasses.replace(built.recipe, kv=None, name=f"{built.recipe.name} on a float cache")
            cache_baseline = prepared.build(float_cache, plan.chip).session()
    ids = session.encode(text_content)[: tokens + 1]
    if len(ids) - 1 < tokens:
        warnings.warn(LowbitWarning(f"text {text} has only {len(ids)} tokens: scoring {max(len(ids) - 1, 0)} of the "
                                    f"{tokens} asked for; the perplexity of a short text is a rough figure"))
    window = min(window, session.max_context - 1)
    kv = session.kv_report(window)
    if chunk is None and kv["kv_scheme"] != "float32":
        chunk = KV_EVAL_CHUNK
    with bar(len(windows(ids, window)) * (1 + (cache_baseline is not None)), "evaluating", progress) as evaluated:
        result = evaluate_session(session, ids, window, reference_session, evaluated, chunk)
        out = dict(result.as_dict(), recipe=recipe_name, text=str(text), requested_tokens=tokens, **kv)
        if cache_baseline is not None:
            baseline = evaluate_session(cache_baseline, ids, window, None, evaluated, chunk).perplexity
            out |= {"kv_baseline_perplexity": round(baseline, 4),
                    "kv_perplexity_gap": round(result.perplexity / baseline - 1, 4)}
    return out


def _is_artifact(path) -> bool:
    return isinstance(path, PATH) and (Path(path) / MANIFEST).is_file()


def _reference_session(reference: str, target: str) -> Session:
    if _is_artifact(reference):
        return load(reference)
    return build(reference, "fp32", target).session()


def analyze(model: str, recipe: str = "w8a8-naive", target: str = "host", progress: bool | None = None,
            calib: str = DEFAULT_CALIB_TEXT, calib_samples: int = 8, calib_seq_len: int = 512) -> dict:
    """Rank ``model``'s linear layers by the output error ``recipe``'s quantization causes, worst first.

    See :mod:`lowbit.passes.sensitivity`; ``keep=autoN`` keeps the first ``N`` of this ranking.
    """
    from lowbit.passes.linear_match import find_linears
    from lowbit.passes.sensitivity import rank_layers

    plan = _plan(model, recipe, target, None, calib, calib_samples, calib_seq_len, calibrate=True)
    if plan.recipe.weights is None:
        raise LowbitError(f"recipe {plan.recipe.name} quantizes nothing; analyze a quantized recipe")
    stages = Stages(4, progress)
    try:
        prepared = prepare(plan.model, plan.recipe, None, plan.calibration, stages, progress)
        linears = find_linears(prepared.ir.mod["prefill"])
        calibration = prepared.calibration
        with stages.stage("measuring each layer"), bar(len(linears), "layers", progress) as measured:
            ranked = rank_layers(linears, prepared.ir.params, calibration.statistics, plan.recipe,
                                 calibration.output_kl, measured)
    finally:
        stages.close()
    tokens = next(iter(calibration.statistics.values())).tokens
    return {"model": prepared.source.name, "recipe": plan.recipe.name, "calibration_tokens": tokens,
            "layers": [{"layer": e.layer, "relative_error": e.relative_error}
                       | ({} if e.output_kl is None else {"output_kl": e.output_kl}) for e in ranked]}
