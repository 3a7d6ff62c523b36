"""The native optimizer step: one multi-tensor C++ kernel (an MLX primitive), on the CPU.

``compile_step(opt)`` runs Adam, AdamW, Lion, momentum (``nestedfn.optim.optimizers``) and their
nested versions (``nested`` over such an optimizer, ``nested_adam``) through
``FusedUpdate``, a C++ MLX primitive built by ``pip install`` (``csrc/``): it reads every
param, gradient and state leaf where it lies (no gather), computes the whole update in one
pass over memory on all cores (vectorised for AVX-512, AVX2 or the baseline, picked at load
time), and writes the new leaves, reusing a donated input buffer for each output (an input
nothing else refers to any more, e.g. the previous state after ``state = step(state, grads)``).

Its graph is linear in the leaves: one ``FusedUpdate`` per kernel has a one-byte token as its
only output, and the new leaves are ``TakeOutputs`` arrays of that token (in at most 96 groups
per kernel), each taking the buffer the kernel wrote.  Operands already computed when the step
is built (the previous state, evaluated gradients) are held by the primitive rather than made
graph inputs, so MLX's evaluator neither visits nor hashes them.  (MLX's multi-output
primitives make every output hold every input and every sibling: for the 336-leaf LoRA tree,
1008 outputs and 1344 inputs, more work than the update itself.)  MLX's main thread, once it
has evaluated the last group, joins the kernel that the stream's thread started: two threads
on two cores, none to wake.  When every operand is computed, the kernel need not wait for the
eval at all: a watcher thread starts it, in the old buffers, as soon as nothing but the step
refers to the previous params and moments (``state = step(state, grads)`` has dropped them;
MLX's own donation test), while MLX's evaluator is still walking the graph
(``NESTEDFN_NATIVE_EARLY=0`` turns this off).  The trees are walked and rebuilt in C++
(``_native.TreeSpec``).

Per leaf, Adam is::

    m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g²
    p' = p + (-lr) * ((m' c1) / (sqrt(v') c2 + eps) [+ wd p]),   c1 = 1/(1 - b1^t), c2 = 1/sqrt(1 - b2^t)

with every operation rounded as the eager ``apply_gradients`` rounds it (the scalars are
computed in Python from the integer step, exactly as eagerly): results are bit-identical to
``apply_gradients`` for float32, bfloat16 and float16 leaves.  A nested tier between its
updates adds its gradients to its chunk sum (``acc' = acc + g``, float32); at its update the
kernel reads ``(acc + g) / C_k`` as the gradient and writes ``acc' = 0``.

The state stays the tree layout ``opt.init(params)`` makes (checkpoints, ``tier_stats`` and
resume see nothing new).  The native step serves only when it can give the eager result:
CPU default device, a recognised optimizer, each gradient of its parameter's dtype and
moments of the parameter's dtype or float32; anything else (a mask, a GPU, other dtypes)
takes the compiled MLX graph as before.  ``NESTEDFN_NATIVE_MODE`` (``auto``, ``lazy``,
``eager``, below) says when the kernel runs.  ``NESTEDFN_NATIVE=0`` turns the native step off;
a native module built against another MLX than the one running is not loaded (a one-time
warning says so) and the MLX graph serves.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import Any, NamedTuple

import mlx.core as mx

from nestedfn.optim.core import Grads, Optimizer, TrainState, static_step
from nestedfn.optim.fused import ADAM, ElementwiseSpec, NestedSpec, describe
from nestedfn.optim.transforms import _bias_correction
from nestedfn.tree import TreeDef, TreeMismatchError, flatten
from nestedfn.tree.codegen import leaf_getter, tree_builder

__all__ = ["NativeStep", "available", "native_module"]

# How the kernel runs (``NESTEDFN_NATIVE_MODE``): "auto" (default) is "eager" for a tree
# whose leaves average fewer than ``_AUTO_EAGER`` elements (MLX's per-array graph work would
# dominate; the extra copy is small) and "lazy" otherwise.
# - "lazy": the graph above (one FusedUpdate per kernel: per step, or per tier of a nested
#   step), evaluated when the caller evaluates: by then ``state = step(state, grads)`` has
#   dropped the old state and the kernel writes into its buffers (MLX donation): no second
#   copy of params and moments, no fresh pages to fault in.
# - "eager": computed during the call, on all cores, the new leaves handed back evaluated:
#   no MLX graph work (cheapest on trees of many tiny arrays), but the caller still holds the
#   old state during the call, so the new state goes to fresh buffers (one more copy at the
#   peak; large fresh buffers come from the kernel as new pages on every step).
_MODE = os.environ.get("NESTEDFN_NATIVE_MODE", "auto").strip().lower()
_AUTO_EAGER = 1 << 12
_LAZY = _MODE != "eager"
_SHAPE = lambda x: x.shape  # noqa: E731
_DTYPE = lambda x: x.dtype  # noqa: E731


# -- the module ------------------------------------------------------------------------------

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
    """The compiled ``nestedfn._native`` module, or None: not built, turned off with
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
        if mod is not None:
            runtime = mx.__version__.split(".dev")[0].split("+")[0]
            if mod.MLX_VERSION != runtime:
                _warn_once(
                    "abi",
                    f"nestedfn: the native step was built against MLX {mod.MLX_VERSION} but MLX "
                    f"{mx.__version__} is running; it is not used (the pure-MLX step serves). "
                    "Reinstall nestedfn (pip install -e .) to rebuild it for this MLX.",
                )
                mod = None
        _MODULE.append(mod)
    return _MODULE[0]


def available() -> bool:
    """Whether the native step can run here (module loaded; the default device is the CPU)."""
    return native_module() is not None and mx.default_device() == mx.cpu


def _threads() -> int:
    try:
        return max(0, int(os.environ.get("NESTEDFN_NATIVE_THREADS", "0")))
    except ValueError:
        return 0


class _NotNative(Exception):
    """This call cannot take the native step: the caller runs the MLX graph."""


class _BadShape(Exception):
    """The kernel found a leaf shaped unlike its parameter: a user error, named by path."""


def _kernel_error(e: Exception) -> Exception:
    return _BadShape() if isinstance(e, ValueError) and "shape" in str(e) else _NotNative()


def _scalar(x: Any) -> float:
    """A learning-rate value as a Python float: a Python number, or a float32 ``mx.array``
    (read back: a tiny graph of the step only)."""
    if isinstance(x, mx.array):
        if x.size != 1 or x.dtype != mx.float32:
            raise _NotNative
        return float(x.item())
    return float(x)


def _kernel_args(spec: ElementwiseSpec, step: int) -> tuple:
    """The scalars of ``FusedUpdate`` for ``spec`` at the integer ``step``, computed as the
    eager transforms compute them."""
    lr = spec.learning_rate(step) if callable(spec.learning_rate) else spec.learning_rate
    if isinstance(lr, mx.array) and lr.dtype != mx.float32:
        raise _NotNative
    neg = -_scalar(lr)
    c1 = c2 = 1.0
    if spec.algo == ADAM and spec.bias_correction:
        c1 = 1.0 / _bias_correction(spec.b1, step)
        c2 = 1.0 / math.sqrt(_bias_correction(spec.b2, step))
    wd = float(spec.weight_decay)
    return (spec.algo, spec.b1, spec.b2, spec.eps, c1, c2, spec.nesterov, spec.has_wd, wd, neg)


def _encode(td: TreeDef) -> Any:
    """``td`` as the nested tuples ``_native.TreeSpec`` reads (see csrc/tree_spec.cpp)."""
    if td.kind == "leaf":
        return None
    if td.kind == "none":
        return ("none",)
    kids = tuple(_encode(c) for c in td.children)
    if td.kind == "dict":
        return ("dict", tuple(td.meta), kids)
    if td.kind in ("list", "tuple"):
        return (td.kind, kids)
    return ("nt", td.meta, kids)


def _plain_dicts(td: TreeDef) -> bool:
    return td.ctor is None and all(_plain_dicts(c) for c in td.children)


@lru_cache(maxsize=256)
def _walkers(td: TreeDef) -> tuple[Callable[[Any], list | None], Callable[[list], Any]]:
    """``(leaves, build)`` for trees shaped as ``td``: ``leaves(tree)`` is the leaves in
    flatten order or None for a tree shaped otherwise, without a type test per leaf (the
    kernel's binding refuses anything but an ``mx.array``: a TypeError, then the MLX graph
    runs and names the path); ``build(leaves)`` the tree over a list of leaves.  Walked in C++
    (``_native.TreeSpec``) where the native module has it and no dict node is an
    ``OrderedDict``/``defaultdict``, else the generated Python of ``nestedfn.tree.codegen``."""
    mod = native_module()
    if mod is not None and hasattr(mod, "TreeSpec") and _plain_dicts(td):
        spec = mod.TreeSpec(_encode(td))
        return spec.leaves, spec.build
    return leaf_getter(td, check_leaves=False), tree_builder(td)


def _getter(td: TreeDef) -> Callable[[Any], list | None]:
    return _walkers(td)[0]


def _builder(td: TreeDef) -> Callable[[list], Any]:
    return _walkers(td)[1]


def _mean_size(params: Any) -> float:
    leaves = [x for x in flatten(params)[0] if isinstance(x, mx.array)]
    return sum(x.size for x in leaves) / max(1, len(leaves))


class _Tier(NamedTuple):
    idx: tuple[int, ...] | None  # None: every leaf (a plain optimizer)
    freq: int
    spec: ElementwiseSpec
    get: Callable[[Any], list | None]  # leaves of a tier-shaped tree
    build: Callable[[list], Any]


class NativeStep:
    """``(state, grads) -> state | None``: the native step of ``opt`` (``describe(opt)`` not
    None), or None for a call it cannot serve exactly (the caller runs the MLX graph).

    ``plans`` counts the step plans made (one per params structure, as ``compile_step``
    counts graphs per structure and phase)."""

    def __init__(self, opt: Optimizer, spec: ElementwiseSpec | NestedSpec):
        self.opt = opt
        self.spec = spec
        self._plans: dict[Any, Any] = {}
        self.keys: set[Any] = set()  # (plan, shapes, dtypes, phase) served: "graphs"
        self._seen: set[Any] = set()
        self._lazy = _LAZY
        self._last: Any = None  # (params getter, plan) of the last structure

    def supported(self) -> bool:
        """Whether the spec is one the native step runs (checked once per optimizer)."""
        spec = self.spec
        if isinstance(spec, NestedSpec):
            return all(isinstance(describe(o), ElementwiseSpec) for o in spec.inners)
        return isinstance(spec, ElementwiseSpec)

    # -- plans -----------------------------------------------------------------------------

    def _plan(self, params: Any) -> tuple[Any, list]:
        last = self._last
        if last is not None:
            leaves = last[0](params)
            if leaves is not None:
                return last[1], leaves
        leaves, td = flatten(params)
        plan = self._plans.get(td)
        if plan is None:
            plan = self._plans[td] = self._make_plan(params, td)
        self._last = (_getter(td), plan)
        return plan, leaves

    def _make_plan(self, params: Any, td: TreeDef) -> Any:
        spec = self.spec
        if isinstance(spec, ElementwiseSpec):
            tier = _Tier(None, 1, spec, _getter(td), _builder(td))
            return (td, _builder(td), [tier], _getter(td), _mean_size(params))
        plan, _ = spec.plan_for(params)
        tiers = [
            _Tier(idx, f, describe(o), _getter(sub), _builder(sub))
            for idx, f, o, sub in zip(plan.index, spec.freqs, spec.inners, plan.subdefs)
        ]
        return (td, _builder(td), tiers, _getter(td), _mean_size(params))

    # -- the step --------------------------------------------------------------------------

    def __call__(self, state: TrainState, grads: Grads) -> TrainState | None:
        mod = native_module()
        if mod is None or mx.default_device() != mx.cpu:
            return None
        step = state.step
        s = step if isinstance(step, int) else static_step(step)
        try:
            return self._step(mod, state, grads, int(s))
        except _NotNative:
            return None
        except _BadShape:
            self._raise_shapes(state, grads)
            return None  # not reached unless only the state is off: the MLX graph names it

    def _raise_shapes(self, state: TrainState, grads: Grads) -> None:
        """Raise ``TreeMismatchError`` naming every gradient leaf shaped unlike its param."""
        p_leaves, td = flatten(state.params)
        g_leaves = flatten(grads)[0]
        problems = [
            (path, f"grads {tuple(g.shape)} vs params {tuple(p.shape)}")
            for path, p, g in zip(td.paths(), p_leaves, g_leaves)
            if getattr(g, "shape", None) != p.shape
        ]
        if problems:
            raise TreeMismatchError(problems, "compile_step: grads shaped unlike params")

    def _moments(self, tier: _Tier, inner_state: Any) -> list[list]:
        spec = tier.spec
        if (
            type(inner_state) is not tuple
            or len(inner_state) != spec.n_items
            or type(inner_state[0]) is not spec.state_cls
        ):
            raise _NotNative
        out = []
        for tree in inner_state[0]:
            leaves = tier.get(tree)
            if leaves is None:
                raise _NotNative
            out.append(leaves)
        return out

    def _run(
        self,
        mod: Any,
        tier: _Tier,
        p: list,
        g: list,
        inner_state: Any,
        step: int,
        acc: list | None,
        post: float | None,
    ) -> tuple[list, Any, list | None]:
        """One kernel over a tier: new param leaves, new inner state, new acc leaves."""
        moments = self._moments(tier, inner_state)
        args = _kernel_args(tier.spec, step)
        n = len(g)
        f = float(tier.freq) if (acc is not None and self.spec.reduce == "mean") else 1.0
        try:
            out = mod.fused_update(
                p,
                g,
                moments,
                acc if acc is not None else [],
                *args,
                post is not None,
                1.0 if post is None else post,
                acc is not None,
                f,
                _threads(),
                self._lazy,
            )
        except (ValueError, TypeError) as e:  # a dtype the kernel does not reproduce, ...
            raise _kernel_error(e) from e
        k = len(moments)
        new_m = [tier.build(out[n * (1 + j) : n * (2 + j)]) for j in range(k)]
        new_inner = (type(inner_state[0])(*new_m),) + inner_state[1:]
        new_acc = out[n * (1 + k) :] if acc is not None else None
        return out[:n], new_inner, new_acc

    def _step(self, mod: Any, state: TrainState, grads: Grads, s: int) -> TrainState:
        plan, p_leaves = self._plan(state.params)
        td, build, tiers, get, mean_size = plan
        g_leaves = get(grads)
        small = _MODE == "eager" or (_MODE == "auto" and mean_size < _AUTO_EAGER)
        self._lazy = not small and _LAZY
        if g_leaves is None:
            raise _NotNative  # the MLX graph names what differs
        # leaf types, shapes and dtypes are checked by the kernel (a ValueError or TypeError
        # there: the MLX graph runs and names the path)
        spec = self.spec
        if isinstance(spec, ElementwiseSpec):
            new_p, new_state, _ = self._run(
                mod, tiers[0], p_leaves, g_leaves, state.opt_state, s, None, None
            )
            new = TrainState(build(new_p), new_state, state.step + 1)
        else:
            new = self._nested_step(mod, state, p_leaves, g_leaves, s, plan)
        # served: count it as a compiled graph would be counted (structure, shapes, dtypes,
        # phase)
        phase = self.opt.phase(s)
        if (id(plan), phase) not in self._seen:  # shapes and dtypes: once per plan and phase
            self._seen.add((id(plan), phase))
            key = (id(plan), tuple(map(_SHAPE, p_leaves)), tuple(map(_DTYPE, p_leaves)))
            self.keys.add((key, phase))
        return new

    def _nested_step(
        self, mod: Any, state: TrainState, p_leaves: list, g_leaves: list, s: int, plan: Any
    ) -> TrainState:
        spec = self.spec
        td, build, tiers, _, _ = plan
        ost = state.opt_state
        post = None
        if spec.post is not None:  # nested_adam with a schedule: (NestedState, ())
            if type(ost) is not tuple or len(ost) != 2 or ost[1] != ():
                raise _NotNative
            lr = spec.post(s)
            if isinstance(lr, mx.array) and any(p.dtype != mx.float32 for p in p_leaves):
                raise _NotNative  # u * lr promotes to float32 eagerly: not this kernel
            post = _scalar(lr)
            nst = ost[0]
        else:
            nst = ost
        if type(nst) is not spec.state_cls or len(nst.inner) != len(tiers):
            raise _NotNative
        new_p = list(p_leaves)
        inner, accs, counts = list(nst.inner), list(nst.acc), list(nst.count)
        for k, tier in enumerate(tiers):
            f = tier.freq
            p = [p_leaves[i] for i in tier.idx]
            g = [g_leaves[i] for i in tier.idx]
            acc = None
            if f > 1:
                acc = tier.get(nst.acc[k])
                if acc is None:
                    raise _NotNative
            if (s + 1) % f != 0:  # inactive: add to the chunk sum; params stay as they are
                try:
                    out = mod.fused_update(
                        [],
                        g,
                        [],
                        acc,
                        3,
                        0.0,
                        0.0,
                        0.0,
                        1.0,
                        1.0,
                        False,
                        False,
                        0.0,
                        0.0,
                        False,
                        1.0,
                        False,
                        1.0,
                        _threads(),
                        self._lazy,
                    )
                except (ValueError, TypeError) as e:
                    raise _kernel_error(e) from e
                accs[k] = tier.build(out)
                continue
            upd, inner[k], new_acc = self._run(mod, tier, p, g, nst.inner[k], s // f, acc, post)
            for i, x in zip(tier.idx, upd):
                new_p[i] = x
            if new_acc is not None:
                accs[k] = tier.build(new_acc)
            counts[k] = nst.count[k] + 1
        new_nst = nst._replace(inner=tuple(inner), acc=tuple(accs), count=tuple(counts))
        new_state = (new_nst, ost[1]) if spec.post is not None else new_nst
        return TrainState(build(new_p), new_state, state.step + 1)
