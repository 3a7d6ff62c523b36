"""LoRA, DoRA and full fine-tuning on an mlx-lm model with mlx-lm's own tuner, and the
trainable tree in and out of it.

``apply_lora(model, spec, seed)`` freezes the base model, then, by ``spec.fine_tune_type``
(mlx-lm's ``fine_tune_type``):

* ``lora``: swaps the linear layers of the last ``num_layers`` blocks for
  ``mlx_lm.tuner.lora.LoRALinear`` (``LoRASwitchLinear`` for mixture-of-experts layers) with
  ``mlx_lm.tuner.utils.linear_to_lora_layers``; trainable: the ``lora_a``/``lora_b`` leaves;
* ``dora``: the same with ``mlx_lm.tuner.dora.DoRALinear`` (``use_dora=True``); trainable:
  ``lora_a``, ``lora_b`` and the magnitude ``m``;
* ``full``: unfreezes the last ``num_layers`` blocks as they are; trainable: their weights.

That is the code ``mlx_lm lora`` and ``mlx_lm.load(..., adapter_path=...)`` use, so adapters
written from this tree load there unchanged.  Anything else trainable is an error, not a
silent extra.

The trainer never keeps parameters *in* the model: the ``TrainState`` holds them, and
``bind(model, params)`` puts them in through ``nestedfn.tree.update_module`` (which checks that
every leaf fits and lands) just before the model is called.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.utils import linear_to_lora_layers

from nestedfn.lm.errors import LoraError
from nestedfn.tree import to_flat, update_module

__all__ = ["LoraError", "LoraSpec", "apply_lora", "bind", "trainable_params"]

_ADAPTER_LEAVES = {"lora": ("lora_a", "lora_b"), "dora": ("lora_a", "lora_b", "m")}
FINE_TUNE_TYPES = ("lora", "dora", "full")


@dataclass(frozen=True)
class LoraSpec:
    """mlx-lm's LoRA options (``lora_parameters`` and ``num_layers`` in its config).

    rank:       r, the inner dimension of ``lora_a (in, r) @ lora_b (r, out)``.
    scale:      the output multiplier (mlx-lm's ``scale``, not ``alpha``).
    dropout:    dropout on the LoRA branch's input (0 disables it).
    num_layers: the last ``num_layers`` blocks of ``model.layers`` get LoRA; -1 means all.
    keys:       module paths inside a block (``self_attn.q_proj``); ``None``: every linear.
    fine_tune_type: ``lora``, ``dora`` or ``full`` (``full`` reads only ``num_layers``).
    """

    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    num_layers: int = -1
    keys: tuple[str, ...] | None = field(default=None)
    fine_tune_type: str = "lora"

    def lora_parameters(self) -> dict[str, Any] | None:
        """The ``lora_parameters`` dict of mlx-lm's ``adapter_config.json`` (``None`` for
        ``full``, as mlx-lm writes it)."""
        if self.fine_tune_type == "full":
            return None
        d = asdict(self)
        del d["num_layers"], d["fine_tune_type"]
        if d["keys"] is None:
            del d["keys"]
        else:
            d["keys"] = list(d["keys"])
        return d


def _check_spec(model: nn.Module, spec: LoraSpec) -> int:
    n_blocks = len(model.layers)
    if spec.fine_tune_type not in FINE_TUNE_TYPES:
        raise LoraError(
            f"fine_tune_type must be one of {', '.join(FINE_TUNE_TYPES)}, got "
            f"{spec.fine_tune_type!r}"
        )
    if not isinstance(spec.rank, int) or spec.rank < 1:
        raise LoraError(f"LoRA rank must be a positive int, got {spec.rank!r}")
    if not 0.0 <= spec.dropout < 1.0:
        raise LoraError(f"LoRA dropout must be in [0, 1), got {spec.dropout!r}")
    n = spec.num_layers
    if n == -1:
        return n_blocks
    if not isinstance(n, int) or n < 1 or n > n_blocks:
        raise LoraError(
            f"num_layers must be -1 (all) or in 1..{n_blocks} (the model has {n_blocks} "
            f"blocks), got {n!r}"
        )
    return n


def apply_lora(model: nn.Module, spec: LoraSpec, seed: int = 0) -> dict[str, Any]:
    """Freeze ``model``, make the fine-tuned part trainable in place (LoRA/DoRA layers, or the
    last blocks for ``full``), return the trainable tree.

    ``lora_a`` is drawn by mlx-lm from the global generator, so it is seeded with ``seed``
    first: the same seed gives the same initial adapters.  Raises ``LoraError`` when the
    keys match no layer, a layer cannot take the adapter (mlx-lm has no DoRA for
    mixture-of-experts layers) or anything but the adapter leaves ends up trainable.
    """
    n = _check_spec(model, spec)
    model.freeze()
    mx.random.seed(seed)
    kind = spec.fine_tune_type
    if kind == "full":
        for block in model.layers[len(model.layers) - n :]:
            block.unfreeze()
        flat = to_flat(model.trainable_parameters())
        if not flat:
            raise LoraError(f"full fine-tuning: the last {n} blocks hold no parameters")
        return model.trainable_parameters()
    config = {"rank": spec.rank, "scale": spec.scale, "dropout": spec.dropout}
    if spec.keys is not None:
        config["keys"] = list(spec.keys)
    try:
        linear_to_lora_layers(model, n, config, use_dora=kind == "dora")
    except ValueError as e:  # e.g. "SwitchLinear doesn't support DoRA yet." (mlx-lm)
        raise LoraError(f"{kind} cannot be applied to this model: {e}") from None
    flat = to_flat(model.trainable_parameters())
    if not flat:
        keys = "every linear layer" if spec.keys is None else f"keys {list(spec.keys)}"
        raise LoraError(
            f"{kind} added no trainable parameters: {keys} matched no module in the last {n} "
            "blocks of model.layers"
        )
    leaves = _ADAPTER_LEAVES[kind]
    # a leaf of an adapter: its name, or a list of them (afm7's fused qkv: lora_a.0, ...)
    extra = [p for p in flat if not set(p.split(".")[-2:]) & set(leaves)]
    if extra:
        raise LoraError(f"non-{kind} parameters are trainable after apply_lora: {extra[:5]}")
    return model.trainable_parameters()


def trainable_params(model: nn.Module) -> dict[str, Any]:
    """The model's trainable tree (what ``apply_lora`` returned, with current values)."""
    return model.trainable_parameters()


def bind(model: nn.Module, params: Any) -> nn.Module:
    """Put ``params`` (a trainable tree) into ``model``: checked, every leaf proven to land."""
    return update_module(model, params)
