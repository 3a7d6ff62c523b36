"""Tier assignment for ``nested``: which parameters update at which frequency.

Every function here works on the real dotted parameter paths (``nestedfn.tree.to_flat``'s
keys, e.g. ``model.layers.3.self_attn.q_proj.lora_a``) and gives a tree of ints shaped like
params: tier ``k`` of ``nested(..., frequencies)`` updates every ``frequencies[k]`` steps.

* ``by_depth(params, n_tiers)``: contiguous blocks of transformer layers (``layers.N``);
* ``by_pattern({regex: tier})`` and ``manual({path: tier})``: rules, checked against params so
  a rule or path that names nothing is an error, not a tier silently left empty;
* ``by_grad_norm(grads, n_tiers)``: by gradient size;
* ``describe(tiers, params, frequencies)``: the table a user reads before training.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any

import mlx.core as mx

from nestedfn.tree import PathError, TreeMismatchError, flatten, tree_map, unflatten

__all__ = [
    "TierRule",
    "by_depth",
    "by_grad_norm",
    "by_pattern",
    "LAYER_LISTS",
    "describe",
    "layer_index",
    "manual",
    "resolve",
]

Params = Any


def _leaf_paths(params: Params) -> tuple[list[Any], list[str], Any]:
    leaves, td = flatten(params)
    return leaves, td.paths(), td


def _check_n_tiers(n_tiers: int, who: str) -> None:
    if isinstance(n_tiers, bool) or not isinstance(n_tiers, int) or n_tiers < 1:
        raise ValueError(f"{who}: n_tiers must be a positive int, got {n_tiers!r}")


LAYER_LISTS = ("layers", "h", "blocks")


def layer_index(path: str, names: tuple[str, ...] = LAYER_LISTS) -> int | None:
    """The ``N`` of the first ``<name>.N`` segment pair in a dotted path (``name`` one of
    ``names``: mlx-lm calls its list of blocks ``layers``, GPT-2-style models ``h``, a few
    ``blocks``), or ``None``.

    ``model.layers.3.self_attn.q_proj.lora_a`` -> 3; ``model.h.2.attn.c_attn.lora_a`` -> 2;
    ``lm_head.weight`` -> None.
    """
    segs = path.split(".")
    for a, b in zip(segs, segs[1:]):
        if a in names and b.isdigit():
            return int(b)
    return None


def by_depth(
    params: Params,
    n_tiers: int,
    order: str = "shallow_fast",
    outside: int | None = 0,
    names: tuple[str, ...] = LAYER_LISTS,
    depths: Mapping[str, int] | None = None,
) -> Params:
    """Tiers by transformer depth: the layer indices present in ``params`` (the ``N`` of the
    first ``layers.N`` in each path) are sorted and cut into ``n_tiers`` contiguous blocks,
    as even as possible (the ``j``-th of ``L`` distinct indices goes to block ``j * n_tiers //
    L``).  ``order="shallow_fast"`` gives the shallowest block tier 0 (the fastest with
    ascending frequencies); ``"deep_fast"`` the deepest.

    Leaves outside any ``layers`` list (embeddings, final norm, head) go to tier ``outside``
    (default 0, the fast tier: they are trained as a plain optimizer would); ``outside=None``
    makes them an error.  Only indices that hold parameters count, so LoRA on the last 8 of 32
    layers splits those 8.  ``names``: the list names that hold blocks (see ``layer_index``).
    ``depths``: the depth of each leaf's path, when the paths do not say it (a model whose
    blocks sit in several lists, ``model.layers + model.kv_reuse_layers``: the position in
    the model's own block order, ``nestedfn.lm.blocks.block_depths``); a path it lacks is
    outside every block.  Raises ``ValueError`` when a tier would be empty.
    """
    _check_n_tiers(n_tiers, "by_depth")
    if order not in ("shallow_fast", "deep_fast"):
        raise ValueError(f"by_depth: order must be 'shallow_fast' or 'deep_fast', got {order!r}")
    if outside is not None and not (isinstance(outside, int) and 0 <= outside < n_tiers):
        raise ValueError(f"by_depth: outside must be a tier in 0..{n_tiers - 1} or None")
    leaves, paths, td = _leaf_paths(params)
    if depths is None:
        depth = [layer_index(p, names) for p in paths]
    else:
        depth = [depths.get(p) for p in paths]
    distinct = sorted({d for d in depth if d is not None})
    if len(distinct) < n_tiers:
        raise ValueError(
            f"by_depth: {n_tiers} tiers need at least {n_tiers} distinct layer indices, found "
            f"{len(distinct)} ({distinct}) in {len(paths)} parameter paths; some tier would "
            "be empty"
        )
    block = {d: j * n_tiers // len(distinct) for j, d in enumerate(distinct)}
    if order == "deep_fast":
        block = {d: n_tiers - 1 - t for d, t in block.items()}
    labels = []
    for p, d in zip(paths, depth):
        if d is None:
            if outside is None:
                raise ValueError(f"by_depth: {p!r} is in no layer list {names} and outside=None")
            labels.append(outside)
        else:
            labels.append(block[d])
    return unflatten(td, labels)


class TierRule:
    """A tier map defined by rules, not yet applied to a parameter tree.

    ``rule(path, leaf) -> int`` (what ``nested`` accepts as ``tiers``) and ``rule.resolve(params)``
    -> a tree of ints with every check (``nested`` calls ``resolve``, so a rule that names
    nothing fails at ``init``).
    """

    def __init__(self, assign: Callable[[str], int | None], check: Callable[[list[str]], None]):
        self._assign = assign
        self._check = check

    def __call__(self, path: str, leaf: Any = None) -> int:
        tier = self._assign(path)
        if tier is None:
            raise ValueError(f"no tier for parameter {path!r}: no rule matches and no default")
        return tier

    def resolve(self, params: Params) -> Params:
        leaves, paths, td = _leaf_paths(params)
        self._check(paths)
        return unflatten(td, [self(p, x) for p, x in zip(paths, leaves)])


def _check_tier_value(tier: Any, what: str, who: str) -> None:
    if isinstance(tier, bool) or not isinstance(tier, int) or tier < 0:
        raise ValueError(f"{who}: tier for {what} must be a non-negative int, got {tier!r}")


def by_pattern(
    rules: Mapping[str, int], default: int | None = None, params: Params | None = None
) -> TierRule | Params:
    """Tiers by regular expressions over dotted paths: the first rule (in order) whose regex
    ``re.search``-matches a path gives its tier; no match gives ``default`` or an error.

    Without ``params`` returns a ``TierRule`` for ``nested(..., tiers=rule)``; with ``params``
    the tree of ints.  Either way a rule that matches no parameter path is an error when it
    meets the params.
    """
    compiled = []
    for pattern, tier in rules.items():
        _check_tier_value(tier, f"pattern {pattern!r}", "by_pattern")
        compiled.append((pattern, re.compile(pattern), tier))
    if default is not None:
        _check_tier_value(default, "default", "by_pattern")
    if not compiled and default is None:
        raise ValueError("by_pattern: no rules and no default")

    def assign(path: str) -> int | None:
        for _, rx, tier in compiled:
            if rx.search(path):
                return tier
        return default

    def check(paths: list[str]) -> None:
        for pattern, rx, _ in compiled:
            if not any(rx.search(p) for p in paths):
                raise ValueError(
                    f"by_pattern: pattern {pattern!r} matches no parameter path (e.g. {paths[:3]})"
                )

    rule = TierRule(assign, check)
    return rule if params is None else rule.resolve(params)


def manual(
    mapping: Mapping[str, int], params: Params | None = None, default: int | None = None
) -> TierRule | Params:
    """Tiers by explicit dotted paths: ``{path: tier}``, where a path names a leaf or a whole
    subtree (``"model.layers.0"``); the longest matching path wins.  A leaf no path covers gets
    ``default`` or is an error; a path that names nothing in params raises ``PathError``
    (naming the longest prefix that exists).

    Without ``params`` returns a ``TierRule`` (checked when ``nested`` meets the params).
    """
    for path, tier in mapping.items():
        _check_tier_value(tier, f"path {path!r}", "manual")
    if default is not None:
        _check_tier_value(default, "default", "manual")
    by_len = sorted(mapping.items(), key=lambda kv: -len(kv[0]))

    def covers(prefix: str, path: str) -> bool:
        return path == prefix or path.startswith(prefix + ".")

    def assign(path: str) -> int | None:
        for prefix, tier in by_len:
            if covers(prefix, path):
                return tier
        return default

    def check(paths: list[str]) -> None:
        for prefix in mapping:
            if not any(covers(prefix, p) for p in paths):
                segs = prefix.split(".")
                longest = ""
                for n in range(len(segs), 0, -1):
                    cand = ".".join(segs[:n])
                    if any(covers(cand, p) for p in paths):
                        longest = cand
                        break
                raise PathError(
                    f"manual: unknown path {prefix!r}: longest existing prefix is "
                    f"{longest or '<root>'!r}",
                    path=prefix,
                    prefix=longest,
                )

    rule = TierRule(assign, check)
    return rule if params is None else rule.resolve(params)


def by_grad_norm(grads: Params, n_tiers: int) -> Params:
    """Tiers by gradient size: leaves ranked by per-element RMS of their gradient
    (``||g||_2 / sqrt(size)``, so large arrays are not favoured), largest first, cut into
    ``n_tiers`` blocks of (nearly) equal leaf count; the largest gradients get tier 0 (the
    fastest), the smallest the slowest tier, which accumulates them over its chunk.

    Ties keep flatten order.  A non-finite norm or fewer leaves than tiers is an error.
    Reads the gradients (synchronises with the device once).
    """
    _check_n_tiers(n_tiers, "by_grad_norm")
    leaves, td = flatten(grads)
    if len(leaves) < n_tiers:
        raise ValueError(f"by_grad_norm: {len(leaves)} leaves cannot fill {n_tiers} tiers")
    rms_arrays = [mx.sqrt(mx.sum(mx.square(g.astype(mx.float32))) / max(g.size, 1)) for g in leaves]
    rms = mx.stack(rms_arrays).tolist() if rms_arrays else []
    paths = None
    for i, r in enumerate(rms):
        if not math.isfinite(r):
            paths = paths or td.paths()
            raise ValueError(f"by_grad_norm: gradient of {paths[i]!r} has non-finite norm {r}")
    ranked = sorted(range(len(leaves)), key=lambda i: -rms[i])
    labels = [0] * len(leaves)
    for rank, i in enumerate(ranked):
        labels[i] = rank * n_tiers // len(leaves)
    return unflatten(td, labels)


def resolve(tiers: Any, params: Params) -> Params:
    """A tree of ints shaped like ``params`` from any tier spec ``nested`` accepts: a tree of
    ints (checked to be shaped like params), a ``TierRule`` or a function ``(path, leaf) ->
    int``.  Tier values are returned as given (``nested`` checks their range)."""
    if isinstance(tiers, TierRule):
        return tiers.resolve(params)
    if callable(tiers):
        leaves, paths, td = _leaf_paths(params)
        return unflatten(td, [tiers(p, x) for p, x in zip(paths, leaves)])
    try:
        tree_map(lambda a, b: None, params, tiers)
    except TreeMismatchError as e:
        problems = [
            (p, why.replace("the first tree", "params").replace("the second tree", "tiers"))
            for p, why in e.problems
        ]
        raise TreeMismatchError(problems, "the tiers tree is shaped unlike params") from None
    return tiers


def describe(tiers: Any, params: Params, frequencies: Any = None) -> str:
    """A printable table: tier, frequency, arrays, parameters, share of parameters, and the
    first and last path of each tier (tiers that hold nothing show up as zero rows).

    ``tiers`` is anything ``nested`` accepts (``"depth"`` needs ``frequencies``).
    """
    leaves, paths, _ = _leaf_paths(params)
    if isinstance(tiers, str):
        if tiers != "depth" or not frequencies:
            raise ValueError(f"describe: tiers={tiers!r}: only 'depth', with frequencies")
        tiers = by_depth(params, len(frequencies))
    if callable(tiers) and not isinstance(tiers, TierRule):
        labels = [tiers(p, x) for p, x in zip(paths, leaves)]
    else:
        labels = flatten(resolve(tiers, params))[0]
    for p, lab in zip(paths, labels):
        if isinstance(lab, bool) or not isinstance(lab, numbers.Integral) or lab < 0:
            raise ValueError(f"describe: {p!r} has no valid tier (label {lab!r})")
    n_tiers = max([int(x) + 1 for x in labels] + [len(frequencies or ())])
    rows = []
    total = sum(int(getattr(x, "size", 1)) for x in leaves)
    for k in range(n_tiers):
        idx = [i for i, lab in enumerate(labels) if int(lab) == k]
        size = sum(int(getattr(leaves[i], "size", 1)) for i in idx)
        freq = str(frequencies[k]) if frequencies is not None and k < len(frequencies) else "-"
        span = f"{paths[idx[0]]} .. {paths[idx[-1]]}" if idx else "(empty)"
        share = f"{100.0 * size / total:.1f}%" if total else "-"
        rows.append((str(k), freq, str(len(idx)), f"{size:,}", share, span))
    rows.append(("all", "", str(len(leaves)), f"{total:,}", "100.0%" if total else "-", ""))
    head = ("tier", "frequency", "arrays", "parameters", "share", "paths")
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(5)]
    lines = []
    for r in [head, *rows]:
        cells = [r[0].ljust(widths[0])] + [r[c].rjust(widths[c]) for c in range(1, 5)]
        lines.append("  ".join(cells + [r[5]]).rstrip())
    return "\n".join(lines)
