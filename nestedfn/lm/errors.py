"""The trainer's user-facing errors: reported as one line by the CLI, never a traceback.

Kept in a module that imports nothing, so ``nestedfn`` exports them without importing mlx-lm.
"""

from __future__ import annotations

__all__ = ["LoraError", "RunError"]


class RunError(RuntimeError):
    """A problem with the user's input (paths, data, options): reported without traceback."""


class LoraError(ValueError):
    """LoRA options that do not fit the model (too many layers, keys matching nothing)."""
