"""Frontends: a Hugging Face model (through ``torch.export``) or an ONNX decoder, into one
:class:`~lowbit.passes.model_ir.ModelIR` that every pass reads the same way."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from lowbit.codegen.errors import LowbitError, LowbitWarning

from ..sources.models import HFModel


def import_model(source, max_context: int | None):
    """``(ModelIR, tokenizer folder or None, end-of-sequence ids)`` of a resolved model source."""
    if isinstance(source, HFModel):
        from .torch_export import import_torch_model

        ir = import_torch_model(source.model, max_context)
        return ir, source.folder, eos_ids(source.model.config.eos_token_id, f"model {source.name}")
    from .onnx_file import import_onnx_model

    ir = import_onnx_model(source.path, max_context)
    if source.tokenizer_folder is None:
        warnings.warn(LowbitWarning(
            f"no tokenizer.json next to {source.path}: the artifact takes token ids, not text "
            "(lowbit run --prompt-ids 1,2,3); put the model's tokenizer.json beside the .onnx file to include it"))
    return ir, source.tokenizer_folder, _onnx_eos(Path(source.path))


def eos_ids(value, where: str) -> list[int]:
    """A config's ``eos_token_id`` (none, one id or a list) as a list of ids."""
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
            return eos_ids(config["eos_token_id"], str(config_path))
    return []
