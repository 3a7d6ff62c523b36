"""``as_mlx_optimizer(opt)``: any nestedfn optimizer as an ``mlx.optimizers.Optimizer``.

Most MLX training code (mlx-lm's trainer first) takes a stateful ``mlx.optimizers.Optimizer``:
``optimizer.update(model, grads)`` changes the model in place and ``optimizer.state`` is a
dict of arrays that ``mx.compile(step, inputs=[model.state, optimizer.state], outputs=...)``
captures.  ``NestedfnOptimizer`` keeps nestedfn's functional state in that dict::

    optimizer.state = {"step": uint64 array,           # updates applied, as MLX counts them
                       "learning_rate": array,          # the rate of the last update taken
                       "opt_state": [array, ...]}       # nestedfn's state, its leaves in
                                                        # ``nestedfn.tree.flatten`` order

and ``optimizer.opt_state`` rebuilds the state tree (``nf.tier_stats(optimizer.opt_state)``).
``tree_flatten(optimizer.state)`` + ``mx.save_safetensors`` saves it and
``optimizer.state = tree_unflatten(list(mx.load(path).items()))`` restores it, as MLX
documents; the restored leaves are checked against the optimizer's own layout (count, shape,
dtype) when it next initialises.

Inside one compiled graph the step is a traced array, so the update runs under
``core.branch_free()``: nested tiers and gradient accumulation take their branch-free forms
(every branch computed, ``mx.where`` on the step keeps the right one) with the results of
``apply_gradients``, step by step.  This is an integration-layer object (it mutates itself
and the model, as MLX's API requires), hence its floor beside ``lm``.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.optimizers

from nestedfn.optim.core import Optimizer, apply_updates, branch_free, learning_rate_of
from nestedfn.optim.hyperparams import InjectHyperparamsState, set_hyperparams
from nestedfn.tree import TreeDef, flatten, unflatten

__all__ = ["NestedfnOptimizer", "as_mlx_optimizer"]


def _like(grads: Any, params: Any) -> Any:
    """The part of ``params`` (possibly a superset, e.g. a whole ``nn.Module``) shaped like
    ``grads``, as ``mlx.optimizers.Optimizer.apply_gradients`` allows."""
    if isinstance(grads, dict):
        missing = [k for k in grads if k not in params]
        if missing:
            raise KeyError(f"as_mlx_optimizer: gradients for {missing} have no parameters")
        return {k: _like(g, params[k]) for k, g in grads.items()}
    if isinstance(grads, (list, tuple)):
        if len(params) < len(grads):
            raise ValueError(
                f"as_mlx_optimizer: {len(grads)} gradients for a list of {len(params)} params"
            )
        return [_like(g, p) for g, p in zip(grads, params)]
    return params


class NestedfnOptimizer(mlx.optimizers.Optimizer):
    """A nestedfn ``Optimizer`` behind the ``mlx.optimizers.Optimizer`` interface (see the
    module docstring).  Build it with ``as_mlx_optimizer``."""

    def __init__(self, opt: Optimizer, learning_rate: Any = None):
        super().__init__()
        if not isinstance(opt, Optimizer):
            raise TypeError(f"as_mlx_optimizer: expected a nestedfn Optimizer, got {opt!r}")
        self.opt = opt
        self._rate = learning_rate if learning_rate is not None else learning_rate_of(opt)
        self._treedef: TreeDef | None = None
        if self._rate is not None:
            self._state["learning_rate"] = self._rate_at(self._state["step"])

    # -- the rate mlx-lm reports ------------------------------------------------------------

    def _rate_at(self, step: mx.array) -> mx.array:
        rate = self._rate
        value = rate(step.astype(mx.int32)) if callable(rate) else rate
        return mx.array(value, dtype=mx.float32) if not isinstance(value, mx.array) else value

    @property
    def learning_rate(self) -> mx.array:
        """The learning rate of the last update taken (of the first before any), as
        ``mlx.optimizers`` keeps it: the schedule read at that step."""
        if "learning_rate" not in self._state:
            raise AttributeError(
                "as_mlx_optimizer: this optimizer's learning rate is unknown (no recipe "
                "recorded one); pass it: as_mlx_optimizer(opt, learning_rate=...)"
            )
        return self._state["learning_rate"]

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        """Settable when the optimizer is ``nf.inject_hyperparams(...)(learning_rate=...)``
        (the value lands in its state: no new graph); an error otherwise."""
        injected = self._injected()
        if injected is None or "learning_rate" not in injected.hyperparams:
            raise AttributeError(
                "as_mlx_optimizer: the learning rate is part of the nestedfn optimizer; build "
                "it with nf.inject_hyperparams to change it between steps"
            )
        new = set_hyperparams(self.opt_state, learning_rate=value)
        self._state["opt_state"] = flatten(new)[0]
        self._state["learning_rate"] = mx.array(value, dtype=mx.float32)

    def _injected(self) -> InjectHyperparamsState | None:
        if self._treedef is None:
            return None
        state = self.opt_state
        return state if isinstance(state, InjectHyperparamsState) else None

    # -- state ----------------------------------------------------------------------------------

    @property
    def state(self) -> dict:
        return self._state

    @state.setter
    def state(self, state: dict) -> None:
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(
                "as_mlx_optimizer: a state is a dict with 'step' (and 'opt_state'), as "
                f"optimizer.state gives it; got {type(state).__name__}"
            )
        state = dict(state)
        if "opt_state" in state and not isinstance(state["opt_state"], list):
            raise ValueError(
                "as_mlx_optimizer: state['opt_state'] must be the list of nestedfn state "
                f"leaves, got {type(state['opt_state']).__name__}"
            )
        self._state = state
        self._initialized = False
        if self._treedef is not None:
            self._check_loaded(self._treedef, None)
            self._initialized = True

    @property
    def opt_state(self) -> Any:
        """nestedfn's state tree (e.g. for ``nf.tier_stats``); needs ``init`` or an update."""
        if self._treedef is None:
            raise RuntimeError("as_mlx_optimizer: not initialised yet (call init or update)")
        return unflatten(self._treedef, list(self._state["opt_state"]))

    def _check_loaded(self, td: TreeDef, template: list[Any] | None) -> None:
        """A state set from outside (a loaded file) must fit the optimizer's own layout."""
        leaves = self._state.get("opt_state", [])
        if len(leaves) != td.num_leaves:
            raise ValueError(
                f"as_mlx_optimizer: the loaded state holds {len(leaves)} opt_state arrays, this "
                f"optimizer's state has {td.num_leaves}"
            )
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, mx.array):
                raise TypeError(f"as_mlx_optimizer: opt_state.{i} is not an mx.array: {leaf!r}")
            if template is not None:
                t = template[i]
                if leaf.shape != t.shape or leaf.dtype != t.dtype:
                    raise ValueError(
                        f"as_mlx_optimizer: opt_state.{i} is {leaf.dtype}{list(leaf.shape)}, "
                        f"the optimizer's state there is {t.dtype}{list(t.shape)}"
                    )
        self._state["opt_state"] = list(leaves)

    def init(self, parameters: Any) -> None:
        """Initialise nestedfn's state for ``parameters`` (a state set before is kept, and
        checked against the fresh layout)."""
        template, td = flatten(self.opt.init(parameters))
        for i, leaf in enumerate(template):
            if not isinstance(leaf, mx.array):
                raise TypeError(
                    f"as_mlx_optimizer: state leaf {i} is a {type(leaf).__name__}; "
                    "optimizer.state can only carry mx.arrays"
                )
        if "opt_state" in self._state:
            self._check_loaded(td, template)
        else:
            self._state["opt_state"] = template
        self._treedef = td
        self._initialized = True
        injected = self._injected()
        if injected is not None and "learning_rate" in injected.hyperparams:
            self._state.setdefault("learning_rate", injected.hyperparams["learning_rate"])

    # -- the update -----------------------------------------------------------------------------

    def apply_gradients(self, gradients: Any, parameters: Any) -> Any:
        """The updated parameters, shaped like ``gradients``: one nestedfn update at the
        step ``optimizer.step`` (branch-free, so it traces under ``mx.compile``)."""
        params = _like(gradients, parameters)
        if not self._initialized:
            self.init(params)
        step = self._state["step"]
        opt_state = unflatten(self._treedef, list(self._state["opt_state"]))
        with branch_free():
            updates, new_state = self.opt.update(
                gradients, opt_state, params, step.astype(mx.int32)
            )
        leaves, td = flatten(new_state)
        if td != self._treedef:
            raise ValueError(f"as_mlx_optimizer: the update changed the state's structure: {td}")
        self._state["opt_state"] = leaves
        if isinstance(new_state, InjectHyperparamsState) and "learning_rate" in (
            new_state.hyperparams
        ):
            self._state["learning_rate"] = new_state.hyperparams["learning_rate"]
        elif self._rate is not None:
            self._state["learning_rate"] = self._rate_at(step)
        self._state["step"] = step + 1
        return apply_updates(params, updates)


def as_mlx_optimizer(opt: Optimizer, learning_rate: Any = None) -> NestedfnOptimizer:
    """``opt`` (any nestedfn optimizer: ``nested_adam``, ``accumulate(...)``, chains, ...) as
    an ``mlx.optimizers.Optimizer``: ``update(model, grads)``, ``apply_gradients``,
    ``init``, ``state`` (capturable by ``mx.compile``), ``step``, ``learning_rate`` and
    ``opt_state`` (nestedfn's state tree).

    ``learning_rate`` (a float or a schedule of the step) is what ``optimizer.learning_rate``
    reports; by default the one ``opt``'s recipe recorded (``core.learning_rate_of``).
    """
    return NestedfnOptimizer(opt, learning_rate)
