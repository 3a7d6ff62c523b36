"""Adapters in mlx-lm's format: ``adapters.safetensors`` + ``adapter_config.json``.

For ``fine_tune_type: full`` the "adapters" are the fine-tuned blocks' weights under their
model paths and ``lora_parameters`` is ``null``, as ``mlx_lm lora`` writes them; mlx-lm's
``load_adapters`` then loads them into the model as they are (``mlx_lm fuse`` too).

``mlx_lm.load(model, adapter_path=DIR)`` (and ``mlx_lm.generate --adapter-path DIR``) read
``adapter_config.json`` for ``fine_tune_type``, ``num_layers`` and ``lora_parameters`` (rank,
scale, dropout, keys), rebuild the LoRA layers with ``linear_to_lora_layers`` and load the
safetensors file, whose keys are the trainable leaves' dotted paths
(``model.layers.3.self_attn.q_proj.lora_a``), i.e. ``nestedfn.tree.to_flat`` of the tree.

Both files are written atomically (``nestedfn.checkpoint.atomic_write``: a temporary file in the
same directory, fsynced, then ``os.replace``), so a reader never sees a half-written adapter;
they get the usual permissions (``0o666`` less the umask).  ``adapter_config.json`` also records
the SHA-256 of the adapters file (``adapters_sha256``) and of its own other fields
(``digest``): ``check_adapters`` tells damaged adapters from good ones (mlx-lm ignores the two
fields).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx

from nestedfn.lm.lora import LoraSpec
from nestedfn.run.checkpoint import atomic_write, atomic_write_text, file_sha256, save_safetensors
from nestedfn.tree import from_flat, to_flat

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FILE",
    "adapter_config",
    "check_adapters",
    "load_adapters",
    "save_adapters",
]

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_config(spec: LoraSpec, n_blocks: int, extra: dict[str, Any] | None = None) -> dict:
    """The ``adapter_config.json`` mlx-lm reads; ``extra`` adds informative fields."""
    num_layers = n_blocks if spec.num_layers == -1 else spec.num_layers
    config = {
        "fine_tune_type": spec.fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": spec.lora_parameters(),
    }
    for k, v in (extra or {}).items():
        config.setdefault(k, v)
    return config


def save_adapters(
    directory: str | Path,
    params: Any,
    spec: LoraSpec,
    n_blocks: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``params`` (the trainable tree) and its config to ``directory``; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = to_flat(params)
    if not flat:
        raise ValueError("save_adapters: the trainable tree holds no arrays")
    mx.eval(list(flat.values()))
    atomic_write(directory / ADAPTER_FILE, lambda p: save_safetensors(p, flat), ".safetensors")
    config = adapter_config(spec, n_blocks, extra)
    config["adapters_sha256"] = file_sha256(directory / ADAPTER_FILE)
    config["digest"] = _digest(config)
    text = json.dumps(config, indent=2, sort_keys=False)
    atomic_write_text(directory / ADAPTER_CONFIG, text + "\n")
    return directory


def _digest(config: dict) -> str:
    body = {k: v for k, v in config.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def check_adapters(directory: str | Path) -> str | None:
    """``None`` when ``directory`` holds intact adapters as ``save_adapters`` wrote them (or
    none at all), else what is wrong, naming the file: missing, not JSON, checksum mismatch.
    (Adapters written by a version without the checksums are taken as they are.)"""
    directory = Path(directory)
    weights, config_file = directory / ADAPTER_FILE, directory / ADAPTER_CONFIG
    if not weights.exists() and not config_file.exists():
        return None
    for f in (weights, config_file):
        if not f.is_file():
            return f"{f} is missing"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return f"{config_file} is damaged (not JSON: {e})"
    if not isinstance(config, dict):
        return f"{config_file} is damaged (not a JSON object)"
    if "digest" not in config:
        return None
    if config["digest"] != _digest(config):
        return f"{config_file} is damaged (its checksum does not match)"
    if file_sha256(weights) != config.get("adapters_sha256"):
        return f"{weights} is damaged (its SHA-256 does not match {config_file})"
    return None


def load_adapters(directory: str | Path, like: Any) -> Any:
    """The adapter tree saved in ``directory`` (or the ``.safetensors`` file it names),
    shaped exactly like ``like``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the paths when
    the saved keys differ from ``like``'s or a shape does not match.
    """
    path = Path(directory)
    if path.is_dir() or not path.suffix:
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no adapters at {path}")
    saved = mx.load(str(path))
    want = to_flat(like)
    missing = [k for k in want if k not in saved]
    unknown = [k for k in saved if k not in want]
    shapes = [
        f"{k}: saved {tuple(saved[k].shape)} vs model {tuple(want[k].shape)}"
        for k in want
        if k in saved and saved[k].shape != want[k].shape
    ]
    if missing or unknown or shapes:
        raise ValueError(
            f"adapters in {path} do not fit the model: missing {missing[:5]}, "
            f"unknown {unknown[:5]}, shapes {shapes[:5]}"
        )
    return from_flat({k: saved[k] for k in want}, like=like)
