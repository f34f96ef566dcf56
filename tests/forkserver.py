"""Client of the fork server (:mod:`tests.fuzz_server`): run ``lowbit`` commands in forked children.

A new interpreter pays several seconds importing torch and TVM before a command starts; children
of one server that imported them already start at once, each in its own process (a crash or a
hang kills only the child). The command-line tests and the fuzzing suite share one server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


class ForkServer:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="lowbit-forkserver-"))
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fuzz_server.py"))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert json.loads(self.process.stdout.readline()) == {"ready": True}
        self.count = 0

    def run(self, cwd, argv=None, python=None, timeout: float = 600, env=None) -> dict:
        """``{"exit": code}``, ``{"signal": number}`` or ``{"timeout": True}``, with ``stdout`` and ``stderr``."""
        self.count += 1
        out, err = self.root / f"{self.count}.out", self.root / f"{self.count}.err"
        request = {"cwd": str(cwd or os.getcwd()), "stdout": str(out), "stderr": str(err), "timeout": timeout,
                   "env": env or {}}
        if python is not None:
            request["python"] = python
        else:
            request["argv"] = [(a if isinstance(a, bytes) else os.fsencode(str(a))).hex() for a in argv]
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        outcome = json.loads(self.process.stdout.readline())
        outcome["stdout"] = out.read_text(errors="replace")
        outcome["stderr"] = err.read_text(errors="replace")
        out.unlink()
        err.unlink()
        return outcome

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)
        for leftover in self.root.iterdir():
            leftover.unlink()
        self.root.rmdir()


_SERVER: list[ForkServer] = []


def server() -> ForkServer:
    """The session's server, started on first use (closed by ``conftest`` at the end)."""
    if not _SERVER:
        _SERVER.append(ForkServer())
    return _SERVER[0]


def close() -> None:
    while _SERVER:
        _SERVER.pop().close()


def lowbit_cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run ``lowbit ARGS`` in a forked child; a signal shows as a negative return code, as subprocess does."""
    outcome = server().run(cwd, argv=list(args), env=env)
    code = outcome["exit"] if "exit" in outcome else -outcome.get("signal", 9)
    return subprocess.CompletedProcess(["lowbit", *map(str, args)], code, outcome["stdout"], outcome["stderr"])
