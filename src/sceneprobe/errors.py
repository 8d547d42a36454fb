"""The project's error type: a user mistake, reported as one line by the CLI (exit status 2)."""
from __future__ import annotations


class SceneprobeError(Exception):
    """A mistake in the user's input: a file, an option or a folder.

    The message is one line that says what is wrong, where (file or option) and what to do.
    The CLI prints it as ``error: <message>`` and exits with status 2; tracebacks are for bugs.
    """


def fail(message: str) -> "SceneprobeError":
    """Build the error (``raise fail(...)`` reads well at call sites)."""
    return SceneprobeError(" ".join(message.split()))
