"""The one exception type users see.

Every failure lowbit can explain is raised as :class:`LowbitError`; the CLI prints its message and
exits with code 2 (no traceback unless ``--debug``). Messages name the culprit (file, op, node, field)
and say what to do about it.
"""


class LowbitError(Exception):
    """A user-facing error: bad input, unsupported model, corrupted artifact."""

    exit_code = 2
