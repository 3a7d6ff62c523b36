"""The package plan holds: nestedfn's imports point one way, down the layers.

    tree -> optim -> {tiered, fast, run} -> {lm, testing} -> cli

A module may import from its own package and from packages on lower floors, never from a
higher floor nor from another package on its own floor (``tiered``, ``fast`` and ``run`` stand
side by side).  Every import counts, including the ones inside functions.  Each package names
its public face in ``__all__``; the top level re-exports those faces, exceptions included.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import nestedfn
from nestedfn.optim import from_mlx

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


PACKAGES = ["tree", "optim", "tiered", "fast", "run", "bridge", "lm", "testing"]
# public exceptions a caller need not name: each is an exported one, or becomes one where raised
NOT_CAUGHT_BY_USERS = {
    "NormalizeError": "lm.config raises it as ConfigError",
    "RunDirBusy": "a RunError",
    "Interrupted": "a KeyboardInterrupt (Ctrl-C), exported beside train by nestedfn.lm.trainer",
    "YamlError": "a yaml.YAMLError, raised as ConfigError by lm.config.load_config",
}


def _is_submodule(package, name: str) -> bool:
    """A submodule named in ``__all__`` (documented with the package; imported when asked)."""
    return importlib.util.find_spec(f"{package.__name__}.{name}") is not None


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_names_its_public_face(package):
    mod = importlib.import_module(f"nestedfn.{package}")
    names = mod.__all__
    assert len(names) == len(set(names)), f"nestedfn.{package}: a name twice in __all__"
    missing = [n for n in names if not hasattr(mod, n) and not _is_submodule(mod, n)]
    assert not missing, f"nestedfn.{package}.__all__ names what it does not hold: {missing}"


def test_the_top_level_is_the_packages_faces_and_nothing_else():
    assert len(nestedfn.__all__) == len(set(nestedfn.__all__))
    owner = {}
    for package in PACKAGES:
        mod = importlib.import_module(f"nestedfn.{package}")
        owner.update({n: mod for n in mod.__all__ if not _is_submodule(mod, n)})
    # ``from_mlx`` the function shares its module's name: ``nestedfn.optim`` names the module
    owner.update({n: from_mlx for n in from_mlx.__all__ if n != "MLX_OPTIMIZERS"})
    for name in nestedfn.__all__:
        assert name in owner, f"nf.{name} is in no package's __all__"
        assert getattr(nestedfn, name) is getattr(owner[name], name), name
    # submodules appear as attributes once imported (``nestedfn.cli`` by the CLI's tests)
    public = {n for n, v in vars(nestedfn).items() if n[0] != "_" and not isinstance(v, ModuleType)}
    extra = public - set(nestedfn.__all__)
    assert not extra, f"at nf's top level but not in __all__: {sorted(extra)}"


def _exception_classes() -> dict[str, type]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        mod = importlib.import_module(module_name(path))
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, BaseException):
                if obj.__module__.startswith("nestedfn") and not obj.__name__.startswith("_"):
                    found[obj.__name__] = obj
    return found


def test_every_exception_a_caller_catches_is_at_the_top_level():
    found = _exception_classes()
    assert {"PathError", "NotPackableError", "ConfigError"} <= set(found)  # the walk sees them
    for name, cls in sorted(found.items()):
        if name in NOT_CAUGHT_BY_USERS:
            continue
        assert getattr(nestedfn, name, None) is cls, f"{cls.__module__}.{name} is not nf.{name}"
        assert name in nestedfn.__all__
    stale = set(NOT_CAUGHT_BY_USERS) - set(found)
    assert not stale, f"NOT_CAUGHT_BY_USERS names exceptions that no longer exist: {stale}"


@pytest.mark.parametrize("old", ["transforms", "tiers", "compile", "checkpoint", "nested"])
def test_the_flat_layout_names_are_gone(old):
    """The top-level modules of the unreleased flat layout are not aliased (CHANGELOG)."""
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"nestedfn.{old}")
    assert not isinstance(getattr(nestedfn, old, None), ModuleType)


def test_each_package_says_what_lives_there():
    for init in sorted(ROOT.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.splitlines()) >= 2, f"{init}: no docstring saying what lives here"
    for path in sorted(ROOT.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert doc, f"{path}: a module opens with what it holds and why"


def test_import_nestedfn_imports_neither_mlx_lm_nor_hypothesis():
    """The library's face stays light: mlx-lm is the trainer's, Hypothesis the tests'."""
    code = "import sys, nestedfn; print(sorted({'mlx_lm', 'hypothesis'} & set(sys.modules)))"
    run = dict(capture_output=True, text=True, check=True, cwd=ROOT.parent)  # this checkout
    out = subprocess.run([sys.executable, "-c", code], **run)
    assert out.stdout.strip() == "[]", out.stdout


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
