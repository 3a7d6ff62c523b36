"""Hypothesis profiles: a fast default, and ``ci`` (more examples, derandomized so a run is
reproducible and never flaky) chosen when ``CI`` is set or ``HYPOTHESIS_PROFILE=ci``.

Full float32 matmuls: on CUDA (and Apple's neural accelerators) MLX runs float32 matmuls at
TF32 precision unless ``MLX_ENABLE_TF32=0`` is set before its first operation, and the
Newton-Schulz / Muon / multiscale-momentum tests compare with float32 numpy references."""

import os

os.environ["MLX_ENABLE_TF32"] = "0"  # before anything imports mlx and runs an op

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if _ci else "default"))
