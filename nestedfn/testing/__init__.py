"""Testing helpers for nestedfn users: Hypothesis strategies for parameter trees, MLX arrays and
small modules, in ``nestedfn.testing.strategies``.

``nestedfn`` does not import this package, so the library never imports Hypothesis; import
``nestedfn.testing.strategies`` in your tests.
"""

__all__ = ["strategies"]
