"""The artifact: a directory written atomically, verified before anything in it is loaded.

Layout::

    manifest.json         format version, model, recipe, target, I/O signature, KV layout, per-layer
                          formats, sha256 and size of every other file
    model.so              the compiled library (Relax VM executable + kernels)
    weights.safetensors   packed low-bit weights, scales, remaining float weights (never pickle)
    tokenizer.json ...    the tokenizer files, when the model has them

The directory is written under a temporary name next to the destination and renamed into place, so
an interrupted or failed compile leaves nothing at the destination.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import LowbitError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"
WEIGHTS = "weights.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_artifact(out_dir: Path, executable, params: dict, manifest: dict, tokenizer_folder: Path | None,
                   library_compiler=None) -> Path:
    """Write everything into a temp dir beside ``out_dir``, then swap it into place.

    ``library_compiler``: links ``model.so`` (a cross compiler for another chip; default the host's).
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        try:
            executable.export_library(str(tmp / LIBRARY), fcompile=library_compiler)
        except RuntimeError as exc:  # the C++ compiler's own message, e.g. a linker for the wrong chip
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise LowbitError(f"linking {LIBRARY} failed: {' | '.join(lines[-3:])}") from None
        save_file({k: v for k, v in params.items()}, str(tmp / WEIGHTS))
        if tokenizer_folder is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_folder) / name).is_file():
                    shutil.copy2(Path(tokenizer_folder) / name, tmp / name)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = dict(manifest, format_version=FORMAT_VERSION, weight_names=list(params))
        manifest["files"] = {name: {"sha256": sha256_of(tmp / name), "bytes": (tmp / name).stat().st_size}
                             for name in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    if not (out_dir / MANIFEST).is_file():
        raise LowbitError(f"output {out_dir} exists and is not a lowbit artifact; remove it or pick another -o")
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.replace(out_dir, old / "artifact")
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(artifact_dir: Path) -> dict:
    """Read and verify an artifact: every listed file present, unchanged, and nothing unlisted."""
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise LowbitError(f"artifact {artifact_dir} does not exist (compile one with `lowbit compile`)")
    manifest_path = artifact_dir / MANIFEST
    if not manifest_path.is_file():
        raise LowbitError(f"artifact {artifact_dir}: {MANIFEST} is missing; it is not a lowbit artifact")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LowbitError(f"artifact {artifact_dir}: {MANIFEST} is not valid JSON ({exc})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise LowbitError(
            f"artifact {artifact_dir}: format version {version} is not supported by this lowbit "
            f"(reads version {FORMAT_VERSION}); recompile it"
        )
    for name, entry in manifest.get("files", {}).items():
        path = artifact_dir / name
        if not path.is_file():
            raise LowbitError(f"artifact {artifact_dir}: file {name} is missing; recompile the artifact")
        if path.stat().st_size != entry["bytes"] or sha256_of(path) != entry["sha256"]:
            raise LowbitError(
                f"artifact {artifact_dir}: file {name} does not match its checksum in {MANIFEST} "
                "(changed or corrupted); recompile the artifact"
            )
    for required in (LIBRARY, WEIGHTS):
        if required not in manifest.get("files", {}):
            raise LowbitError(f"artifact {artifact_dir}: {MANIFEST} does not list {required}; recompile it")
    return manifest
