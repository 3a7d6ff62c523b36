"""The trainer's user-facing error: reported as one line by the CLI, never a traceback."""

from __future__ import annotations

__all__ = ["RunError"]


class RunError(RuntimeError):
    """A problem with the user's input (paths, data, options): reported without traceback."""
