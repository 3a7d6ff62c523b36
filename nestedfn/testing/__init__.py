"""Testing helpers for nestedfn users: Hypothesis strategies in ``nestedfn.testing.strategies``.

Kept out of ``nestedfn``'s top-level import so that the library itself never imports
Hypothesis; import ``nestedfn.testing.strategies`` in your tests.
"""
