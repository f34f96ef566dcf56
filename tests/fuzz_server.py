"""A fork server for the fuzzing suite: each case runs in its own forked child process.

Started once (``python fuzz_server.py``), it imports lowbit and its heavy dependencies, then reads
one JSON request per line on stdin and answers one JSON line on stdout per request:

* ``{"argv": [hex bytes...], "cwd", "env", "stdout", "stderr", "timeout"}``: the child runs
  ``lowbit`` (``lowbit.compiler.cli.main``) with those arguments (bytes, decoded as Python decodes a
  command line, so non-UTF-8 arguments arrive as they would from a shell);
* ``{"python": code, ...}``: the child runs ``code`` (the Python API), exiting 2 with one
  ``lowbit: error:`` line on a :class:`LowbitError`, as the command does.

The answer is ``{"exit": code}``, ``{"signal": number}`` or ``{"timeout": true}``. A crash (a
signal) or a hang in a case kills only its child. The server itself never runs TVM, so the children
start with no thread pools to inherit.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback


def _preload() -> None:
    import numpy  # noqa: F401
    import onnx  # noqa: F401
    import safetensors.numpy  # noqa: F401
    import tokenizers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import tvm  # noqa: F401
    from tvm import relax  # noqa: F401

    import lowbit.compiler.api  # noqa: F401
    import lowbit.compiler.cli  # noqa: F401
    import lowbit.compiler.frontend.onnx_file  # noqa: F401
    import lowbit.compiler.frontend.torch_export  # noqa: F401


def _child(request: dict) -> int:
    os.chdir(request["cwd"])
    os.environ.update(request.get("env", {}))
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if "python" in request:
        from lowbit.codegen.errors import LowbitError

        try:
            exec(compile(request["python"], "<fuzz case>", "exec"), {})  # noqa: S102 - the test's own code
        except LowbitError as exc:
            print(f"lowbit: error: {exc}", file=sys.stderr)
            return 2
        return 0
    from lowbit.compiler import cli

    argv = [os.fsdecode(bytes.fromhex(arg)) for arg in request["argv"]]
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse's usage errors and --help
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1


def _wait(pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return {"signal": os.WTERMSIG(status)}
            return {"exit": os.WEXITSTATUS(status)}
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"timeout": True}
        time.sleep(0.005)


def main() -> None:
    _preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request)
            except BaseException:  # a bug the case found: the test shows this traceback
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code if isinstance(code, int) else 1)
        print(json.dumps(_wait(pid, request.get("timeout", 120))), flush=True)


if __name__ == "__main__":
    main()
