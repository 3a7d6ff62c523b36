"""Bounded YAML for configs and the CLI's YAML-valued flags (``--tiers``, ``--lr-schedule``,
``--optimizer-args``): small inputs cannot cost large time or memory, and every error is one
line.

``load_yaml(text, loader)`` composes the node graph first (aliases stay shared there, so this
is linear in the text) and refuses, before anything is constructed:

* a document whose aliases would expand it past ``MAX_NODES`` nodes (the "billion laughs"
  alias bomb: ~300 bytes that expand to millions of nodes) or that refers to itself;
* nesting deeper than ``MAX_DEPTH`` (PyYAML composes recursively);
* a mapping key that is not a string (``1: 2``, ``null: 2``, a list): every key of a config
  is an option name, a regex or an argument name; the message names the key's path.

Errors are ``YamlError`` (a ``yaml.YAMLError``, so callers that catch those keep working)
with a one-line message: the problem and its line and column.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["MAX_DEPTH", "MAX_NODES", "YamlError", "load_yaml"]

MAX_NODES = 100_000
MAX_DEPTH = 200


class YamlError(yaml.YAMLError):
    """YAML refused: one line naming the problem (and its line/column or key path)."""


def _where(mark: Any) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _one_line(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError):
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        mark = e.problem_mark or e.context_mark
        return f"{what or type(e).__name__}{_where(mark)}"
    return " ".join(str(e).split())


def _measure(root: yaml.Node) -> None:
    """Refuse an expansion past ``MAX_NODES``, a cycle, or a non-string key (iteratively)."""
    sizes: dict[int, int] = {}
    # (node, path, depth, entered): post-order over the graph, each node computed once
    stack: list[tuple[yaml.Node, str, int, bool]] = [(root, "", 0, False)]
    active: set[int] = set()
    while stack:
        node, path, depth, entered = stack.pop()
        key = id(node)
        if entered:
            active.discard(key)
            kids = _children(node)
            total = 1 + sum(sizes[id(k)] for k, _ in kids)
            if total > MAX_NODES:
                raise YamlError(
                    f"aliases expand the document past {MAX_NODES:,} nodes{_where(node.start_mark)}"
                    "; write the values out"
                )
            sizes[key] = total
            continue
        if key in sizes:
            continue
        if key in active:
            raise YamlError(f"an alias refers to itself{_where(node.start_mark)}")
        if depth > MAX_DEPTH:
            raise YamlError(f"nested deeper than {MAX_DEPTH} levels{_where(node.start_mark)}")
        active.add(key)
        stack.append((node, path, depth, True))
        if isinstance(node, yaml.MappingNode):
            for k, _ in node.value:
                if not (isinstance(k, yaml.ScalarNode) and k.tag == "tag:yaml.org,2002:str"):
                    shown = k.value if isinstance(k, yaml.ScalarNode) else f"a {k.id}"
                    at = f" in {path}" if path else ""
                    raise YamlError(
                        f"key {shown!s}{at} is not a string{_where(k.start_mark)}; keys are names "
                        "(quote it to make it one)"
                    )
        for child, seg in _children(node):
            stack.append((child, f"{path}.{seg}" if path else seg, depth + 1, False))


def _children(node: yaml.Node) -> list[tuple[yaml.Node, str]]:
    if isinstance(node, yaml.MappingNode):
        out = []
        for k, v in node.value:
            out.append((k, str(k.value) if isinstance(k, yaml.ScalarNode) else "?"))
            out.append((v, str(k.value) if isinstance(k, yaml.ScalarNode) else "?"))
        return out
    if isinstance(node, yaml.SequenceNode):
        return [(v, str(i)) for i, v in enumerate(node.value)]
    return []


def _check_depth(text: str, loader: type) -> None:
    """Refuse nesting past ``MAX_DEPTH`` from the parser's events (an iterative pass: the
    composer that follows recurses once per level)."""
    depth = deepest = 0
    quote = ""
    for ch in text:  # flow brackets first: PyYAML's scanner is quadratic in their nesting
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    if deepest > MAX_DEPTH:
        raise YamlError(f"nested deeper than {MAX_DEPTH} levels")
    ld = _loader(text, loader)
    depth = 0
    try:
        while ld.check_event():
            ev = ld.get_event()
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise YamlError(f"nested deeper than {MAX_DEPTH} levels{_where(ev.start_mark)}")
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except YamlError:
        raise
    except yaml.YAMLError as e:
        raise YamlError(_one_line(e)) from None
    finally:
        ld.dispose()


def _loader(text: str, loader: type) -> Any:
    try:
        return loader(text)
    except yaml.YAMLError as e:  # the reader refuses control characters at once
        raise YamlError(_one_line(e)) from None


def load_yaml(text: str, loader: type = yaml.SafeLoader) -> Any:
    """The value of YAML ``text`` (one document) read with ``loader`` (a ``SafeLoader``
    subclass), bounded as the module doc says; ``YamlError`` (one line) otherwise."""
    _check_depth(text, loader)
    ld = _loader(text, loader)
    try:
        try:
            node = ld.get_single_node()
        except yaml.YAMLError as e:
            raise YamlError(_one_line(e)) from None
        if node is None:
            return None
        # the resolver may tag a key by its value: recheck what a plain key resolves to
        _measure(node)
        try:
            return ld.construct_document(node)
        except yaml.YAMLError as e:
            raise YamlError(_one_line(e)) from None
    finally:
        ld.dispose()
