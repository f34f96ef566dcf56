"""lowbit's download/conversion cache: ``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``).

Entries are filled once and then only read. Filling takes an exclusive lock per entry, so two
processes (parallel test workers, two compiles started together) that miss the same entry convert or
download it once: the second waits, then finds the entry complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


@contextlib.contextmanager
def filling(entry: Path) -> Iterator[None]:
    """Hold the lock for filling cache ``entry`` (a path under :func:`cache_dir`) until the block ends."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
