"""Real public-domain English text, fetched by pinned package version and checked by sha256.

The Canterbury corpus ships inside the ``brotli==1.2.1`` source distribution on PyPI. lowbit
downloads that sdist once with pip, verifies the archive's and each text file's sha256, and caches
the texts under ``$LOWBIT_CACHE/text``. Evaluation and calibration use different files, so their
samples never overlap.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lowbit.codegen.errors import LowbitError
from .cache import cache_dir, filling

SDIST = "brotli==1.2.1"
SDIST_FILE = "brotli-1.2.1.tar.gz"
SDIST_SHA256 = "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de"
TEXTS = {
    # name: (path inside the sdist, sha256)
    "alice29": ("brotli-1.2.1/tests/testdata/alice29.txt",
                "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0"),
    "asyoulik": ("brotli-1.2.1/tests/testdata/asyoulik.txt",
                 "eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc"),
    "lcet10": ("brotli-1.2.1/tests/testdata/lcet10.txt",
               "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f"),
    "plrabn12": ("brotli-1.2.1/tests/testdata/plrabn12.txt",
                 "07e2e0b461af78c7c647cb53dab39de560198e16f799b4516eccf0fbd69f764c"),
}
DEFAULT_EVAL_TEXT = "alice29"  # Lewis Carroll, Alice's Adventures in Wonderland
DEFAULT_CALIB_TEXT = "lcet10"  # a disjoint text for calibration


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_path(name: str) -> Path:
    """The cached, verified text ``name`` (one of :data:`TEXTS`), fetching the sdist if needed."""
    if name not in TEXTS:
        raise LowbitError(f"unknown bundled text {name!r}; choose one of {', '.join(TEXTS)} or pass a file")
    folder = cache_dir() / "text"
    path = folder / f"{name}.txt"
    if _verified(path, name):
        return path
    with filling(folder):
        if not _verified(path, name):
            _fetch_all(folder)
    return path


def _verified(path: Path, name: str) -> bool:
    return path.is_file() and _sha256(path.read_bytes()) == TEXTS[name][1]


def _fetch_all(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               SDIST, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archive = Path(tmp) / SDIST_FILE
        if done.returncode != 0 or not archive.is_file():
            raise LowbitError(f"could not download {SDIST} from PyPI for the bundled text: {done.stderr.strip()}")
        if _sha256(archive.read_bytes()) != SDIST_SHA256:
            raise LowbitError(f"{SDIST_FILE} does not match its pinned sha256; refusing to use it")
        with tarfile.open(archive) as tar:
            for name, (member, digest) in TEXTS.items():
                data = tar.extractfile(member).read()
                if _sha256(data) != digest:
                    raise LowbitError(f"{member} in {SDIST_FILE} does not match its pinned sha256")
                staged = folder / f".{name}.txt.tmp-{os.getpid()}"
                staged.write_bytes(data)
                os.replace(staged, folder / f"{name}.txt")


def read_text(spec: str) -> str:
    """A bundled text name or a path to a UTF-8 text file."""
    return read_text_file(text_path(spec) if spec in TEXTS else Path(spec))


def read_text_file(path: Path) -> str:
    """The non-empty UTF-8 text in the file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")  # universal newlines: "\r\n" reads as "\n"
    except UnicodeDecodeError:
        raise LowbitError(f"text file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise LowbitError(f"text file {path} cannot be read ({exc.strerror})") from None
    if not text.strip():
        raise LowbitError(f"text file {path} is empty")
    return text
