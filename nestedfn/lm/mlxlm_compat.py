"""mlx-lm's vocabulary for ``nestedfn train``: its config keys and flag names, on ``TrainConfig``.

``python -m mlx_lm lora -c FILE`` reads a flat YAML mapping (``iters``, ``num_layers``,
``lora_parameters: {rank, scale, dropout, keys}``, ``optimizer_config: {adam: {...}}``,
``lr_schedule``, ...).  ``normalize(data, source)`` turns a mapping written in mlx-lm's names,
nestedfn's names or a mix into ``TrainConfig`` field names, so the same file runs in both tools:

* ``ALIASES``: one mlx-lm key for one field (``iters`` -> ``steps``, ``num_layers`` ->
  ``lora_layers``, ``max_seq_length`` -> ``max_seq_len``, ``steps_per_eval`` -> ``eval_every``,
  ``val_batches`` -> ``eval_batches``, ``grad_accumulation_steps`` -> ``grad_accumulation``);
* ``lora_parameters`` -> ``lora_rank``, ``lora_scale``, ``lora_dropout``, ``lora_keys``;
* ``optimizer_config`` -> ``optimizer_args``: the entry of the chosen optimizer (mlx-lm
  ignores the others, so a file listing all five names is fine); ``betas: [b1, b2]`` of
  ``adam``/``adamw`` becomes nestedfn's ``b1``, ``b2`` (those run on nestedfn's Adam, with
  ``mlx.optimizers.Adam``'s defaults), the other optimizers take MLX's keywords as they are;
* ``training_mode: normal`` (newer mlx-lm) is accepted, other modes (preference training)
  are an error;
* keys that only report to a network service (``report_to``, its ``project_name``, older
  mlx-lm's ``wandb``) print one warning and the run goes on (its metrics are in
  ``metrics.jsonl``; a ``training_callback`` logs to any tracker); ``hf_dataset`` (the run
  cannot go on without the download) is an error; ``config`` (mlx-lm's own ``-c``) is
  accepted when empty.

Giving one option under both names is an error unless the values agree.  The documented face
is mlx-lm's names (``FACE``: the saved ``config.yaml`` and ``--help`` use them): the people
who use ``nestedfn train`` come with mlx-lm configs and mlx-lm's docs, and one config then
runs in both tools.  nestedfn's earlier names keep working everywhere.
"""

from __future__ import annotations

import difflib
import re
import sys
from typing import Any

__all__ = [
    "ALIASES",
    "FACE",
    "LORA_PARAMETERS",
    "NETWORK_KEYS",
    "REPORTING_KEYS",
    "NormalizeError",
    "accepted_keys",
    "closest",
    "normalize",
    "parse_size",
    "to_face",
]

# mlx-lm's key -> TrainConfig field, where the two differ.
ALIASES: dict[str, str] = {
    "iters": "steps",
    "num_layers": "lora_layers",
    "max_seq_length": "max_seq_len",
    "steps_per_eval": "eval_every",
    "val_batches": "eval_batches",
    "grad_accumulation_steps": "grad_accumulation",
}
FACE: dict[str, str] = {field: key for key, field in ALIASES.items()}
# lora_parameters' keys -> TrainConfig fields.
LORA_PARAMETERS: dict[str, str] = {
    "rank": "lora_rank",
    "scale": "lora_scale",
    "dropout": "lora_dropout",
    "keys": "lora_keys",
}
NETWORK_KEYS: dict[str, str] = {
    "hf_dataset": (
        "downloads a Hugging Face dataset; nestedfn trains offline from a local directory: "
        "save the splits as train.jsonl, valid.jsonl (and test.jsonl) and set data: DIR"
    ),
}
# Keys that only send the logs to a service: one warning, the run goes on.
REPORTING_KEYS = ("report_to", "project_name", "wandb")
REPORTING_WARNING = (
    "{keys} ignored: nestedfn uploads nothing; the run's metrics are in RUN_DIR/metrics.jsonl "
    "(`nestedfn plot RUN_DIR`), and nestedfn.lm.fine_tune(..., training_callback=...) logs to "
    "any tracker"
)
# Optimizers whose optimizer_config `betas` become nestedfn's b1, b2.
_BETAS = ("nested_adam", "adam", "adamw", "lion")
_DEFAULT_OPTIMIZER = "adam"  # mlx-lm's


def warn_reporting(keys: list[str]) -> None:
    """The one warning for ``REPORTING_KEYS`` given (``keys``), on stderr."""
    if keys:
        print(
            f"nestedfn: warning: {REPORTING_WARNING.format(keys=', '.join(keys))}", file=sys.stderr
        )


class NormalizeError(ValueError):
    """A mapping of options that cannot be read (raised as ``ConfigError`` by ``config``)."""


def closest(name: str, valid: list[str]) -> str:
    """``" (did you mean 'x'?)"`` for the valid name nearest ``name``, or ``""``."""
    hit = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" (did you mean {hit[0]!r}?)" if hit else ""


def _set(out: dict[str, Any], field: str, value: Any, key: str, source: str) -> None:
    if field in out and out[field] != value:
        raise NormalizeError(
            f"{source}: {key} and {out['__names__'][field]} set the same option to different "
            f"values ({value!r} and {out[field]!r}); keep one"
        )
    out[field] = value
    out["__names__"][field] = key


def _optimizer_args(name: str, kwargs: Any, source: str) -> dict[str, Any]:
    if not isinstance(kwargs, dict):
        raise NormalizeError(
            f"{source}: optimizer_config.{name} must be a mapping of keyword arguments, got "
            f"{kwargs!r}"
        )
    out = dict(kwargs)
    if name in _BETAS and "betas" in out:
        betas = out.pop("betas")
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
            raise NormalizeError(f"{source}: optimizer_config.{name}.betas must be [b1, b2]")
        out.setdefault("b1", betas[0])
        out.setdefault("b2", betas[1])
    return out


def _skipped(key: str, value: Any, source: str) -> bool:
    """Whether ``key`` is one of mlx-lm's keys nestedfn reads as nothing (reporting keys, an
    empty ``config``, ``training_mode: normal``); raises for the values it cannot run."""
    if key in REPORTING_KEYS:
        return True
    if key in NETWORK_KEYS:
        if value in (None, False, "", [], {}):
            return True
        raise NormalizeError(f"{source}: {key} {NETWORK_KEYS[key]}")
    if key == "training_mode":  # newer mlx-lm: "normal", or preference training
        if value in (None, "normal"):
            return True
        raise NormalizeError(
            f"{source}: training_mode {value!r}: nestedfn trains the language-model loss "
            "(training_mode: normal) only"
        )
    if key == "config":
        if value not in (None, ""):
            raise NormalizeError(
                f"{source}: config: a config file cannot name another one; merge them"
            )
        return True
    return key == "lora_parameters" and value is None


def _lora_parameters(out: dict[str, Any], value: Any, source: str) -> None:
    if not isinstance(value, dict):
        raise NormalizeError(
            f"{source}: lora_parameters must be a mapping of rank, scale, dropout, keys; got "
            f"{value!r}"
        )
    for sub, v in value.items():
        if sub not in LORA_PARAMETERS:
            hint = (
                " (mlx-lm's LoRA uses scale, not alpha)"
                if sub == "alpha"
                else closest(sub, list(LORA_PARAMETERS))
            )
            raise NormalizeError(
                f"{source}: unknown lora_parameters key {sub!r}{hint}; valid keys: "
                f"{', '.join(LORA_PARAMETERS)}"
            )
        _set(out, LORA_PARAMETERS[sub], v, f"lora_parameters.{sub}", source)


def normalize(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` (mlx-lm's keys, nestedfn's or both) with ``TrainConfig`` field names.

    Unknown keys are left in place for the caller's check (which names the valid ones);
    conflicting duplicates and keys that need the network raise ``NormalizeError``; keys that
    only report to a service print one warning."""
    out: dict[str, Any] = {"__names__": {}}
    optimizer_config = None
    warn_reporting([k for k in REPORTING_KEYS if data.get(k) not in (None, False, "", [], {})])
    for key, value in data.items():
        if _skipped(key, value, source):
            continue
        if key == "lora_parameters":
            _lora_parameters(out, value, source)
        elif key == "optimizer_config":
            if value is not None and not isinstance(value, dict):
                raise NormalizeError(
                    f"{source}: optimizer_config must be a mapping {{optimizer: {{keyword: "
                    f"value}}}}, got {value!r}"
                )
            optimizer_config = value or {}
        else:
            _set(out, ALIASES.get(key, key), value, key, source)
    if optimizer_config is not None:
        name = out.get("optimizer", _DEFAULT_OPTIMIZER)
        if name in optimizer_config and optimizer_config[name] is not None:
            args = _optimizer_args(str(name), optimizer_config[name], source)
            if args:
                _set(out, "optimizer_args", args, f"optimizer_config.{name}", source)
    del out["__names__"]
    return out


def accepted_keys(fields: list[str]) -> list[str]:
    """Every key a config file may hold: the face names, then nestedfn's own spellings."""
    nested = set(LORA_PARAMETERS.values())
    face = [FACE.get(f, f) for f in fields if f not in nested]
    old = [f for f in fields if f in FACE or f in nested]
    return [*face, "lora_parameters", "optimizer_config", *old]


def to_face(config: dict[str, Any]) -> dict[str, Any]:
    """A ``TrainConfig.to_dict()`` under the documented names (``normalize`` reads it back):
    mlx-lm's keys where mlx-lm has the option, ``lora_parameters`` nested as mlx-lm writes it."""
    out: dict[str, Any] = {}
    lora: dict[str, Any] = {}
    inverse = {v: k for k, v in LORA_PARAMETERS.items()}
    for field, value in config.items():
        if field in inverse:
            if not (field == "lora_keys" and value is None):
                lora[inverse[field]] = value
            if len(lora) == 1:
                out["lora_parameters"] = lora
            continue
        out[FACE.get(field, field)] = value
    return out


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(value: Any) -> int:
    """Bytes from ``1234``, ``"512MB"``, ``"1.5GB"`` (mlx-lm's ``--clear-cache-threshold``)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"not a size (e.g. 512MB, 2GB): {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
