"""Progress of long work: tqdm bars on a terminal, one line per stage with its elapsed time otherwise.

``progress=None`` (the default everywhere) picks by whether stderr is a terminal; ``True`` forces
bars, ``False`` silences both (tests, library use that reports on its own).
"""

from __future__ import annotations

import contextlib
import sys
import time


def mode(progress: bool | None) -> str:
    """``"bars"``, ``"lines"`` or ``"off"`` for a ``progress`` argument."""
    if progress is None:
        return "bars" if sys.stderr.isatty() else "lines"
    return "bars" if progress else "off"


class Stages:
    """The numbered stages of one command: a bar on a terminal, else ``lowbit: [i/n] stage: 3.2 s`` lines."""

    def __init__(self, total: int, progress: bool | None):
        from tqdm import tqdm

        self.mode = mode(progress)
        self.total, self.done = total, 0
        self.bar = tqdm(total=total, disable=self.mode != "bars", bar_format="{desc:<40} {n}/{total} [{elapsed}]")

    @contextlib.contextmanager
    def stage(self, name: str):
        self.bar.set_description_str(name)
        started = time.perf_counter()
        yield
        self.done += 1
        self.bar.update(1)
        if self.mode == "lines":
            print(f"lowbit: [{self.done}/{self.total}] {name}: {time.perf_counter() - started:.1f} s",
                  file=sys.stderr, flush=True)

    def close(self):
        self.bar.close()


@contextlib.contextmanager
def bar(total: int, description: str, progress: bool | None):
    """A tqdm bar for the steps inside one stage; shown on a terminal only."""
    from tqdm import tqdm

    progress_bar = tqdm(total=total, desc=description, disable=mode(progress) != "bars", leave=False)
    try:
        yield progress_bar
    finally:
        progress_bar.close()
