"""Testing helpers for nestedfn users: Hypothesis strategies for parameter trees, MLX arrays and
small modules, in ``nestedfn.testing.strategies``.

The package itself exports nothing, so that importing it (or ``nestedfn``) never imports
Hypothesis; import ``nestedfn.testing.strategies`` in your tests.
"""

__all__: list[str] = []
