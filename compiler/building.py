"""Building in memory: a model prepared once (loaded, imported, calibrated on the host), then built
under any recipe for any target, then saved as an artifact or run in a session.

``compile`` is :func:`prepare` + :meth:`PreparedModel.build` + :meth:`BuiltModel.save`; ``lowbit eval
MODEL -r``, ``lowbit analyze``, calibration's output probe, the tests and the benchmarks use the same
objects. Calibration and every measurement during a build run on the host, whatever the
deployment target: only the final build uses the target.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lowbit.codegen.entry_points import ENTRY_FUNCTIONS
from lowbit.codegen.errors import LowbitError
from lowbit.passes.kv_cache import CACHE_LAYOUT
from lowbit.passes.model_ir import ModelIR
from lowbit.passes.recipe import Recipe
from lowbit.targets import build as build_library
from lowbit.targets import get_target

from .calibration import Calibration, CalibrationText, Calibrator, calibration_samples
from .frontend import import_model
from .pipeline import PipelineResult, check_layer_patterns, run_pipeline
from .progress import Stages, bar
from .runtime.artifact import write_artifact
from .runtime.session import Session
from .sources.models import resolve_model


@dataclasses.dataclass
class BuiltModel:
    """A model quantized and built for a target, in memory: what an artifact holds, before writing."""

    source: object
    recipe: Recipe
    chip: object
    result: PipelineResult
    executable: object
    tokenizer_folder: Path | None
    eos: list[int]

    @property
    def manifest(self) -> dict:
        """The artifact's manifest, less what writing adds (weight shapes, file checksums)."""
        ir = self.result.ir
        return {
            "model": {"name": self.source.name, "kind": self.source.kind},
            "recipe": self.recipe.as_dict(),
            "target": self.chip.as_dict(),
            "inputs": ir.input_names,
            "outputs": ir.output_names,
            "entry_functions": list(ENTRY_FUNCTIONS),
            "kv_cache": ir.kv.as_dict() | {"layout": CACHE_LAYOUT} | self.result.cache,
            "vocab_size": ir.vocab_size,
            "max_context": ir.max_context,
            "eos_token_ids": [i for i in self.eos if i < ir.vocab_size],
            "weight_bytes": ir.param_bytes(),
            "layers": self.result.layers,
        }

    def session(self) -> Session:
        """A session on the built module (the target must run on this machine)."""
        if not self.chip.runs_on_this_machine():
            raise LowbitError(f"target {self.chip.name} does not run on this machine; save the artifact and run it "
                              "there")
        tokenizer = None if self.tokenizer_folder is None else Path(self.tokenizer_folder) / "tokenizer.json"
        return Session.in_memory(self.executable, self.result.ir.params, self.manifest,
                                 tokenizer if tokenizer is not None and tokenizer.is_file() else None)

    def save(self, output: str | Path) -> Path:
        """Write the artifact to ``output`` atomically (see :mod:`lowbit.compiler.runtime.artifact`)."""
        return write_artifact(Path(output), self.executable, self.result.ir.params, self.manifest,
                              self.tokenizer_folder, self.chip.library_compiler())


@dataclasses.dataclass
class PreparedModel:
    """A model loaded and imported into Relax (and calibrated when asked), ready to be built."""

    source: object
    ir: ModelIR
    tokenizer_folder: Path | None
    eos: list[int]
    calibration: Calibration | None = None

    def build(self, recipe: Recipe, chip=None, progress: bool | None = False, stages: Stages | None = None,
              merge_siblings: bool = True) -> BuiltModel:
        """Quantize under ``recipe`` and build for ``chip`` (default: the host); ``stages``: the
        caller's stage display (two stages here); ``merge_siblings=False`` keeps one kernel and one
        weight per linear layer (see :class:`~lowbit.passes.quantize_linears.QuantizeLinears`)."""
        chip = chip or get_target("host")
        stages = stages or Stages(2, progress=False)
        with stages.stage(f"applying {recipe.name}"), bar(len(self.ir.params), "quantizing", progress) as quantized:
            result = run_pipeline(self.ir, recipe, chip, self.calibration, quantized, merge_siblings)
        with stages.stage(f"building for {chip.name}"):
            executable = build_library(result.ir.mod, chip)
        return BuiltModel(self.source, recipe, chip, result, executable, self.tokenizer_folder, self.eos)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's tokenizer."""
        from tokenizers import Tokenizer

        tokenizer_file = None if self.tokenizer_folder is None else Path(self.tokenizer_folder) / "tokenizer.json"
        if tokenizer_file is None or not tokenizer_file.is_file():
            raise LowbitError(f"model {self.source.name} has no tokenizer.json next to it; calibration and "
                              "evaluation on text need one")
        return Tokenizer.from_file(str(tokenizer_file)).encode(text).ids

    def calibrated(self, text: CalibrationText, progress: bool | None = False) -> "PreparedModel":
        """The same model with a :class:`Calibration` on ``text``: statistics now; a recalibration
        with other weights (GPTQ's stages) and an output probe on the first window when first asked."""
        windows = calibration_samples(self.tokenize(text.text), text.samples,
                                      min(text.seq_len, self.ir.max_context - 1))
        return self.calibrated_on_ids(windows, text.probe_tokens, progress)

    def calibrated_on_ids(self, windows: list[list[int]], probe_tokens: int = 256,
                          progress: bool | None = False) -> "PreparedModel":
        """The same model with a :class:`Calibration` on ``windows`` (lists of token ids, each shorter
        than the model's context): what :meth:`calibrated` does once the text is cut into windows.
        A model without a tokenizer (an ONNX file, a test's random model) calibrates this way."""
        from .output_probe import OutputProbe

        if not windows or any(len(w) < 2 or len(w) >= self.ir.max_context for w in windows):
            raise LowbitError(f"calibration windows must be 2 to {self.ir.max_context - 1} tokens each, got "
                              f"{[len(w) for w in windows]}")
        calibrator = Calibrator(self.ir, windows)
        with bar(len(windows), "calibration samples", progress) as samples:
            statistics = calibrator.collect(progress=samples)

        def recalibrate(params, layers):
            with bar(len(windows), f"recalibrating {len(layers)} layers", progress) as samples:
                return calibrator.collect(params, layers, samples)

        probe: list[OutputProbe] = []

        def output_kl(name, weight_nk):
            if not probe:
                float_model = self.build(Recipe("fp32"), merge_siblings=False)  # each layer replaceable
                probe.append(OutputProbe(float_model.session(), windows[0][:probe_tokens]))
            return probe[0].kl(name, weight_nk)

        return dataclasses.replace(self, calibration=Calibration(statistics, recalibrate, output_kl))


def prepare(model: str, recipe: Recipe | None = None, max_context: int | None = None,
            calibration: CalibrationText | None = None, stages: Stages | None = None,
            progress: bool | None = False) -> PreparedModel:
    """Load and import ``model``, check ``recipe``'s layer patterns against it, and calibrate on
    ``calibration`` if given. ``stages``: the caller's stage display, one stage per step here."""
    stages = stages or Stages(2 + (calibration is not None), progress=False)
    with stages.stage(f"loading {model}"):
        source = resolve_model(str(model))
    with stages.stage("importing into TVM Relax"):
        ir, tokenizer_folder, eos = import_model(source, max_context)
        if recipe is not None:
            check_layer_patterns(recipe, ir)
        _check_tokenizer(tokenizer_folder, ir.vocab_size, source.name)
    prepared = PreparedModel(source, ir, tokenizer_folder, eos)
    if calibration is not None:
        with stages.stage(f"calibrating on {calibration.name}"):
            prepared = prepared.calibrated(calibration, progress)
    return prepared


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
