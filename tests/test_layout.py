"""The package plan holds: nestedfn's imports point one way, down the layers.

    tree -> optim -> {tiered, fast, run} -> {lm, testing} -> cli

A module may import from its own package and from packages on lower floors, never from a
higher floor nor from another package on its own floor (``tiered``, ``fast`` and ``run`` stand
side by side).  Every import counts, including the ones inside functions.  The old top-level
module names keep working as the same module objects.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import nestedfn

ROOT = Path(nestedfn.__file__).parent
FLOOR = {
    "tree": 0,
    "optim": 1,
    "tiered": 2,
    "fast": 2,
    "run": 2,
    "lm": 3,
    "bridge": 3,
    "testing": 3,
    "cli": 4,
    "__main__": 5,
}


def package_of(module: str) -> str | None:
    """``nestedfn.fast.compile`` -> ``fast``; ``nestedfn`` itself -> ``None``."""
    parts = module.split(".")
    if parts[0] != "nestedfn" or len(parts) == 1:
        return None
    return parts[1]


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, module)`` for every nestedfn import in ``path``, relative ones resolved."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("nestedfn")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")[: -node.level]
                base = ".".join(pkg + ([base] if base else []))
            if base == "nestedfn" or node.module is None:  # from nestedfn / . import module
                out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
            elif base.startswith("nestedfn"):
                out.append((node.lineno, base))
    return out


def violations(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``, or ``None`` when the plan allows it."""
    src, dst = package_of(importer), package_of(imported)
    if src is None:  # nestedfn/__init__.py re-exports everything
        return None
    if dst is None:
        return "imports the top-level nestedfn package (which imports everything)"
    if src == dst:
        return None
    if dst not in FLOOR:
        return f"imports {imported}, which is in no package of the plan"
    if FLOOR[dst] > FLOOR[src]:
        return f"imports {imported} from a higher floor ({dst} over {src})"
    if FLOOR[dst] == FLOOR[src]:
        return f"imports {imported} from its own floor ({dst} beside {src})"
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_every_import_points_down_the_plan():
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        importer = module_name(path)
        pkg = package_of(importer)
        assert pkg is None or pkg in FLOOR, f"{path}: package {pkg!r} is not in the plan"
        for line, imported in imported_modules(path, importer):
            why = violations(importer, imported)
            if why:
                problems.append(f"{path.relative_to(ROOT.parent)}:{line}: {why}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "importer, imported, allowed",
    [
        ("nestedfn.optim.core", "nestedfn.tree.structure", True),
        ("nestedfn.tree.structure", "nestedfn.optim.core", False),  # up
        ("nestedfn.fast.compile", "nestedfn.tiered.cms", False),  # sideways
        ("nestedfn.lm.trainer", "nestedfn.run.checkpoint", True),
        ("nestedfn.run.checkpoint", "nestedfn.lm.trainer", False),
        ("nestedfn.tiered.cms", "nestedfn", False),
        ("nestedfn.cli", "nestedfn.lm.trainer", True),
        ("nestedfn.tree.paths", "nestedfn.tree.structure", True),
    ],
)
def test_the_rule_itself(importer, imported, allowed):
    assert (violations(importer, imported) is None) == allowed


def test_imports_are_found_inside_functions_and_relative(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "from . import sibling\ndef f():\n    from nestedfn.lm.trainer import train\n"
        "import nestedfn.tree\nfrom nestedfn import run\n"
    )
    got = [m for _, m in imported_modules(f, "nestedfn.fast.m")]
    assert sorted(got) == sorted(
        ["nestedfn.fast.sibling", "nestedfn.lm.trainer", "nestedfn.tree", "nestedfn.run"]
    )


@pytest.mark.parametrize("old, new", sorted(nestedfn.MOVED_MODULES.items()))
def test_old_module_names_are_the_new_modules(old, new):
    assert importlib.import_module(f"nestedfn.{old}") is new
    assert getattr(nestedfn, old) is new


def test_the_old_nested_module_still_imports_but_nf_nested_is_the_function():
    from nestedfn.nested import NestedState, multiscale_momentum, nested_adam, tier_stats

    assert nested_adam is nestedfn.nested_adam and tier_stats is nestedfn.tier_stats
    assert NestedState is nestedfn.NestedState
    assert multiscale_momentum is nestedfn.multiscale_momentum
    assert callable(nestedfn.nested) and nestedfn.nested.__module__ == "nestedfn.tiered.cms"


def test_each_package_says_what_lives_there():
    for init in sorted(ROOT.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.splitlines()) >= 2, f"{init}: no docstring saying what lives here"
    for path in sorted(ROOT.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc, f"{path}: a module opens with what it holds and why"


def test_nothing_below_lm_imports_mlx_lm():
    """mlx-lm is the trainer's business: the library floors work without it."""
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        pkg = package_of(module_name(path))
        if pkg is None or FLOOR.get(pkg, 0) >= FLOOR["lm"]:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            problems += [f"{path}:{node.lineno}" for n in names if n.split(".")[0] == "mlx_lm"]
    assert not problems, problems
