"""The GPU default step: Adam, AdamW, Lion, momentum and their tiers as multi-tensor kernels.

``compile_step(opt)`` on a GPU default device runs the optimizers ``nestedfn.optim.fused``
describes (``adam``, ``adamw``, ``lion``, ``momentum``, ``nested`` over them, ``nested_adam``)
through generated kernels (``mx.fast.cuda_kernel`` on CUDA, ``mx.fast.metal_kernel`` on Apple
silicon, one generated source for both).  A launch updates up to ``GROUP`` leaves of one row
shape (``shape[1:]``), each read where it lies (no gather, no packed buffer), and writes one
flat output per kind (params, moments, chunk sums); the new leaves are views of it (one
``mx.split`` per kind), in the tree layout ``opt.init`` makes, so checkpoints, ``tier_stats``
and resume see nothing new.  Views, because MLX's CUDA backend pays far more per array a
kernel allocates than for its arithmetic (the LoRA tree's Adam step on an H100: 4.1 ms with
views, 17.9 ms with one output per leaf).

Per leaf and element, every operation rounded once as the eager ``apply_gradients`` rounds it
(``__fmul_rn``/``__fadd_rn``/``__fdiv_rn``/``__fsqrt_rn`` on CUDA: no contraction into FMA;
the scalars computed in Python from the integer step, as eagerly)::

    Adam:      m' = b1 m + (1-b1) g,  v' = b2 v + (1-b2) g²,
               u = (m' c1) / (sqrt(v') c2 + eps)     [m' / (sqrt(v') + eps) without bias correction]
    Lion:      u = sign(b1 m + (1-b1) g),  m' = b2 m + (1-b2) g
    momentum:  t' = g + d t,  u = t'  [g + d t' with Nesterov]
    then       u += wd p (decoupled decay),  u *= -lr,  [u *= post: nested_adam's schedule],
               p' = p + u

A nested tier between its updates adds its gradients to its chunk sum (``acc' = acc + g``); at
its update the kernel reads ``(acc + g) / C_k`` (``reduce="mean"``) as the gradient and writes
``acc' = 0``.  An inactive tier's params come back as the very same arrays.

Safety: the first step of every (structure, phase) is checked against the eager
``apply_gradients``; a mismatch beyond float32 rounding or any error of the kernel path (one
that fails to compile or run included) turns the kernels off for this step function with ONE
``RuntimeWarning``, and the MLX graph serves from then on (that first step returns the eager
result).  The Metal twin cannot run in CI: only this self-check tests it, on the user's Mac.
Only float32 params, gradients and moments take the kernels; any other call (other dtypes, a
mask, a shapeless step, a CPU default device) runs the MLX graph.  Every leaf's shape and
dtype is checked before a launch, except the very arrays the previous step made (an identity
test: the step holds on to them until its next call).  ``NESTEDFN_NATIVE=0``, the native
steps' kill switch, turns the kernels off too.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Callable
from itertools import accumulate
from operator import attrgetter, is_, itemgetter
from typing import Any, NamedTuple

import mlx.core as mx

from nestedfn.fast.compile import CompiledStep
from nestedfn.fast.native import native_enabled
from nestedfn.optim.core import Grads, Optimizer, TrainState, apply_gradients, static_step
from nestedfn.optim.fused import ADAM, LION, MOMENTUM, ElementwiseSpec, NestedSpec, describe
from nestedfn.optim.transforms import _bias_correction
from nestedfn.tree import TreeDef, flatten
from nestedfn.tree.codegen import leaf_getter, tree_builder

__all__ = ["KernelSig", "MultiTensorStep", "compile_step", "kernel_source", "supports"]

GROUP = 32  # leaves per launch at most
TPB = 256  # threads per block (threadgroup)
MAX_BLOCKS = 1024  # per leaf; larger leaves loop (grid stride within the leaf's blocks)
ACCUMULATE = "ACCUMULATE"  # the kernel of an inactive nested tier: acc' = acc + g
_RTOL = 1e-5  # the self-check: max |kernel - eager| <= _RTOL * max |eager|, leaf by leaf
_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")
_WARNED: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def backend() -> str | None:
    """``"metal"``, ``"cuda"`` or None (no GPU backend)."""
    for name in ("metal", "cuda"):
        if getattr(getattr(mx, name, None), "is_available", lambda: False)():
            return name
    return None


def supports(opt: Optimizer) -> bool:
    """Whether ``opt`` is one the multi-tensor step knows (an ``ElementwiseSpec``, or nested
    tiers of such optimizers) and it is not turned off (``NESTEDFN_NATIVE=0``)."""
    if not native_enabled():
        return False
    spec = describe(opt)
    if isinstance(spec, NestedSpec):
        return all(isinstance(describe(o), ElementwiseSpec) for o in spec.inners)
    return isinstance(spec, ElementwiseSpec)


# -- the generated kernels ---------------------------------------------------------------------


class KernelSig(NamedTuple):
    """What one kernel source depends on (not the leaf sizes: they are a kernel input)."""

    algo: str  # ADAM, LION, MOMENTUM or ACCUMULATE
    k: int  # leaves per launch
    bias_correction: bool = True
    nesterov: bool = False
    has_wd: bool = False
    post: bool = False  # multiply by a global schedule value (nested_adam)
    acc: bool = False  # read a chunk sum (and write it back zeroed)
    mean: bool = False  # divide the chunk sum by the tier's frequency

    def input_names(self) -> list[str]:
        """Kind-major: every leaf's p, then every g, moments, chunk sums (the accumulate
        kernel: g, acc); then hp, meta."""
        ins = _leaf_params(self)[0]
        return [_arg(n, j) for n in ins for j in range(self.k)] + ["hp", "meta"]

    def output_names(self) -> list[str]:
        """One flat buffer per kind, leaf j at its offset: p', moments', chunk sums' (the
        accumulate kernel: acc')."""
        return _leaf_params(self)[1]


def _leaf_params(sig: KernelSig) -> tuple[list[str], list[str]]:
    """The per-leaf pointer names of the leaf function: (inputs, outputs)."""
    if sig.algo == ACCUMULATE:
        return ["g", "a"], ["ao"]
    moments = {ADAM: 2, LION: 1, MOMENTUM: 1}[sig.algo]
    acc = ["a"] if sig.acc else []
    ins = ["p", "g"] + [f"m{i}" for i in range(moments)] + acc
    return ins, ["po"] + [f"mo{i}" for i in range(moments)] + [f"{a}o" for a in acc]


def _arg(local: str, j: int) -> str:
    """The kernel input of leaf ``j`` for the leaf function's parameter ``local``."""
    return f"{local}_{j}" if local[-1].isdigit() else f"{local}{j}"


# the scalars (a float32 input ``hp``), computed in Python as the eager transforms compute them
HP = ("B1", "OMB1", "B2", "OMB2", "EPS", "C1", "C2", "WD", "NEG", "POST", "FREQ")

# what differs between the backends: arithmetic that rounds each operation once (no FMA
# contraction), qualifiers and grid indices; the rest of the source is shared
_OPS = {
    "cuda": {
        "MUL": "__fmul_rn({a}, {b})",
        "ADD": "__fadd_rn({a}, {b})",
        "DIV": "__fdiv_rn({a}, {b})",
        "SQRT": "__fsqrt_rn({a})",
        "DEV": "__device__ __forceinline__ ",
        "IN": "const float* __restrict__ ",
        "OUT": "float* __restrict__ ",
        "BLOCK": "blockIdx.x",
        "THREAD": "threadIdx.x",
    },
    "metal": {
        "MUL": "(({a}) * ({b}))",
        "ADD": "(({a}) + ({b}))",
        "DIV": "metal::precise::divide({a}, {b})",
        "SQRT": "metal::precise::sqrt({a})",
        "DEV": "inline ",
        "IN": "const device float* ",
        "OUT": "device float* ",
        "BLOCK": "threadgroup_position_in_grid.x",
        "THREAD": "thread_position_in_threadgroup.x",
    },
}


def _element_body(sig: KernelSig) -> list[str]:
    """The per-element statements, in C with the pseudo-ops MUL/ADD/DIV/SQRT (spelled per
    backend by ``_expand``; ``emulate`` runs them as MLX operations)."""
    if sig.algo == ACCUMULATE:
        return ["ao[i] = ADD(a[i], g[i]);"]
    lines = ["float gr = g[i];"]
    if sig.acc:
        lines.append("float s = ADD(a[i], gr);")
        lines.append("gr = DIV(s, FREQ);" if sig.mean else "gr = s;")
        lines.append("ao[i] = 0.0f;")
    if sig.algo == ADAM:
        lines += [
            "float m = ADD(MUL(B1, m0[i]), MUL(OMB1, gr));",
            "float v = ADD(MUL(B2, m1[i]), MUL(OMB2, MUL(gr, gr)));",
            "mo0[i] = m; mo1[i] = v;",
            "float u = DIV(MUL(m, C1), ADD(MUL(SQRT(v), C2), EPS));"
            if sig.bias_correction
            else "float u = DIV(m, ADD(SQRT(v), EPS));",
        ]
    elif sig.algo == LION:
        lines += [
            "float m = m0[i];",
            "float c = ADD(MUL(B1, m), MUL(OMB1, gr));",
            "float u = (float)(c > 0.0f) - (float)(c < 0.0f);",
            "mo0[i] = ADD(MUL(B2, m), MUL(OMB2, gr));",
        ]
    else:  # MOMENTUM: B1 is the decay
        lines += ["float t = ADD(gr, MUL(B1, m0[i]));", "mo0[i] = t;"]
        lines.append("float u = ADD(gr, MUL(B1, t));" if sig.nesterov else "float u = t;")
    lines.append("float pv = p[i];")
    if sig.has_wd:
        lines.append("u = ADD(u, MUL(WD, pv));")
    lines.append("u = MUL(u, NEG);")
    if sig.post:
        lines.append("u = MUL(u, POST);")
    lines.append("po[i] = ADD(pv, u);")
    return lines


_INNERMOST = re.compile(r"(?<![A-Za-z0-9_])(MUL|ADD|DIV|SQRT)\(([^()]*)\)")


def _expand(line: str, ops: dict[str, str]) -> str:
    """``line`` with its pseudo-ops spelled as ``ops`` spells them: the innermost call (no
    parenthesis in its arguments) first, set aside as a token ``@n@`` so that the call around
    it becomes innermost in turn; the tokens are put back at the end."""
    done: list[str] = []
    while m := _INNERMOST.search(line):
        args = [x.strip() for x in m.group(2).split(",")]
        done.append(ops[m.group(1)].format(**dict(zip("ab", args))))
        line = f"{line[: m.start()]}@{len(done) - 1}@{line[m.end() :]}"
    while "@" in line:
        line = re.sub(r"@(\d+)@", lambda t: done[int(t.group(1))], line)
    return line


def kernel_source(sig: KernelSig, backend: str) -> tuple[str, str]:
    """``(header, body)`` of the kernel for ``sig`` on ``backend`` (``"cuda"`` or ``"metal"``),
    for ``mx.fast.cuda_kernel``/``metal_kernel`` with ``sig.input_names()`` and
    ``sig.output_names()``; the same ``sig`` gives the same text.

    Block ``b`` of the 1-D grid belongs to leaf ``j`` with ``meta[j] <= b < meta[j + 1]``
    (``meta``: the ``k + 1`` block offsets, the ``k`` leaf sizes, the ``k`` offsets of the
    leaves in the flat outputs); the leaf's blocks stride over its elements."""
    ops, k = _OPS[backend], sig.k
    ins, outs = _leaf_params(sig)
    raw = "\n".join(_element_body(sig))
    params = [ops["IN"] + n for n in ins] + [ops["OUT"] + n for n in outs] + [ops["IN"] + "hp"]
    header = [
        f"// nestedfn multi-tensor step: {sig!r}",
        f"{ops['DEV']}void nf_leaf({', '.join(params)}, size_t n, size_t i0, size_t st) {{",
        *(
            f"  const float {h} = hp[{i}];"
            for i, h in enumerate(HP)
            if re.search(rf"(?<![A-Za-z0-9_]){h}(?![A-Za-z0-9_])", raw)
        ),
        "  for (size_t i = i0; i < n; i += st) {",
        *("    " + _expand(line, ops) for line in raw.split("\n")),
        "  }",
        "}",
        "",
    ]
    cases = []
    for j in range(k):
        args = ", ".join([_arg(n, j) for n in ins] + [f"{n} + off" for n in outs])
        cases.append(f"    case {j}: nf_leaf({args}, hp, n, i0, st); break;")
    body = [
        f"  const int b = (int){ops['BLOCK']};",
        f"  int lo = 0, hi = {k};",
        "  if (b >= meta[hi]) return;",
        "  while (hi - lo > 1) { int mid = (lo + hi) >> 1; if (b >= meta[mid]) lo = mid; "
        "else hi = mid; }",
        f"  const size_t n = (size_t)meta[{k} + 1 + lo];",
        f"  const size_t st = (size_t)(meta[lo + 1] - meta[lo]) * {TPB};",
        f"  const size_t i0 = (size_t)(b - meta[lo]) * {TPB} + (size_t){ops['THREAD']};",
        f"  const size_t off = (size_t)meta[{2 * k} + 1 + lo];",
        "  switch (lo) {",
        *cases,
        "    default: break;",
        "  }",
    ]
    return "\n".join(header), "\n".join(body)


def kernel_name(sig: KernelSig, backend: str) -> str:
    """A name unique to the source (MLX caches compiled kernels by name)."""
    header, src = kernel_source(sig, backend)
    return f"nestedfn_mt_{hashlib.sha1((header + src).encode()).hexdigest()[:16]}"


_KERNELS: dict[tuple[KernelSig, str], Any] = {}


def make_kernel(sig: KernelSig, backend: str) -> Callable[..., list[mx.array]]:
    """The MLX custom kernel for ``sig`` (cached): ``mx.fast.cuda_kernel`` or ``metal_kernel``
    with the generated source; called as MLX calls them (``inputs``, ``grid``, ...)."""
    key = (sig, backend)
    if key not in _KERNELS:
        header, src = kernel_source(sig, backend)
        factory = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
        _KERNELS[key] = factory(
            name=kernel_name(sig, backend),
            input_names=sig.input_names(),
            output_names=sig.output_names(),
            source=src,
            header=header,
        )
    return _KERNELS[key]


def emulate(sig: KernelSig, inputs: list[mx.array]) -> list[mx.array]:
    """The kernel's flat outputs for ``sig`` (1-D, one per kind, leaf after leaf): the very
    statements of ``_element_body`` run as MLX operations on whole leaves, each rounded once
    as the kernel rounds it.  The CPU tests' stand-in for the GPU (same inputs, ``hp``,
    ``meta``), so they check the generated arithmetic against eager ``apply_gradients``."""
    hp, meta, k = inputs[-2], inputs[-1], sig.k
    ins, outs = _leaf_params(sig)
    sizes = meta.tolist()[k + 1 : 2 * k + 1]
    code = "\n".join(_element_body(sig)).replace("(float)(", "_f32(").replace("float ", "")
    code = code.replace("[i]", "").replace("0.0f", "0.0").replace("; ", "\n").replace(";", "")
    ops: dict[str, Any] = {"MUL": mx.multiply, "ADD": mx.add, "DIV": mx.divide, "SQRT": mx.sqrt}
    ops["_f32"] = lambda x: x.astype(mx.float32)
    ops.update((h, hp[i]) for i, h in enumerate(HP))
    flat: dict[str, list[mx.array]] = {n: [] for n in outs}
    for j in range(k):
        env = {**ops, **{n: inputs[q * k + j] for q, n in enumerate(ins)}}
        if env["g"].size != sizes[j]:
            raise ValueError("emulate: meta does not match the leaf sizes")
        exec(code, env)  # our own generated statements
        for n in outs:
            flat[n].append(mx.broadcast_to(env[n], env["g"].shape).reshape(-1))
    return [mx.concatenate(flat[n]) for n in outs]


# -- the step ------------------------------------------------------------------------------------


class _Mismatch(Exception):
    """The kernel path cannot (or must not) serve: the MLX graph does."""


class _Group(NamedTuple):
    """One launch: ``take`` picks its leaves from the tier's, the outputs are ``shapes``
    (each ``(rows, *row_shape)``), split at ``cuts`` into the leaves (0-d ones if ``scalar``)."""

    sig: KernelSig
    take: Callable[[list], tuple]
    meta: mx.array  # int32: k + 1 block offsets, k sizes, k element offsets
    blocks: int
    shapes: list[Any]
    dtypes: list[Any]
    cuts: list[int]
    scalar: bool


class _Launches(NamedTuple):
    groups: list[_Group]
    order: Callable[[list], tuple]  # the outputs in group order -> in the tier's order


class _Tier(NamedTuple):
    idx: tuple[int, ...] | None  # positions in the params' leaves; None: all
    freq: int
    spec: ElementwiseSpec
    get: Callable[[Any], list | None]
    build: Callable[[list], Any]
    shapes: list[Any]


def _tier(idx: Any, freq: int, spec: Any, td: TreeDef, shapes: list[Any]) -> _Tier:
    return _Tier(idx, freq, spec, leaf_getter(td, False), tree_builder(td), shapes)


class _Plan(NamedTuple):
    """What a params structure needs: its leaves, its builder, its tiers, launches by kernel."""

    get: Callable[[Any], list | None]
    build: Callable[[list], Any]
    tiers: list[_Tier]
    shapes: list[Any]
    groups: dict[Any, _Launches]


def _taker(idx: tuple[int, ...]) -> Callable[[list], tuple]:
    """``leaves -> tuple(leaves[i] for i in idx)``, in C (``itemgetter``)."""
    if len(idx) == 1:
        i = idx[0]
        return lambda leaves: (leaves[i],)
    return itemgetter(*idx)


def _group(sig: KernelSig, idx: tuple[int, ...], shapes: list[Any], row: Any) -> _Group:
    """The launch of the leaves ``idx`` (``shapes``, all of row shape ``row``; None: 0-d)."""
    sizes = [math.prod(s) for s in shapes]
    starts = list(accumulate((max(1, min(MAX_BLOCKS, -(-n // TPB))) for n in sizes), initial=0))
    meta = mx.array(starts + sizes + list(accumulate(sizes[:-1], initial=0)), dtype=mx.int32)
    rows = [s[0] if s else 1 for s in shapes]
    n_out = len(sig.output_names())
    out_shapes = [(sum(rows), *(row or ()))] * n_out
    cuts = list(accumulate(rows[:-1]))
    return _Group(
        sig, _taker(idx), meta, starts[-1], out_shapes, [mx.float32] * n_out, cuts, row is None
    )


def _hp(values: list[Any]) -> mx.array:
    """The float32 scalars; Python numbers rounded to float32 as MLX rounds a weak scalar,
    ``mx.array`` values (a schedule's) taken as they are, without reading them back."""
    if not any(isinstance(v, mx.array) for v in values):
        return mx.array(values, dtype=mx.float32)
    if any(isinstance(v, mx.array) and (v.size != 1 or v.dtype != mx.float32) for v in values):
        raise _Mismatch
    f32 = [v.reshape(1) if isinstance(v, mx.array) else mx.array([v], mx.float32) for v in values]
    return mx.concatenate(f32)


def _scalars(spec: ElementwiseSpec, step: int, post: Any, freq: float) -> mx.array:
    """``hp`` (the ``HP`` names) of one tier's update at its ``step``."""
    lr = spec.learning_rate(step) if callable(spec.learning_rate) else spec.learning_rate
    c1 = c2 = 1.0
    if spec.algo == ADAM and spec.bias_correction:
        c1 = 1.0 / _bias_correction(spec.b1, step)
        c2 = 1.0 / math.sqrt(_bias_correction(spec.b2, step))
    b1, b2, wd = spec.b1, spec.b2, float(spec.weight_decay)
    values = [b1, 1.0 - b1, b2, 1.0 - b2, spec.eps, c1, c2, wd, -lr]
    return _hp(values + [1.0 if post is None else post, freq])


def _close(new: list[mx.array], ref: list[mx.array]) -> tuple[bool, float, bool]:
    """(within float32 rounding, the largest relative difference, bit-identical)."""
    worst, same = 0.0, True
    for a, b in zip(new, ref):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, math.inf, False
        diff = mx.max(mx.abs(a - b)).item() if a.size else 0.0
        scale = mx.max(mx.abs(b)).item() if b.size else 0.0
        if math.isnan(diff):
            if not mx.array_equal(a, b, equal_nan=True).item():
                return False, math.inf, False
            continue
        same = same and diff == 0.0
        worst = max(worst, diff / scale if scale else (0.0 if diff == 0.0 else math.inf))
    return worst <= _RTOL, worst, same


def _float32_like(leaves: list, shapes: list) -> bool:
    dtypes = list(map(_DTYPE, leaves))
    return list(map(_SHAPE, leaves)) == shapes and dtypes == [mx.float32] * len(leaves)


class MultiTensorStep(CompiledStep):
    """``compile_step(opt)`` on a GPU: the multi-tensor kernels, else the MLX graph.

    ``multitensor_steps`` counts the (structure, phase) keys the kernels served;
    ``checks`` holds one ``(key, max relative difference, bit-identical)`` per self-check.
    ``backend`` is ``"cuda"``, ``"metal"`` or (tests) ``"emulate"``: the same plumbing with a
    pure-MLX stand-in for the kernel.  ``group``: leaves per launch at most."""

    def __init__(
        self,
        opt: Optimizer,
        shapeless: bool = False,
        backend_name: str | None = None,
        group: int = GROUP,
    ) -> None:
        super().__init__(opt, shapeless=shapeless, native=False)
        self.spec = describe(opt)
        self.backend = backend_name or backend()
        self.group = group
        self.keys: set[Any] = set()
        self.checks: list[tuple[Any, float, bool]] = []
        self.off = self.backend is None or not supports(opt)
        self._plans: dict[TreeDef, _Plan] = {}
        self._last: Any = None
        # the leaves the last served step made (by role): known float32 of the plan's shapes,
        # so that a state handed back as it came out is not checked leaf by leaf again
        self._made: dict[Any, list] = {}
        self._making: dict[Any, list] = {}

    @property
    def graphs_built(self) -> int:
        return super().graphs_built + len(self.keys)

    @property
    def multitensor_steps(self) -> int:
        return len(self.keys)

    def __call__(self, state: TrainState, grads: Grads) -> TrainState:
        if not self.off and not self.shapeless and self._device_ok():
            new = None
            try:
                new = self._step(state, grads)
            except _Mismatch:
                pass
            except Exception as e:  # a kernel that does not compile or run: the graph serves
                self._turn_off(f"the multi-tensor kernel failed ({type(e).__name__}: {e})")
            if new is not None:
                return new
        return super().__call__(state, grads)

    def _device_ok(self) -> bool:
        return self.backend == "emulate" or mx.default_device() == mx.gpu

    def _turn_off(self, why: str) -> None:
        self.off = True
        _warn_once(
            why,
            f"nestedfn: {why}; compile_step runs the MLX graph for this optimizer from now on "
            "(results are unaffected; NESTEDFN_NATIVE=0 skips the kernels)",
        )

    # -- plans ---------------------------------------------------------------------------------

    def _plan(self, params: Any) -> tuple[_Plan, list]:
        """The plan of ``params``' structure and its leaves (the last structure tried first)."""
        if self._last is not None:
            leaves = self._last[0](params)
            if leaves is not None:
                return self._last[1], leaves
        leaves, td = flatten(params)
        plan = self._plans.get(td)
        if plan is None:
            if not all(isinstance(x, mx.array) for x in leaves):
                raise _Mismatch
            plan = self._plans[td] = self._make_plan(params, td, list(map(_SHAPE, leaves)))
        self._last = (plan.get, plan)
        return plan, leaves

    def _make_plan(self, params: Any, td: TreeDef, shapes: list) -> _Plan:
        spec = self.spec
        if isinstance(spec, ElementwiseSpec):
            tiers = [_tier(None, 1, spec, td, shapes)]
        else:
            nplan, _ = spec.plan_for(params)
            z = zip(nplan.index, spec.freqs, spec.inners, nplan.subdefs)
            tiers = [_tier(i, f, describe(o), sub, [shapes[j] for j in i]) for i, f, o, sub in z]
        return _Plan(leaf_getter(td, False), tree_builder(td), tiers, shapes, {})

    def _launches(self, plan: _Plan, k: int, base: KernelSig, shapes: list[Any]) -> _Launches:
        """The launches of tier ``k`` for kernels like ``base`` (cached per plan): leaves of
        one row shape (``shape[1:]``) together, ``self.group`` at most per launch, so that
        the flat outputs, shaped ``(rows, *row_shape)``, split into the leaves."""
        key = (k, base)
        if key in plan.groups:
            return plan.groups[key]
        by_row: dict[Any, list[int]] = {}
        for i, shape in enumerate(shapes):
            by_row.setdefault(tuple(shape[1:]) if shape else None, []).append(i)
        groups, position = [], []
        for row, members in by_row.items():
            for s in range(0, len(members), self.group):
                idx = tuple(members[s : s + self.group])
                groups.append(_group(base._replace(k=len(idx)), idx, [shapes[i] for i in idx], row))
                position += idx
        inverse = sorted(range(len(position)), key=position.__getitem__)  # leaf i at inverse[i]
        plan.groups[key] = _Launches(groups, _taker(tuple(inverse)))
        return plan.groups[key]

    # -- the step --------------------------------------------------------------------------------

    def _launch(self, group: _Group, inputs: list[mx.array]) -> list[list[mx.array]]:
        """The group's new leaves, per kind (p', moments', acc'), each in the group's order:
        views of the flat outputs (one split per kind), no copy."""
        if self.backend == "emulate":
            out = [x.reshape(group.shapes[0]) for x in emulate(group.sig, inputs)]
        else:
            out = make_kernel(group.sig, self.backend)(
                inputs=inputs,
                grid=(group.blocks * TPB, 1, 1),
                threadgroup=(TPB, 1, 1),
                output_shapes=group.shapes,
                output_dtypes=group.dtypes,
            )
        kinds = [mx.split(buf, group.cuts, axis=0) if group.cuts else [buf] for buf in out]
        if group.scalar:
            kinds = [[x.reshape(()) for x in kind] for kind in kinds]
        return kinds

    def _launch_all(self, launches: _Launches, kinds: list[list], hp: mx.array) -> list[list]:
        """Every launch of a tier over the leaves ``kinds`` (p, g, moments, acc, each in the
        tier's order); the new leaves per output kind, in the tier's order."""
        per_kind: list[list] = []
        for grp in launches.groups:
            ins: list[mx.array] = []
            for leaves in kinds:
                ins.extend(grp.take(leaves))
            ins.append(hp)
            ins.append(grp.meta)
            out = self._launch(grp, ins)
            per_kind = per_kind or [[] for _ in out]
            for acc_list, new in zip(per_kind, out):
                acc_list.extend(new)
        return [list(launches.order(x)) for x in per_kind]

    def _run_tier(
        self, plan: _Plan, k: int, pga: list[list], inner: Any, step: int, post: Any
    ) -> tuple[list, Any, list | None]:
        """Tier ``k``'s update from its leaves ``pga`` (params, grads, chunk sums if it has
        them): new param leaves, new inner state, new chunk-sum leaves."""
        tier = plan.tiers[k]
        spec, cls = tier.spec, tier.spec.state_cls
        if type(inner) is not tuple or len(inner) != spec.n_items or type(inner[0]) is not cls:
            raise _Mismatch
        moments = []
        for tree in inner[0]:
            leaves = tier.get(tree)
            if leaves is None or not self._checked(("m", k, len(moments)), leaves, tier.shapes):
                raise _Mismatch
            moments.append(leaves)
        acc = len(pga) == 3
        flags = (spec.bias_correction, spec.nesterov, spec.has_wd, post is not None, acc)
        base = KernelSig(spec.algo, 0, *flags, acc and self.spec.reduce == "mean")
        hp = _scalars(spec, step, post, float(tier.freq))
        kinds = pga[:2] + moments + pga[2:]
        outs = self._launch_all(self._launches(plan, k, base, tier.shapes), kinds, hp)
        new_m = outs[1 : 1 + len(moments)]
        for i, m in enumerate(new_m):
            self._making[("m", k, i)] = m
        new_inner = (type(inner[0])(*(tier.build(m) for m in new_m)),) + inner[1:]
        return outs[0], new_inner, outs[-1] if acc else None

    def _accumulate(self, plan: _Plan, k: int, g: list, acc: list) -> list:
        """Tier ``k`` between its updates: ``acc + g``."""
        hp = mx.array([0.0] * len(HP), dtype=mx.float32)
        launches = self._launches(plan, k, KernelSig(ACCUMULATE, 0), plan.tiers[k].shapes)
        return self._launch_all(launches, [g, acc], hp)[0]

    def _checked(self, role: Any, leaves: list, shapes: list) -> bool:
        """Float32 leaves of ``shapes``: the very arrays the last step made for ``role``
        (one identity test each), or checked shape and dtype."""
        made = self._made.get(role)
        if made is not None and len(made) == len(leaves) and all(map(is_, leaves, made)):
            return True
        return _float32_like(leaves, shapes)

    def _step(self, state: TrainState, grads: Grads) -> TrainState | None:
        """The kernels' step, or None where the MLX graph must serve (raises ``_Mismatch``
        for a state they cannot read); the first step of a (structure, phase) self-checked."""
        step = state.step
        s = int(step if isinstance(step, int) else static_step(step))
        plan, p_leaves = self._plan(state.params)
        g_leaves = plan.get(grads)
        if g_leaves is None or not self._checked("p", p_leaves, plan.shapes):
            return None
        if not _float32_like(g_leaves, plan.shapes):
            return None
        self._making = {}
        key = (id(plan), self.opt.phase(s))
        if isinstance(self.spec, ElementwiseSpec):
            new_p, new_state, _ = self._run_tier(
                plan, 0, [p_leaves, g_leaves], state.opt_state, s, None
            )
            self._making["p"] = new_p
            new = TrainState(plan.build(new_p), new_state, state.step + 1)
        else:
            new = self._nested_step(state, p_leaves, g_leaves, s, plan)
        if key not in self.keys:
            new = self._self_check(key, state, grads, new)
            if key not in self.keys:  # the eager result: nothing of ours to trust
                self._making = {}
        self._made, self._making = self._making, {}
        return new

    def _nested_step(
        self, state: TrainState, p_leaves: list, g_leaves: list, s: int, plan: _Plan
    ) -> TrainState:
        """``nested`` / ``nested_adam``: each tier updated, or its gradients added to its
        chunk sum (its params and moments the very same arrays)."""
        spec, ost = self.spec, state.opt_state
        post, nst = None, ost
        if spec.post is not None:  # nested_adam with a schedule: (NestedState, ())
            if type(ost) is not tuple or len(ost) != 2 or ost[1] != ():
                raise _Mismatch
            post, nst = spec.post(s), ost[0]
        if type(nst) is not spec.state_cls or len(nst.inner) != len(plan.tiers):
            raise _Mismatch
        new_p = list(p_leaves)
        inner, accs, counts = list(nst.inner), list(nst.acc), list(nst.count)
        for k, tier in enumerate(plan.tiers):
            g = [g_leaves[i] for i in tier.idx]
            acc = None
            if tier.freq > 1:
                acc = tier.get(nst.acc[k])
                if acc is None or not self._checked(("a", k), acc, tier.shapes):
                    raise _Mismatch
            if (s + 1) % tier.freq != 0:  # inactive: add to the chunk sum
                new_acc = self._making[("a", k)] = self._accumulate(plan, k, g, acc)
                accs[k] = tier.build(new_acc)
                if ("m", k, 0) in self._made:  # the tier's moments stay as they are
                    for i in range(len(nst.inner[k][0])):
                        self._making[("m", k, i)] = self._made[("m", k, i)]
                continue
            pga = [[p_leaves[i] for i in tier.idx], g] + ([acc] if acc is not None else [])
            upd, inner[k], new_acc = self._run_tier(
                plan, k, pga, nst.inner[k], s // tier.freq, post
            )
            for i, x in zip(tier.idx, upd):
                new_p[i] = x
            if new_acc is not None:
                accs[k] = tier.build(new_acc)
                self._making[("a", k)] = new_acc
            counts[k] = nst.count[k] + 1
        new_nst = nst._replace(inner=tuple(inner), acc=tuple(accs), count=tuple(counts))
        self._making["p"] = new_p
        new_state = (new_nst, ost[1]) if spec.post is not None else new_nst
        return TrainState(plan.build(new_p), new_state, state.step + 1)

    def _self_check(self, key: Any, state: TrainState, grads: Grads, new: TrainState) -> TrainState:
        """The first step of a (structure, phase): the kernels' result against the eager
        ``apply_gradients``; on a mismatch or an error, warn once, turn the kernels off and
        return the eager result."""
        ref = apply_gradients(self.opt, state, grads)
        new_leaves, new_td = flatten({"p": new.params, "s": new.opt_state})
        ref_leaves, ref_td = flatten({"p": ref.params, "s": ref.opt_state})
        if new_td != ref_td:
            self._turn_off("the multi-tensor step returned a state shaped unlike the eager one")
            return ref
        try:
            mx.eval(new_leaves)
        except Exception as e:
            self._turn_off(f"the multi-tensor kernel failed ({type(e).__name__}: {e})")
            return ref
        ok, worst, same = _close(new_leaves, ref_leaves)
        self.checks.append((key[1], worst, same))
        if not ok:
            self._turn_off(
                f"the multi-tensor step differs from apply_gradients (max relative difference "
                f"{worst:.3g} > {_RTOL:g}) on its first step"
            )
            return ref
        self.keys.add(key)
        return new


def compile_step(opt: Optimizer, shapeless: bool = False) -> MultiTensorStep:
    """``compile_step(opt)`` on a GPU default device (``nestedfn.fast.compile`` calls this when
    ``supports(opt)``): the multi-tensor kernels, the MLX graph for any call they cannot serve."""
    return MultiTensorStep(opt, shapeless=shapeless)
