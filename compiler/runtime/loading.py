"""Loading an artifact for generation: :func:`load` and the argument checks the API shares.

Imports the runtime only (no compile path), so that a process that only generates text does not
load TVM's compiler or torch (see :func:`runtime_only`)."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from lowbit.codegen.errors import LowbitArgumentError, LowbitError

from .session import Session

MAX_CONTEXT_LIMIT = 1 << 20  # tokens; beyond it every cache and position table is absurd
PATH = (str, os.PathLike)


def require(name: str, value, kinds, what: str) -> None:
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise LowbitArgumentError(f"argument {name} must be {what}, got {type(value).__name__} {value!r}")


def require_count(name: str, value, minimum: int, maximum: int | None = None) -> None:
    require(name, value, (int,), "a whole number")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise LowbitError(f"argument {name} must be {bound}, got {value}")


def load(path: str | Path, trusted_keys=None, context: int | None = None) -> Session:
    """Verify and load an artifact directory; returns a :class:`Session`.

    ``trusted_keys``: ed25519 public keys (PEM files or raw bytes); when given, the artifact must be
    signed by one of them (``lowbit sign``) or nothing of it is loaded. ``context``: allocate the
    KV cache once for that many tokens (default: grown as the conversation needs).
    """
    require("path", path, PATH, "an artifact folder path")
    if trusted_keys is not None:
        require("trusted_keys", trusted_keys, (list, tuple), "a list of public keys")
    if context is not None:
        require_count("context", context, 1, MAX_CONTEXT_LIMIT)
    return Session(path, trusted_keys, context)


def runtime_only() -> None:
    """Make this process load TVM's runtime library only, and not torch, when it has imported
    neither yet: generating from an artifact needs neither TVM's compiler (~300 MB resident once
    loaded) nor torch (which ``tvm_ffi`` imports whenever it is installed). For processes that only
    load artifacts (``lowbit run`` and ``lowbit bench``); a later ``import torch`` in them fails."""
    if "tvm" not in sys.modules and "torch" not in sys.modules:
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
        sys.modules["torch"] = None
    _return_large_buffers()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _return_large_buffers() -> None:
    """Have glibc serve every allocation of 128 KiB or more with its own mapping, returned to the
    system when freed. By default glibc raises that threshold to the size of each large buffer freed
    (up to 32 MiB), after which a prompt's per-chunk buffers come from the heap and stay resident
    (measured, ``lowbit run`` at 4,032 prompt tokens: 70 MB more at its peak). No-op off glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass
