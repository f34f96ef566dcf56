"""The artifact: a directory written atomically, verified before anything in it is loaded.

Layout::

    manifest.json         format version, model, recipe, target, I/O signature, KV layout, per-layer
                          formats, every weight's shape and dtype, sha256 and size of every other file
    model.so              the compiled library (Relax VM executable + kernels)
    weights.safetensors   packed low-bit weights, scales, remaining float weights (never pickle)
    tokenizer.json ...    the tokenizer files, when the model has them
    manifest.sig          optional: ed25519 signatures over manifest.json (:mod:`.signing`)

Guarantees:

* The directory is written under a temporary name next to the destination (``.NAME.tmp-PID-*``) and
  renamed into place, so an interrupted or failed compile leaves nothing at the destination; a later
  compile to the same destination removes temporaries whose process is gone (a ``kill -9``).
* An existing destination is replaced only if it is a lowbit artifact: a valid manifest whose file
  list names only files lowbit writes, and nothing else in the directory. Anything else is an error
  before any work is done (:func:`check_output`), and only files lowbit wrote are ever deleted.
* :func:`read_manifest` accepts only plain file names inside the artifact, every file listed and
  checked (size and sha256), nothing unlisted, no links: checksums catch corruption, not an attacker
  who rewrites the manifest (that is what signatures are for).
* Files and folders get the permissions the user's umask gives any new file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from lowbit.codegen.errors import LowbitError
from .manifest import FORMAT_VERSION, validate_manifest

MANIFEST = "manifest.json"
SIGNATURES = "manifest.sig"
LIBRARY = "model.so"
WEIGHTS = "weights.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
WRITTEN_FILES = frozenset((LIBRARY, WEIGHTS, *TOKENIZER_FILES))  # what a compile lists in the manifest
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]+")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output(out_dir: Path) -> Path:
    """Fail now, before any work, if ``out_dir`` cannot receive an artifact; returns it resolved.

    It may not exist yet (its nearest existing ancestor must be a writable folder), or it may be a
    lowbit artifact, which the compile will replace. Anything else is the user's and is refused.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise LowbitError(f"output {out_dir} exists and is not a folder; pick another -o")
    if out_dir.exists():
        _check_replaceable(out_dir)
        if not os.access(out_dir.parent, os.W_OK | os.X_OK):
            raise LowbitError(f"output {out_dir}: its folder {out_dir.parent} is not writable; pick another -o")
        return out_dir
    ancestor = out_dir.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LowbitError(f"output {out_dir}: {ancestor} is a file, not a folder; pick another -o")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LowbitError(f"output {out_dir}: the folder {ancestor} is not writable; pick another -o")
    return out_dir


def _check_replaceable(out_dir: Path) -> None:
    """Raise unless ``out_dir`` holds exactly a lowbit artifact's files (see the module docstring)."""
    refuse = f"output {out_dir} exists and is not a lowbit artifact"
    advice = "lowbit only replaces an artifact it wrote; remove it yourself or pick another -o"
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        listed = set(manifest["files"]) if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) \
            else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError):
        listed = None
    if listed is None or not listed <= WRITTEN_FILES:
        raise LowbitError(f"{refuse} (no valid {MANIFEST}); {advice}")
    foreign = sorted(p.name for p in out_dir.iterdir()
                     if p.name not in listed | {MANIFEST, SIGNATURES} or p.is_symlink() or not p.is_file())
    if foreign:
        raise LowbitError(f"{refuse}: it also holds {', '.join(foreign[:5])}, which lowbit did not write; {advice}")


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove the ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` folders of ``out_dir`` whose process is
    gone (a compile killed while writing); returns what was removed."""
    out_dir = Path(out_dir).absolute()
    if not out_dir.parent.is_dir():
        return []
    removed = []
    for entry in out_dir.parent.iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or match["name"] != out_dir.name or entry.is_symlink() or not entry.is_dir():
            continue
        if _process_alive(int(match["pid"])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _new_temporary(out_dir: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.{kind}-{os.getpid()}-"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_artifact(out_dir: Path, executable, params: dict, manifest: dict, tokenizer_folder: Path | None,
                   library_compiler=None) -> Path:
    """Write everything into a temp dir beside ``out_dir``, then swap it into place.

    ``library_compiler``: links ``model.so`` (a cross compiler for another chip; default the host's).
    """
    from safetensors.numpy import save_file

    out_dir = check_output(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temporary(out_dir, "tmp")
    except OSError as exc:
        raise LowbitError(f"output {out_dir}: cannot create it ({exc.strerror}); pick another -o") from None
    try:
        try:
            executable.export_library(str(tmp / LIBRARY), fcompile=library_compiler)
        except RuntimeError as exc:  # the C++ compiler's own message, e.g. a linker for the wrong chip
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise LowbitError(f"linking {LIBRARY} failed: {' | '.join(lines[-3:])}") from None
        save_file(dict(params), str(tmp / WEIGHTS))
        if tokenizer_folder is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_folder) / name).is_file():
                    shutil.copyfile(Path(tokenizer_folder) / name, tmp / name)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = dict(manifest, format_version=FORMAT_VERSION,
                        weights=[{"name": n, "shape": list(a.shape), "dtype": str(a.dtype)} for n, a in params.items()])
        manifest["files"] = {name: {"sha256": sha256_of(tmp / name), "bytes": (tmp / name).stat().st_size}
                             for name in files}
        validate_manifest(manifest, "the new artifact")  # what we write, we can read back
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        mask = _umask()
        for path in tmp.iterdir():
            path.chmod(0o666 & ~mask)
        tmp.chmod(0o777 & ~mask)
        _swap_into_place(tmp, out_dir)
    except OSError as exc:  # a full disk, a vanished folder: nothing of the new artifact stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise LowbitError(f"writing the artifact {out_dir} failed ({exc.strerror or exc}); nothing was written") \
            from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    _check_replaceable(out_dir)  # again: the folder may have changed while we compiled
    old = _new_temporary(out_dir, "old")
    os.replace(out_dir, old / "artifact")
    os.replace(tmp, out_dir)
    _remove_artifact(old / "artifact")
    old.rmdir()


def _remove_artifact(folder: Path) -> None:
    """Delete an artifact lowbit wrote, file by file: only the files it lists, then the folder."""
    listed = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    for name in [*listed, SIGNATURES, MANIFEST]:
        if name in WRITTEN_FILES | {SIGNATURES, MANIFEST}:
            (folder / name).unlink(missing_ok=True)
    folder.rmdir()


def read_manifest(artifact_dir: Path, trusted_keys=None) -> dict:
    """Read and verify an artifact: a valid manifest, every listed file present, unchanged, and
    nothing unlisted (see the module docstring). Loads no code.

    ``trusted_keys`` (PEM public key files or raw ed25519 keys): when given, the manifest must also
    carry a valid signature by one of them (:mod:`.signing`), checked on the bytes read here.
    """
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise LowbitError(f"artifact {artifact_dir} does not exist (compile one with `lowbit compile`)")
    manifest_path = artifact_dir / MANIFEST
    if not manifest_path.is_file() or manifest_path.is_symlink():
        raise LowbitError(f"artifact {artifact_dir}: {MANIFEST} is missing; it is not a lowbit artifact")
    message = manifest_path.read_bytes()
    if trusted_keys is not None:
        from .signing import require_signature

        require_signature(artifact_dir, message, trusted_keys)
    try:
        manifest = json.loads(message.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise LowbitError(f"artifact {artifact_dir}: {MANIFEST} is not valid JSON ({exc}); recompile it") from None
    validate_manifest(manifest, f"artifact {artifact_dir}")
    files = manifest["files"]
    for name in files:
        if not _PLAIN_NAME.fullmatch(name) or name in (MANIFEST, SIGNATURES):
            raise LowbitError(f"artifact {artifact_dir}: {MANIFEST} lists the file {name!r}; an artifact lists "
                              "plain file names inside its own folder only; recompile it")
    for required in (LIBRARY, WEIGHTS):
        if required not in files:
            raise LowbitError(f"artifact {artifact_dir}: {MANIFEST} does not list {required}; recompile it")
    present = {p.name: p for p in artifact_dir.iterdir()}
    unlisted = sorted(set(present) - set(files) - {MANIFEST, SIGNATURES})
    if unlisted:
        raise LowbitError(f"artifact {artifact_dir}: {', '.join(unlisted[:5])} not listed in {MANIFEST}; an "
                          "artifact holds only the files its manifest lists; remove them or recompile")
    for name, entry in files.items():
        path = present.get(name)
        if path is None:
            raise LowbitError(f"artifact {artifact_dir}: file {name} is missing; recompile the artifact")
        mode = path.lstat().st_mode
        if not stat.S_ISREG(mode):
            raise LowbitError(f"artifact {artifact_dir}: {name} is not a regular file (a link or folder); "
                              "recompile the artifact")
        if path.stat().st_size != entry["bytes"] or sha256_of(path) != entry["sha256"]:
            raise LowbitError(
                f"artifact {artifact_dir}: file {name} does not match its checksum in {MANIFEST} "
                "(changed or corrupted); recompile the artifact"
            )
    return manifest
