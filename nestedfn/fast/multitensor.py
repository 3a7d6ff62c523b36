"""The GPU default step: Adam, AdamW, Lion, momentum and their tiers as multi-tensor kernels.

``compile_step(opt)`` on a GPU default device runs an optimizer that ``nestedfn.optim.fused``
describes (the native CPU step's spec: ``adam``, ``adamw``, ``lion``, ``momentum``, ``nested``
over them, ``nested_adam``) through generated kernels that update a *group* of leaves per
launch (``mx.fast.cuda_kernel`` on CUDA, ``mx.fast.metal_kernel`` on Apple silicon, one
generated source for both): each leaf is read where it lies (no gather, no packed buffer),
and the new state comes back in the tree layout ``opt.init`` makes (checkpoints, ``tier_stats``
and resume see nothing new).  Leaves of one row shape (``shape[1:]``) share a launch, at most
``GROUP`` (32) of them; the launch writes one flat output per kind (params,
moments, chunk sums) and the new leaves are views of it (one ``mx.split`` per kind).  On
MLX's CUDA backend every array a kernel allocates costs far more than its arithmetic: with
one output per leaf the LoRA tree's Adam step took 17.9 ms on an H100, with views 4.1 ms
(``benchmarks/gpu/``).

Per leaf and element, with every operation rounded as the eager ``apply_gradients`` rounds it
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
``apply_gradients``; a mismatch beyond float32 rounding, a kernel that fails to compile or run,
or any error of the kernel path turns the multi-tensor step off for this step function, with
ONE ``RuntimeWarning``, and the MLX graph serves from then on (that first step returns the
eager result).  The CUDA kernels are tested on an NVIDIA GPU (``benchmarks/gpu/``); the Metal
twin cannot run in CI: it is checked only by this run-time self-check, on the user's Mac.
Only float32 params, gradients and moments take the kernels; any other call (other dtypes, a
mask, a shapeless step, a CPU default device) runs the MLX graph.  Every leaf's shape and dtype
is checked before a launch, except the very arrays the previous step made (an identity test:
the step holds on to them until its next call, so a state dropped by the caller stays alive
until then).  ``NESTEDFN_NATIVE=0`` (the native steps' kill switch) turns it off.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Callable
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

__all__ = [
    "KernelSig",
    "MultiTensorStep",
    "compile_step",
    "kernel_source",
    "supports",
]

GROUP = 32  # leaves per launch at most
TPB = 256  # threads per block (threadgroup)
MAX_BLOCKS = 1024  # per leaf; larger leaves loop (grid stride within the leaf's blocks)
ACCUMULATE = 3  # the kernel of an inactive nested tier: acc' = acc + g
_RTOL = 1e-5  # the self-check: max |kernel - eager| <= _RTOL * max |eager|, leaf by leaf
_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")
_WARNED: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def backend() -> str | None:
    """``"cuda"``, ``"metal"`` or None (no GPU backend)."""
    try:
        if mx.metal.is_available():
            return "metal"
    except AttributeError:
        pass
    try:
        if mx.cuda.is_available():
            return "cuda"
    except AttributeError:
        pass
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

    algo: int  # ADAM, LION, MOMENTUM or ACCUMULATE
    k: int  # leaves per launch
    bias_correction: bool = True
    nesterov: bool = False
    has_wd: bool = False
    post: bool = False  # multiply by a global schedule value (nested_adam)
    acc: bool = False  # read a chunk sum (and write it back zeroed)
    mean: bool = False  # divide the chunk sum by the tier's frequency

    def moments(self) -> int:
        return {ADAM: 2, LION: 1, MOMENTUM: 1, ACCUMULATE: 0}[self.algo]

    def input_names(self) -> list[str]:
        """Kind-major: every leaf's p, then every g, moments, chunk sums (the accumulate
        kernel: g, acc); then hp, meta."""
        ins = _leaf_params(self)[0]
        return [_global_name(self, n, j, out=False) for n in ins for j in range(self.k)] + [
            "hp",
            "meta",
        ]

    def output_names(self) -> list[str]:
        """Kind-major: every leaf's p', then moments', chunk sums' (the accumulate kernel:
        acc'), one flat buffer per kind, leaf j at its offset."""
        return _leaf_params(self)[1]

    def per_leaf_outputs(self) -> int:
        return 1 if self.algo == ACCUMULATE else 1 + self.moments() + int(self.acc)

    def meta_size(self) -> int:
        """``meta``: k + 1 block offsets, k leaf sizes, k element offsets."""
        return 3 * self.k + 1


# the scalars (a float32 input ``hp``), computed in Python as the eager transforms compute them
HP = ("B1", "OMB1", "B2", "OMB2", "EPS", "C1", "C2", "WD", "NEG", "POST", "FREQ")

# arithmetic that rounds each operation once (no FMA contraction), per backend
_OPS = {
    "cuda": {
        "MUL": "__fmul_rn({a}, {b})",
        "ADD": "__fadd_rn({a}, {b})",
        "DIV": "__fdiv_rn({a}, {b})",
        "SQRT": "__fsqrt_rn({a})",
        "DEV": "__device__ __forceinline__ ",
        "IN": "const float* __restrict__ ",
        "OUT": "float* __restrict__ ",
        "CONST": "const float* __restrict__ ",
        "META": "const int32_t* __restrict__ ",
        "BLOCK": "blockIdx.x",
        "THREAD": "threadIdx.x",
        "SIZE": "size_t",
    },
    "metal": {
        "MUL": "(({a}) * ({b}))",
        "ADD": "(({a}) + ({b}))",
        "DIV": "metal::precise::divide({a}, {b})",
        "SQRT": "metal::precise::sqrt({a})",
        "DEV": "inline ",
        "IN": "const device float* ",
        "OUT": "device float* ",
        "CONST": "const device float* ",
        "META": "const device int32_t* ",
        "BLOCK": "threadgroup_position_in_grid.x",
        "THREAD": "thread_position_in_threadgroup.x",
        "SIZE": "size_t",
    },
}


def _element_body(sig: KernelSig) -> list[str]:
    """The per-element statements (C, shared by CUDA and Metal through MUL/ADD/DIV/SQRT)."""
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


def _expand_inner(line: str, ops: dict[str, str]) -> str:
    """Replace ``MUL(a, b)``, ``ADD(a, b)``, ``DIV(a, b)``, ``SQRT(a)`` by the backend's
    spelling: innermost calls (no parenthesis in their arguments) first, each set aside as a
    token ``@n@`` so that the calls around it become innermost in turn."""
    done: list[str] = []
    while True:
        m = _INNERMOST.search(line)
        if m is None:
            break
        args = _split_args(m.group(2))
        done.append(ops[m.group(1)].format(**dict(zip(("a", "b"), args))))
        line = line[: m.start()] + f"@{len(done) - 1}@" + line[m.end() :]
    while "@" in line:
        line = re.sub(r"@(\d+)@", lambda t: done[int(t.group(1))], line)
    return line


_INNERMOST = re.compile(r"(?<![A-Za-z0-9_])(MUL|ADD|DIV|SQRT)\(([^()]*)\)")


def _split_args(s: str) -> list[str]:
    out, cur, depth = [], "", 0
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return out


def _leaf_params(sig: KernelSig) -> tuple[list[str], list[str]]:
    """The per-leaf pointer names of the leaf function: (inputs, outputs)."""
    if sig.algo == ACCUMULATE:
        return ["g", "a"], ["ao"]
    ins = ["p", "g"] + [f"m{i}" for i in range(sig.moments())] + (["a"] if sig.acc else [])
    outs = ["po"] + [f"mo{i}" for i in range(sig.moments())] + (["ao"] if sig.acc else [])
    return ins, outs


def kernel_source(sig: KernelSig, backend: str) -> tuple[str, str]:
    """``(header, body)`` of the kernel for ``sig`` on ``backend`` (``"cuda"`` or ``"metal"``),
    for ``mx.fast.cuda_kernel``/``metal_kernel`` with ``sig.input_names()`` and
    ``sig.output_names()``.

    Block ``b`` of the 1-D grid belongs to leaf ``j`` with ``meta[j] <= b < meta[j + 1]``
    (``meta``: the ``k + 1`` block offsets, the ``k`` leaf sizes, the ``k``
    offsets of the leaves in the flat outputs); the leaf's blocks stride over its elements.  Deterministic: the same ``sig`` gives the same text."""
    ops = _OPS[backend]
    ins, outs = _leaf_params(sig)
    params = [ops["IN"] + n for n in ins] + [ops["OUT"] + n for n in outs]
    params += [ops["CONST"] + "hp", ops["SIZE"] + " n", ops["SIZE"] + " i0", ops["SIZE"] + " st"]
    scalars = [f"  const float {name} = hp[{i}];" for i, name in enumerate(HP)]
    used = [s for s in scalars if _uses(sig, s.split()[2])]
    body = [_expand_inner(line, ops) for line in _element_body(sig)]
    header = "\n".join(
        [
            f"// nestedfn multi-tensor step: {sig!r}",
            f"{ops['DEV']}void nf_leaf(" + ", ".join(params) + ") {",
            *used,
            f"  for ({ops['SIZE']} i = i0; i < n; i += st) {{",
            *("    " + line for line in body),
            "  }",
            "}",
            "",
        ]
    )
    cases = []
    for j in range(sig.k):
        lin, lout = _leaf_params(sig)
        args = [_global_name(sig, n, j, out=False) for n in lin]
        args += [f"{n} + off" for n in lout]
        cases.append(f"    case {j}: nf_leaf({', '.join(args)}, hp, n, i0, st); break;")
    size = ops["SIZE"]
    src = "\n".join(
        [
            f"  const int b = (int){ops['BLOCK']};",
            f"  int lo = 0, hi = {sig.k};",
            "  if (b >= meta[hi]) return;",
            "  while (hi - lo > 1) { int mid = (lo + hi) >> 1; if (b >= meta[mid]) lo = mid; "
            "else hi = mid; }",
            f"  const {size} n = ({size})meta[{sig.k} + 1 + lo];",
            f"  const {size} st = ({size})(meta[lo + 1] - meta[lo]) * {TPB};",
            f"  const {size} i0 = ({size})(b - meta[lo]) * {TPB} + ({size}){ops['THREAD']};",
            f"  const {size} off = ({size})meta[{2 * sig.k} + 1 + lo];",
            "  switch (lo) {",
            *cases,
            "    default: break;",
            "  }",
        ]
    )
    return header, src


def _uses(sig: KernelSig, name: str) -> bool:
    text = "\n".join(_element_body(sig))
    return re.search(rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])", text) is not None


def _global_name(sig: KernelSig, local: str, j: int, out: bool) -> str:
    """The kernel argument of leaf ``j`` for the leaf function's parameter ``local``."""
    if local in ("p", "g", "a", "po", "ao"):
        return f"{local}{j}"
    if local.startswith("mo"):
        return f"mo{local[2:]}_{j}"
    return f"m{local[1:]}_{j}"


def kernel_name(sig: KernelSig, backend: str) -> str:
    """A name unique to the source (MLX caches compiled kernels by name)."""
    header, src = kernel_source(sig, backend)
    digest = hashlib.sha1((header + src).encode()).hexdigest()[:16]
    return f"nestedfn_mt_{digest}"


_KERNELS: dict[tuple[KernelSig, str], Any] = {}


def make_kernel(sig: KernelSig, backend: str) -> Callable[..., list[mx.array]]:
    """The MLX custom kernel for ``sig`` (cached): ``mx.fast.cuda_kernel`` or ``metal_kernel``
    with the generated source; called as MLX calls them (``inputs``, ``grid``, ...)."""
    key = (sig, backend)
    kern = _KERNELS.get(key)
    if kern is None:
        header, src = kernel_source(sig, backend)
        factory = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
        kern = _KERNELS[key] = factory(
            name=kernel_name(sig, backend),
            input_names=sig.input_names(),
            output_names=sig.output_names(),
            source=src,
            header=header,
        )
    return kern


# -- the step ------------------------------------------------------------------------------------


class _Mismatch(Exception):
    """The kernel path cannot (or must not) serve: the MLX graph does."""


class _Group(NamedTuple):
    sig: KernelSig
    leaves: tuple[int, ...]  # positions in the tier's leaves
    take: Callable[[list], tuple]  # leaves -> the group's leaves
    meta: mx.array  # int32: k + 1 block offsets, k sizes (, k element offsets)
    blocks: int
    shapes: list[Any]  # output shapes
    dtypes: list[Any]
    cuts: list[int]  # views: where mx.split cuts the flat outputs (along their rows)
    scalar: bool  # views of 0-d leaves: reshaped to ()


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


def _taker(idx: tuple[int, ...]) -> Callable[[list], tuple]:
    """``leaves -> tuple(leaves[i] for i in idx)``, in C (``itemgetter``)."""
    if len(idx) == 1:
        i = idx[0]
        return lambda leaves: (leaves[i],)
    return itemgetter(*idx)


def _blocks(n: int) -> int:
    return max(1, min(MAX_BLOCKS, -(-n // TPB)))


def _hp_array(values: list[Any]) -> mx.array:
    """The float32 scalars; Python numbers rounded to float32 as MLX rounds a weak scalar,
    ``mx.array`` values (a schedule's) taken as they are, without reading them back."""
    if not any(isinstance(v, mx.array) for v in values):
        return mx.array(values, dtype=mx.float32)
    parts = []
    for v in values:
        if isinstance(v, mx.array):
            if v.size != 1 or v.dtype != mx.float32:
                raise _Mismatch
            parts.append(v.reshape(1))
        else:
            parts.append(mx.array([v], dtype=mx.float32))
    return mx.concatenate(parts)


def _scalars(spec: ElementwiseSpec, step: int, post: Any, freq: float) -> mx.array:
    lr = spec.learning_rate(step) if callable(spec.learning_rate) else spec.learning_rate
    neg = -lr
    c1 = c2 = 1.0
    if spec.algo == ADAM and spec.bias_correction:
        c1 = 1.0 / _bias_correction(spec.b1, step)
        c2 = 1.0 / math.sqrt(_bias_correction(spec.b2, step))
    return _hp_array(
        [
            spec.b1,
            1.0 - spec.b1,
            spec.b2,
            1.0 - spec.b2,
            spec.eps,
            c1,
            c2,
            float(spec.weight_decay),
            neg,
            1.0 if post is None else post,
            freq,
        ]
    )


def _close(new: list[mx.array], ref: list[mx.array]) -> tuple[bool, float, bool]:
    """(within float32 rounding, the largest relative difference, bit-identical)."""
    worst, same = 0.0, True
    for a, b in zip(new, ref):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False, math.inf, False
        diff = mx.max(mx.abs(a - b)).item() if a.size else 0.0
        scale = mx.max(mx.abs(b)).item() if b.size else 0.0
        if math.isnan(diff):
            both = mx.array_equal(a, b, equal_nan=True).item()
            if not both:
                return False, math.inf, False
            continue
        same = same and diff == 0.0
        worst = max(worst, diff / scale if scale else (0.0 if diff == 0.0 else math.inf))
    return worst <= _RTOL, worst, same


class MultiTensorStep(CompiledStep):
    """``compile_step(opt)`` on a GPU: the multi-tensor kernels, else the MLX graph.

    ``multitensor_steps`` counts the (structure, phase) keys the kernels served;
    ``checks`` holds one ``(key, max relative difference, bit-identical)`` per self-check.
    ``backend`` is ``"cuda"``, ``"metal"`` or (tests) ``"emulate"``: the same plumbing with a
    pure-MLX stand-in for the kernel."""

    def __init__(
        self,
        opt: Optimizer,
        shapeless: bool = False,
        backend_name: str | None = None,
        group: int = GROUP,
    ):
        super().__init__(opt, shapeless=shapeless, native=False)
        self.spec = describe(opt)
        self.backend = backend_name or backend()
        self.group = group
        self.keys: set[Any] = set()
        self.checks: list[tuple[Any, float, bool]] = []
        self.off = self.backend is None or not supports(opt)
        self._plans: dict[TreeDef, Any] = {}
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
            try:
                new = self._step(state, grads)
            except _Mismatch:
                new = None
            except Exception as e:  # a kernel that does not compile or run: the graph serves
                self._turn_off(f"the multi-tensor kernel failed ({type(e).__name__}: {e})")
                new = None
            if new is not None:
                return new
        return super().__call__(state, grads)

    def _device_ok(self) -> bool:
        if self.backend == "emulate":
            return True
        return mx.default_device() == mx.gpu

    def _turn_off(self, why: str) -> None:
        self.off = True
        _warn_once(
            why,
            f"nestedfn: {why}; compile_step runs the MLX graph for this optimizer from now on "
            "(results are unaffected; NESTEDFN_NATIVE=0 skips the kernels)",
        )

    # -- plans ---------------------------------------------------------------------------------

    def _plan(self, params: Any) -> tuple[Any, list]:
        last = self._last
        if last is not None:
            leaves = last[0](params)
            if leaves is not None:
                return last[1], leaves
        leaves, td = flatten(params)
        plan = self._plans.get(td)
        if plan is None:
            if not all(isinstance(x, mx.array) for x in leaves):
                raise _Mismatch
            plan = self._plans[td] = self._make_plan(params, td, leaves)
        self._last = (leaf_getter(td, check_leaves=False), plan)
        return plan, leaves

    def _make_plan(self, params: Any, td: TreeDef, leaves: list) -> Any:
        spec = self.spec
        shapes = list(map(_SHAPE, leaves))
        if isinstance(spec, ElementwiseSpec):
            tiers = [_Tier(None, 1, spec, leaf_getter(td, False), tree_builder(td), shapes)]
        else:
            nplan, _ = spec.plan_for(params)
            tiers = [
                _Tier(
                    idx,
                    f,
                    describe(o),
                    leaf_getter(sub, False),
                    tree_builder(sub),
                    [shapes[i] for i in idx],
                )
                for idx, f, o, sub in zip(nplan.index, spec.freqs, spec.inners, nplan.subdefs)
            ]
        return {
            "td": td,
            "get": leaf_getter(td, False),
            "build": tree_builder(td),
            "tiers": tiers,
            "shapes": shapes,
            "groups": {},
        }

    def _groups(self, plan: Any, k: int, base: KernelSig, shapes: list[Any]) -> _Launches:
        """The launches of tier ``k`` for kernels like ``base`` (cached per plan): leaves of
        one row shape (``shape[1:]``) together, ``self.group`` at most per launch, so that
        the flat outputs, shaped ``(rows, *row_shape)``, split into the leaves."""
        key = (k, base)
        launches = plan["groups"].get(key)
        if launches is not None:
            return launches
        by_row: dict[Any, list[int]] = {}
        for i, shape in enumerate(shapes):
            by_row.setdefault(tuple(shape[1:]) if shape else None, []).append(i)
        groups, position = [], []
        for row, members in by_row.items():
            for s in range(0, len(members), self.group):
                idx = tuple(members[s : s + self.group])
                sizes = [math.prod(shapes[i]) for i in idx]
                starts = [0]
                for size in sizes:
                    starts.append(starts[-1] + _blocks(size))
                sig = base._replace(k=len(idx))
                offsets = [sum(sizes[:q]) for q in range(len(idx))]
                rows = [shapes[i][0] if shapes[i] else 1 for i in idx]
                cuts = [sum(rows[: q + 1]) for q in range(len(idx) - 1)]
                meta = mx.array(starts + sizes + offsets, dtype=mx.int32)
                out_shapes = [(sum(rows), *(row or ()))] * len(sig.output_names())
                dtypes = [mx.float32] * len(out_shapes)
                take = _taker(idx)
                groups.append(
                    _Group(sig, idx, take, meta, starts[-1], out_shapes, dtypes, cuts, row is None)
                )
                position += idx
        inverse = [0] * len(position)
        for q, i in enumerate(position):
            inverse[i] = q
        launches = plan["groups"][key] = _Launches(groups, _taker(tuple(inverse)))
        return launches

    # -- the step --------------------------------------------------------------------------------

    def _launch(self, group: _Group, inputs: list[mx.array]) -> list[list[mx.array]]:
        """The group's new leaves, per kind (p', moments', acc'), each in the group's order."""
        sig = group.sig
        if self.backend == "emulate":
            out = [x.reshape(group.shapes[0]) for x in emulate(sig, inputs)]
        else:
            out = make_kernel(sig, self.backend)(
                inputs=inputs,
                grid=(group.blocks * TPB, 1, 1),
                threadgroup=(TPB, 1, 1),
                output_shapes=group.shapes,
                output_dtypes=group.dtypes,
            )
        # each leaf a view of the flat outputs (one split per kind): no copy, no allocation
        kinds = [mx.split(buf, group.cuts, axis=0) if group.cuts else [buf] for buf in out]
        if group.scalar:
            kinds = [[x.reshape(()) for x in kind] for kind in kinds]
        return kinds

    def _run_tier(
        self,
        plan: Any,
        k: int,
        tier: _Tier,
        p: list,
        g: list,
        inner_state: Any,
        acc: list | None,
        step: int,
        post: Any,
    ) -> tuple[list, Any, list | None]:
        """One tier's update: new param leaves, new inner state, new acc leaves."""
        spec = tier.spec
        if (
            type(inner_state) is not tuple
            or len(inner_state) != spec.n_items
            or type(inner_state[0]) is not spec.state_cls
        ):
            raise _Mismatch
        moments = []
        for tree in inner_state[0]:
            leaves = tier.get(tree)
            if leaves is None or not self._checked(("m", k, len(moments)), leaves, tier.shapes):
                raise _Mismatch
            moments.append(leaves)
        mean = acc is not None and self.spec.reduce == "mean"
        base = KernelSig(
            spec.algo,
            0,
            spec.bias_correction,
            spec.nesterov,
            spec.has_wd,
            post is not None,
            acc is not None,
            mean,
        )
        hp = _scalars(spec, step, post, float(tier.freq))
        launches = self._groups(plan, k, base, tier.shapes)
        kinds = [p, g, *moments] + ([acc] if acc is not None else [])
        outs = self._launch_all(launches, kinds, hp)
        new_p, new_m = outs[0], outs[1 : 1 + len(moments)]
        new_a = outs[-1] if acc is not None else None
        for i, m in enumerate(new_m):
            self._making[("m", k, i)] = m
        new_inner = (type(inner_state[0])(*(tier.build(m) for m in new_m)),) + inner_state[1:]
        return new_p, new_inner, new_a

    def _launch_all(self, launches: _Launches, kinds: list[list], hp: mx.array) -> list[list]:
        """Every launch of a tier over the leaves ``kinds`` (p, g, moments, acc, each in the
        tier's order); the new leaves per output kind, in the tier's order."""
        per_kind: list[list] | None = None
        for grp in launches.groups:
            ins: list[mx.array] = []
            for leaves in kinds:
                ins.extend(grp.take(leaves))
            ins.append(hp)
            ins.append(grp.meta)
            out = self._launch(grp, ins)
            if per_kind is None:
                per_kind = [[] for _ in out]
            for acc_list, new in zip(per_kind, out):
                acc_list.extend(new)
        assert per_kind is not None
        return [list(launches.order(x)) for x in per_kind]

    def _accumulate(self, plan: Any, k: int, tier: _Tier, g: list, acc: list) -> list:
        hp = mx.array([0.0] * len(HP), dtype=mx.float32)
        base = KernelSig(ACCUMULATE, 0)
        return self._launch_all(self._groups(plan, k, base, tier.shapes), [g, acc], hp)[0]

    @staticmethod
    def _float32_like(leaves: list, shapes: list) -> bool:
        return list(map(_SHAPE, leaves)) == shapes and list(map(_DTYPE, leaves)) == [
            mx.float32
        ] * len(leaves)

    def _checked(self, role: Any, leaves: list, shapes: list) -> bool:
        """Float32 leaves of ``shapes``: the very arrays the last step made for ``role``
        (one identity test each), or checked shape and dtype."""
        made = self._made.get(role)
        if made is not None and len(made) == len(leaves) and all(map(is_, leaves, made)):
            return True
        return self._float32_like(leaves, shapes)

    def _step(self, state: TrainState, grads: Grads) -> TrainState | None:
        step = state.step
        s = int(step if isinstance(step, int) else static_step(step))
        plan, p_leaves = self._plan(state.params)
        g_leaves = plan["get"](grads)
        if g_leaves is None:
            return None
        if not self._checked("p", p_leaves, plan["shapes"]) or not self._float32_like(
            g_leaves, plan["shapes"]
        ):
            return None
        self._making = {}
        phase = self.opt.phase(s)
        key = (id(plan), phase)
        spec = self.spec
        if isinstance(spec, ElementwiseSpec):
            new_p, new_state, _ = self._run_tier(
                plan, 0, plan["tiers"][0], p_leaves, g_leaves, state.opt_state, None, s, None
            )
            self._making["p"] = new_p
            new = TrainState(plan["build"](new_p), new_state, state.step + 1)
        else:
            new = self._nested_step(state, p_leaves, g_leaves, s, plan)
        if key not in self.keys:
            new = self._self_check(key, state, grads, new)
            if key not in self.keys:  # the eager result: nothing of ours to trust
                self._making = {}
        self._made, self._making = self._making, {}
        return new

    def _nested_step(
        self, state: TrainState, p_leaves: list, g_leaves: list, s: int, plan: Any
    ) -> TrainState:
        spec = self.spec
        ost = state.opt_state
        post = None
        if spec.post is not None:  # nested_adam with a schedule: (NestedState, ())
            if type(ost) is not tuple or len(ost) != 2 or ost[1] != ():
                raise _Mismatch
            post = spec.post(s)
            nst = ost[0]
        else:
            nst = ost
        tiers = plan["tiers"]
        if type(nst) is not spec.state_cls or len(nst.inner) != len(tiers):
            raise _Mismatch
        new_p = list(p_leaves)
        inner, accs, counts = list(nst.inner), list(nst.acc), list(nst.count)
        for k, tier in enumerate(tiers):
            f = tier.freq
            p = [p_leaves[i] for i in tier.idx]
            g = [g_leaves[i] for i in tier.idx]
            acc = None
            if f > 1:
                acc = tier.get(nst.acc[k])
                if acc is None or not self._checked(("a", k), acc, tier.shapes):
                    raise _Mismatch
            if (s + 1) % f != 0:  # inactive: add to the chunk sum; params stay as they are
                new_acc = self._making[("a", k)] = self._accumulate(plan, k, tier, g, acc)
                accs[k] = tier.build(new_acc)
                if ("m", k, 0) in self._made:  # the tier's moments stay as they are
                    for i in range(len(nst.inner[k][0])):
                        self._making[("m", k, i)] = self._made[("m", k, i)]
                continue
            upd, inner[k], new_acc = self._run_tier(
                plan, k, tier, p, g, nst.inner[k], acc, s // f, post
            )
            for i, x in zip(tier.idx, upd):
                new_p[i] = x
            if new_acc is not None:
                accs[k] = tier.build(new_acc)
                self._making[("a", k)] = new_acc
            counts[k] = nst.count[k] + 1
        new_nst = nst._replace(inner=tuple(inner), acc=tuple(accs), count=tuple(counts))
        new_state = (new_nst, ost[1]) if spec.post is not None else new_nst
        self._making["p"] = new_p
        return TrainState(plan["build"](new_p), new_state, state.step + 1)

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


def emulate(sig: KernelSig, inputs: list[mx.array]) -> list[mx.array]:
    """The kernel's flat outputs for ``sig`` (1-D, one per kind, leaf after leaf) computed
    with MLX operations in the kernel's order: the CPU tests' stand-in for the GPU, same
    inputs, ``hp`` and ``meta``."""
    hp, meta = inputs[-2], inputs[-1]
    v = dict(zip(HP, (hp[i] for i in range(len(HP)))))
    k = sig.k
    names = _leaf_params(sig)[0]
    leaf = {n: inputs[q * k : (q + 1) * k] for q, n in enumerate(names)}
    sizes = meta.tolist()[k + 1 : 2 * k + 1]
    outs: dict[str, list[mx.array]] = {n: [] for n in _leaf_params(sig)[1]}
    for j in range(k):
        if int(math.prod(leaf["g"][j].shape)) != sizes[j]:
            raise ValueError("emulate: meta does not match the leaf sizes")
        if sig.algo == ACCUMULATE:
            outs["ao"].append(leaf["a"][j] + leaf["g"][j])
            continue
        p, g = leaf["p"][j], leaf["g"][j]
        ms = [leaf[f"m{i}"][j] for i in range(sig.moments())]
        if sig.acc:
            s = leaf["a"][j] + g
            g = s / v["FREQ"] if sig.mean else s
        if sig.algo == ADAM:
            m = v["B1"] * ms[0] + v["OMB1"] * g
            vv = v["B2"] * ms[1] + v["OMB2"] * (g * g)
            if sig.bias_correction:
                u = (m * v["C1"]) / (mx.sqrt(vv) * v["C2"] + v["EPS"])
            else:
                u = m / (mx.sqrt(vv) + v["EPS"])
            new_m = [m, vv]
        elif sig.algo == LION:
            u = mx.sign(v["B1"] * ms[0] + v["OMB1"] * g)
            new_m = [v["B2"] * ms[0] + v["OMB2"] * g]
        else:
            t = g + v["B1"] * ms[0]
            u = g + v["B1"] * t if sig.nesterov else t
            new_m = [t]
        if sig.has_wd:
            u = u + v["WD"] * p
        u = u * v["NEG"]
        if sig.post:
            u = u * v["POST"]
        outs["po"].append(p + u)
        for i, x in enumerate(new_m):
            outs[f"mo{i}"].append(x)
        if sig.acc:
            outs["ao"].append(mx.zeros_like(p))
    return [mx.concatenate([x.reshape(-1) for x in outs[n]]) for n in _leaf_params(sig)[1]]


def compile_step(opt: Optimizer, shapeless: bool = False) -> MultiTensorStep:
    """``compile_step(opt)`` on a GPU default device (``nestedfn.fast.compile`` calls this when
    ``supports(opt)``): the multi-tensor kernels, the MLX graph for any call they cannot serve."""
    return MultiTensorStep(opt, shapeless=shapeless)
