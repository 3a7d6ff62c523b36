"""What the fused (native) optimizer step needs to know of an optimizer: its spec.

An ``Optimizer`` is a pair of closures, so nothing can be read back from it; the optimizers
that ``nestedfn.fast.native`` can run as one multi-tensor kernel declare what they are when
they are made (``register(opt, spec)``), and ``describe(opt)`` gives it back (None for any
other optimizer: a mask, a custom chain, ...).  The registry is keyed weakly by the
optimizer's update function, so a spec lives as long as its optimizer.

- ``ElementwiseSpec``: Adam/AdamW (``ADAM``), Lion (``LION``), momentum (``MOMENTUM``), with
  their hyperparameters and learning rate (a float or a schedule ``step -> value``);
- ``NestedSpec``: ``nested`` tiers of such optimizers (and ``nested_adam`` with a global
  schedule, ``post``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

from nestedfn.optim.core import Optimizer

__all__ = ["ADAM", "LION", "MOMENTUM", "ElementwiseSpec", "NestedSpec", "describe", "register"]

ADAM, LION, MOMENTUM = 0, 1, 2


class ElementwiseSpec(NamedTuple):
    """What ``FusedUpdate`` needs of an elementwise optimizer.

    The optimizer's state must be a tuple (``chain``) whose first item is a NamedTuple of
    params-shaped moment trees (``ScaleByAdamState(mu, nu)``, ``ScaleByLionState(mu)``,
    ``TraceState(trace)``) and whose other items are empty states.  ``b1`` is momentum's
    decay for ``MOMENTUM``.  ``weight_decay`` 0 means none (a mask is not supported).
    """

    algo: int
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


# optimizer -> spec, keyed by its update function (an Optimizer is a NamedTuple: not weak-
# referenceable, but its functions are, and each optimizer made by nestedfn has its own)
_SPECS: weakref.WeakKeyDictionary[Callable[..., Any], Any] = weakref.WeakKeyDictionary()


def register(opt: Optimizer, spec: ElementwiseSpec | NestedSpec) -> Optimizer:
    """Declare that ``opt`` is the optimizer ``spec`` describes; returns ``opt``."""
    _SPECS[opt.update] = spec
    return opt


def describe(opt: Optimizer) -> ElementwiseSpec | NestedSpec | None:
    """The native spec of ``opt``, or None when the native step does not know it."""
    try:
        return _SPECS.get(opt.update)
    except TypeError:
        return None
