"""What the native optimizer step needs to know of an optimizer: its spec.

An ``Optimizer`` is a pair of closures, so nothing can be read back from them; the optimizers
that ``nestedfn.fast.native`` runs as one multi-tensor kernel carry a spec in their
``Optimizer.fused`` field (``register(opt, spec)`` returns the optimizer with it), and
``describe(opt)`` reads it (None for any other optimizer: a mask, a custom chain, ...).

- ``ElementwiseSpec``: Adam/AdamW (``ADAM``), Lion (``LION``), momentum (``MOMENTUM``), with
  their hyperparameters and learning rate (a float or a schedule ``step -> value``);
- ``NestedSpec``: ``nested`` tiers of such optimizers (and ``nested_adam`` with a global
  schedule, ``post``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from nestedfn.optim.core import Optimizer

__all__ = ["ADAM", "LION", "MOMENTUM", "ElementwiseSpec", "NestedSpec", "describe", "register"]

# the kernel's algorithms, by their names in ``_native.Algo`` (csrc/fused_step.h: its numbers)
ADAM, LION, MOMENTUM = "ADAM", "LION", "MOMENTUM"


class ElementwiseSpec(NamedTuple):
    """What ``FusedUpdate`` needs of an elementwise optimizer.

    The optimizer's state must be a tuple (``chain``) whose first item is a NamedTuple of
    params-shaped moment trees (``ScaleByAdamState(mu, nu)``, ``ScaleByLionState(mu)``,
    ``TraceState(trace)``) and whose other items are empty states.  ``b1`` is momentum's
    decay for ``MOMENTUM``.  ``weight_decay`` 0 means none (a mask is not supported).
    """

    algo: str  # ADAM, LION or MOMENTUM
    learning_rate: float | Callable[[Any], Any]
    state_cls: type
    n_items: int  # len of the chain's state tuple
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    bias_correction: bool = True
    nesterov: bool = False
    has_wd: bool = False  # the chain holds add_decayed_weights (even of 0: same roundings)
    weight_decay: float = 0.0


class NestedSpec(NamedTuple):
    """What the native step needs of ``nested`` (and ``nested_adam``).

    ``inners``: per tier, the inner optimizer.  ``plan_for(params)``: the tier plan and the
    params' leaves (``nested``'s own cache).  ``post``: a global schedule multiplying the
    active tiers' updates (``nested_adam`` with a schedule: state ``(NestedState, ())``).
    """

    inners: tuple[Optimizer, ...]
    freqs: tuple[int, ...]
    reduce: str
    plan_for: Callable[[Any], tuple[Any, list]]
    state_cls: type  # NestedState (fast/ may not import tiered/)
    post: Callable[[Any], Any] | None = None


def register(opt: Optimizer, spec: ElementwiseSpec | NestedSpec) -> Optimizer:
    """``opt`` declared as the optimizer ``spec`` describes (a new ``Optimizer``)."""
    return opt._replace(fused=spec)


def describe(opt: Optimizer) -> ElementwiseSpec | NestedSpec | None:
    """The native spec of ``opt``, or None when the native step does not know it."""
    return getattr(opt, "fused", None)
