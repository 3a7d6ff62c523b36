"""The native optimizer step: one multi-tensor C++ kernel (an MLX primitive) on the CPU.

``compile_step(opt)`` runs Adam, AdamW, Lion, momentum (``nestedfn.optim.optimizers``) and
``nested`` tiers of them (``nested_adam``) through ``_native.fused_update`` (``csrc/``, built
by ``pip install``): every param, gradient and state leaf is read where it lies, the whole
update is one pass over memory on all cores (vectorised for AVX-512, AVX2 or the baseline,
picked at load time), and each new leaf is written into the buffer of the leaf it replaces
when nothing else refers to that one any more (``state = step(state, grads)``; MLX's own
donation test).  Per leaf, Adam is::

    m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g²
    p' = p + (-lr) * ((m' c1) / (sqrt(v') c2 + eps) [+ wd p]),   c1 = 1/(1 - b1^t), c2 = 1/sqrt(1 - b2^t)

with every operation rounded as the eager ``apply_gradients`` rounds it (the scalars are
computed here from the integer step, as eagerly): bit-identical results for float32,
bfloat16 and float16 leaves.  A nested tier between its updates adds its gradients to its
chunk sum (``acc' = acc + g``, float32); at its update the kernel reads ``(acc + g) / C_k``
as the gradient and writes ``acc' = 0``.

The kernel runs lazily (an MLX graph, evaluated with the caller's eval, writing into donated
buffers) unless the tree's leaves average fewer than 4,096 elements: then it runs in the
call, into fresh buffers, sparing MLX's per-array graph work (docs/native_step.md has the
benchmark rows).  The state keeps the tree layout ``opt.init(params)`` makes.  Whatever the
kernel cannot reproduce exactly (a mask, a GPU, other dtypes) takes the MLX graph;
``NESTEDFN_NATIVE=0`` turns the native step off, and a module built against another MLX is
not loaded (warned once).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import mlx.core as mx

from nestedfn.optim.core import Grads, Optimizer, TrainState, static_step
from nestedfn.optim.fused import ADAM, ElementwiseSpec, NestedSpec, describe
from nestedfn.optim.transforms import _bias_correction
from nestedfn.tree import TreeDef, flatten
from nestedfn.tree.codegen import leaf_getter, tree_builder

__all__ = ["NativeStep", "native_module"]

_EAGER_BELOW = 1 << 12  # mean elements per leaf under which the kernel runs in the call
_LAZY: bool | None = None  # None: by the tree (above); True/False forces a way (benchmarks)
_MODULE: list[Any] = []  # [module or None] once loaded
_WARNED: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def native_enabled() -> bool:
    """False under the kill switch ``NESTEDFN_NATIVE=0`` (or ``false``, ``no``, ``off``): no
    native CPU step and no GPU multi-tensor step (``nestedfn.fast.multitensor``)."""
    return os.environ.get("NESTEDFN_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def native_module() -> Any:
    """The compiled ``nestedfn.fast._native`` module, or None: not built, turned off with
    ``NESTEDFN_NATIVE=0``, or built against another MLX (warned once)."""
    if not native_enabled():
        return None
    if not _MODULE:
        mod = None
        try:
            from nestedfn.fast import _native as mod  # type: ignore[attr-defined,no-redef]
        except ImportError as e:
            if "_native" not in str(e):  # built but not loadable (a missing libmlx, ...)
                _warn_once(
                    "import",
                    f"nestedfn: the native step could not be loaded ({e}); the pure-MLX "
                    "step serves (reinstall nestedfn to rebuild it)",
                )
            mod = None
        runtime = mx.__version__.split(".dev")[0].split("+")[0]
        if mod is not None and (mod.MLX_VERSION != runtime or not hasattr(mod, "Hyper")):
            _warn_once(  # another MLX, or an older nestedfn's module (no Hyper): not this ABI
                "abi",
                f"nestedfn: the native step was built against MLX {mod.MLX_VERSION} (MLX "
                f"{mx.__version__} runs) or by another nestedfn; it is not used (the pure-MLX "
                "step serves). Reinstall nestedfn (pip install -e .) to rebuild it.",
            )
            mod = None
        _MODULE.append(mod)
    return _MODULE[0]


class _NotNative(Exception):
    """This call cannot take the native step: the caller runs the MLX graph."""


def _scalar(x: Any) -> float:
    """A learning-rate value as a Python float: a number, or a float32 one-element array."""
    if isinstance(x, mx.array):
        if x.size != 1 or x.dtype != mx.float32:
            raise _NotNative
        return float(x.item())
    return float(x)


def _hyper(mod: Any, spec: ElementwiseSpec, step: int, post: float | None, f: float | None) -> Any:
    """The kernel's scalars (``_native.Hyper``) for ``spec`` at the integer ``step``, computed
    as the eager transforms compute them; ``f``: a tier's chunk divisor (its acc is read)."""
    lr = spec.learning_rate(step) if callable(spec.learning_rate) else spec.learning_rate
    h = mod.Hyper()
    h.algo = getattr(mod.Algo, spec.algo)
    h.b1, h.b2, h.eps = float(spec.b1), float(spec.b2), float(spec.eps)
    if spec.algo == ADAM and spec.bias_correction:
        h.c1 = 1.0 / _bias_correction(spec.b1, step)
        h.c2 = 1.0 / math.sqrt(_bias_correction(spec.b2, step))
    h.nesterov, h.has_wd, h.wd = spec.nesterov, spec.has_wd, float(spec.weight_decay)
    h.neg_lr = -_scalar(lr)
    h.post = 1.0 if post is None else post
    h.with_acc, h.f = f is not None, 1.0 if f is None else f
    return h


def _walkers(td: TreeDef) -> tuple[Callable[[Any], list | None], Callable[[list], Any]]:
    """``(leaves, build)`` for trees shaped as ``td`` (``nestedfn.tree.codegen``):
    ``leaves(tree)`` is the leaves in flatten order or None for a tree shaped otherwise (no
    type test per leaf: the binding refuses anything but an ``mx.array``); ``build(leaves)``
    the tree over a list of leaves.  Both are cached per ``td``."""
    return leaf_getter(td, check_leaves=False), tree_builder(td)


class _Tier(NamedTuple):
    idx: tuple[int, ...] | None  # None: every leaf (a plain optimizer)
    freq: int
    spec: ElementwiseSpec
    get: Callable[[Any], list | None]  # leaves of a tier-shaped tree
    build: Callable[[list], Any]


class _Plan(NamedTuple):
    build: Callable[[list], Any]  # the params tree over its leaves
    get: Callable[[Any], list | None]  # leaves of a params-shaped tree
    tiers: list[_Tier]
    lazy: bool


class NativeStep:
    """``(state, grads) -> state | None``: the native step of ``opt`` (``describe(opt)`` not
    None), or None for a call it cannot serve exactly (the caller runs the MLX graph).

    ``keys`` holds the (structure, shapes, dtypes, phase) served, as ``compile_step`` counts
    graphs."""

    def __init__(self, opt: Optimizer, spec: ElementwiseSpec | NestedSpec):
        self.opt = opt
        self.spec = spec
        self._plans: dict[TreeDef, _Plan] = {}
        self.keys: set[Any] = set()
        self._seen: set[Any] = set()
        self._last: tuple[Callable[[Any], list | None], _Plan] | None = None

    def supported(self) -> bool:
        """Whether the spec is one the native step runs (checked once per optimizer)."""
        if isinstance(self.spec, NestedSpec):
            return all(isinstance(describe(o), ElementwiseSpec) for o in self.spec.inners)
        return isinstance(self.spec, ElementwiseSpec)

    def _plan(self, params: Any) -> tuple[_Plan, list]:
        if self._last is not None:
            leaves = self._last[0](params)
            if leaves is not None:
                return self._last[1], leaves
        leaves, td = flatten(params)
        plan = self._plans.get(td)
        if plan is None:
            plan = self._plans[td] = self._make_plan(params, td)
        self._last = (plan.get, plan)
        return plan, leaves

    def _make_plan(self, params: Any, td: TreeDef) -> _Plan:
        spec = self.spec
        get, build = _walkers(td)
        if isinstance(spec, ElementwiseSpec):
            tiers = [_Tier(None, 1, spec, get, build)]
        else:
            plan, _ = spec.plan_for(params)
            tiers = [
                _Tier(idx, f, describe(o), *_walkers(sub))
                for idx, f, o, sub in zip(plan.index, spec.freqs, spec.inners, plan.subdefs)
            ]
        sizes = [x.size for x in flatten(params)[0] if isinstance(x, mx.array)]
        lazy = sum(sizes) >= _EAGER_BELOW * len(sizes) if _LAZY is None else _LAZY
        return _Plan(build, get, tiers, lazy)

    def __call__(self, state: TrainState, grads: Grads) -> TrainState | None:
        mod = native_module()
        if mod is None or mx.default_device() != mx.cpu:
            return None
        s = state.step if isinstance(state.step, int) else static_step(state.step)
        try:
            return self._step(mod, state, grads, int(s))
        except _NotNative:  # the MLX graph serves, or names what is wrong (a shape, a path)
            return None

    def _kernel(self, mod: Any, plan: _Plan, *args: Any) -> list:
        try:
            return mod.fused_update(*args, plan.lazy)
        except (ValueError, TypeError) as e:  # a dtype the kernel does not reproduce, ...
            raise _NotNative from e

    def _run(
        self,
        mod: Any,
        plan: _Plan,
        tier: _Tier,
        p: list,
        g: list,
        inner_state: Any,
        step: int,
        acc: list | None,
        post: float | None,
    ) -> tuple[list, Any, list | None]:
        """One kernel over a tier: new param leaves, new inner state, new acc leaves."""
        spec = tier.spec
        if (
            type(inner_state) is not tuple
            or len(inner_state) != spec.n_items
            or type(inner_state[0]) is not spec.state_cls
        ):
            raise _NotNative
        moments = [tier.get(tree) for tree in inner_state[0]]
        if any(m is None for m in moments):
            raise _NotNative
        f = None
        if acc is not None:
            f = float(tier.freq) if self.spec.reduce == "mean" else 1.0
        h = _hyper(mod, spec, step, post, f)
        out = self._kernel(mod, plan, p, g, moments, acc if acc is not None else [], h)
        n, k = len(g), len(moments)
        new_m = [tier.build(out[n * (1 + j) : n * (2 + j)]) for j in range(k)]
        new_inner = (type(inner_state[0])(*new_m),) + inner_state[1:]
        return out[:n], new_inner, (out[n * (1 + k) :] if acc is not None else None)

    def _step(self, mod: Any, state: TrainState, grads: Grads, s: int) -> TrainState:
        plan, p_leaves = self._plan(state.params)
        g_leaves = plan.get(grads)
        if g_leaves is None:
            raise _NotNative  # the MLX graph names what differs
        # leaf types, shapes and dtypes are checked by the kernel (a ValueError or TypeError
        # there: the MLX graph runs and names the path)
        if isinstance(self.spec, ElementwiseSpec):
            tier = plan.tiers[0]
            args = (p_leaves, g_leaves, state.opt_state, s, None, None)
            new_p, new_state, _ = self._run(mod, plan, tier, *args)
            new = TrainState(plan.build(new_p), new_state, state.step + 1)
        else:
            new = self._nested_step(mod, plan, state, p_leaves, g_leaves, s)
        # counted as a compiled graph is counted: structure, shapes, dtypes, phase
        phase = self.opt.phase(s)
        if (id(plan), phase) not in self._seen:
            self._seen.add((id(plan), phase))
            key = (id(plan), tuple(x.shape for x in p_leaves), tuple(x.dtype for x in p_leaves))
            self.keys.add((key, phase))
        return new

    def _nested_step(
        self, mod: Any, plan: _Plan, state: TrainState, p_leaves: list, g_leaves: list, s: int
    ) -> TrainState:
        spec = self.spec
        ost, post = state.opt_state, None
        nst = ost
        if spec.post is not None:  # nested_adam with a schedule: (NestedState, ())
            if type(ost) is not tuple or len(ost) != 2 or ost[1] != ():
                raise _NotNative
            lr = spec.post(s)
            if isinstance(lr, mx.array) and any(p.dtype != mx.float32 for p in p_leaves):
                raise _NotNative  # u * lr promotes to float32 eagerly: not this kernel
            post, nst = _scalar(lr), ost[0]
        if type(nst) is not spec.state_cls or len(nst.inner) != len(plan.tiers):
            raise _NotNative
        new_p = list(p_leaves)
        inner, accs, counts = list(nst.inner), list(nst.acc), list(nst.count)
        for k, tier in enumerate(plan.tiers):
            g = [g_leaves[i] for i in tier.idx]
            acc = tier.get(nst.acc[k]) if tier.freq > 1 else None
            if tier.freq > 1 and acc is None:
                raise _NotNative
            if (s + 1) % tier.freq != 0:  # inactive: add to the chunk sum; params stay
                h = mod.Hyper()
                h.algo = mod.Algo.ACCUM
                accs[k] = tier.build(self._kernel(mod, plan, [], g, [], acc, h))
                continue
            p = [p_leaves[i] for i in tier.idx]
            args = (p, g, nst.inner[k], s // tier.freq, acc, post)
            upd, inner[k], new_acc = self._run(mod, plan, tier, *args)
            for i, x in zip(tier.idx, upd):
                new_p[i] = x
            if new_acc is not None:
                accs[k] = tier.build(new_acc)
            counts[k] = nst.count[k] + 1
        new_nst = nst._replace(inner=tuple(inner), acc=tuple(accs), count=tuple(counts))
        new_state = (new_nst, ost[1]) if spec.post is not None else new_nst
        return TrainState(plan.build(new_p), new_state, state.step + 1)
