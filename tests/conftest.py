"""Hypothesis profiles: a fast default, and ``ci`` (more examples, derandomized so a run is
reproducible and never flaky) chosen when ``CI`` is set or ``HYPOTHESIS_PROFILE=ci``.

The whole suite runs on every core when pytest-xdist is installed (``pytest_cmdline_main``).

Full float32 matmuls: on CUDA (and Apple's neural accelerators) MLX runs float32 matmuls at
TF32 precision unless ``MLX_ENABLE_TF32=0`` is set before its first operation, and the
Newton-Schulz / Muon / multiscale-momentum tests compare with float32 numpy references."""

import os

os.environ["MLX_ENABLE_TF32"] = "0"  # before anything imports mlx and runs an op

import pytest
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


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """``python -m pytest`` (the whole suite: no paths given) runs on every core when
    pytest-xdist (the dev extra) is installed, as ``-n auto --dist worksteal``: the few long
    tests (``mlx.launch`` runs, CLI processes) go to whichever worker frees up (two workers
    busy 576 s and 578 s in one run here, where ``loadfile`` left them 419 s and 559 s).
    A run given paths, ``-n``, ``--dist``, ``--pdb`` or ``-p no:xdist`` runs as asked."""
    if (
        config.pluginmanager.hasplugin("xdist")
        and not hasattr(config, "workerinput")
        and config.option.numprocesses is None
        and config.args_source == pytest.Config.ArgsSource.TESTPATHS
        and not config.getoption("usepdb")
        and not config.getoption("collectonly")
    ):
        config.option.numprocesses = "auto"
        if config.option.dist == "no":
            config.option.dist = "worksteal"
