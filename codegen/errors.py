"""The exception and warning types users see.

Every failure lowbit can explain is raised as :class:`LowbitError`; the CLI prints its message and
exits with code 2 (no traceback unless ``--debug``). Messages name the culprit (file, op, node, field,
argument) and say what to do about it. An argument of the wrong type through the Python API raises
:class:`LowbitArgumentError`, which is both a ``LowbitError`` and a ``TypeError``. Things worth
knowing that do not stop the work (a short evaluation text, an ONNX file without a tokenizer) are
:class:`LowbitWarning` warnings; the CLI prints them as one ``lowbit: warning:`` line each.
"""


class LowbitError(Exception):
    """A user-facing error: bad input, unsupported model, corrupted artifact."""

    exit_code = 2


class LowbitArgumentError(LowbitError, TypeError):
    """An API argument of the wrong type; the message names the argument."""


class LowbitWarning(UserWarning):
    """Something the user should know about a result that lowbit still produced."""
