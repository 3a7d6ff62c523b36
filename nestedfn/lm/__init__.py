"""The LoRA trainer for mlx-lm models.  Stands on every floor below (tree, optim, tiered, fast,
run); only the CLI stands on it.

- ``config``: ``TrainConfig``, the options from YAML and flags, checked when read;
- ``data``: JSONL datasets in mlx-lm's formats, batches as a function of the step;
- ``lora``, ``adapters``: LoRA layers through mlx-lm's tuner, adapters in mlx-lm's format;
- ``loss``: the masked loss, its gradients and its evaluation function (pure);
- ``build``: the optimizer and schedule a config describes;
- ``prepare``: loading model, data, LoRA and optimizer, all checked before anything is written;
- ``rundir``: the run directory (what a run writes, the checks before writing);
- ``evaluate``: the validation loss during training;
- ``trainer``: the loop (``train``, exact resume, Ctrl-C), with ``errors.RunError``;
- ``demo``, ``plot``: the offline demo model and data, the training plot.

Import-light (``import nestedfn`` never imports mlx-lm): the package exports the configuration
and the errors a caller catches; the trainer and the modules that import mlx-lm are imported
where used.
"""

from typing import Any

from nestedfn.lm.config import ConfigError, TrainConfig, load_config
from nestedfn.lm.data import DataError
from nestedfn.lm.errors import LoraError, RunError

# ``fine_tune``, ``TrainingCallback`` (``api``) and ``test_adapters`` (``testset``) import
# mlx-lm, so they are loaded on first use; ``__all__`` names their modules, which the API
# reference documents.
__all__ = [
    "api",
    "config",
    "testset",
    "trainer",
    "ConfigError",
    "DataError",
    "LoraError",
    "RunError",
    "TrainConfig",
    "load_config",
]


def __getattr__(name: str) -> Any:  # the trainer's Python entry, imported when first used
    if name in ("TrainingCallback", "fine_tune"):
        from nestedfn.lm import api

        return getattr(api, name)
    if name == "test_adapters":
        from nestedfn.lm.testset import test_adapters

        return test_adapters
    raise AttributeError(f"module 'nestedfn.lm' has no attribute {name!r}")
