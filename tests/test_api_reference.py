"""The API reference builds from the docstrings, with the README's command, without a warning.

pdoc (the dev extra) is the builder.  The one warning it is allowed is its own open bug
(mitmproxy/pdoc#765): under ``from __future__ import annotations`` it cannot resolve the field
annotations of a ``NamedTuple``'s generated ``__init__`` (whose module is not the class's),
whatever the code says; the test checks that every such warning names a NamedTuple's
``__init__``, so a real unresolved annotation still fails it."""

from __future__ import annotations

import importlib
import re
import shlex
import warnings
from pathlib import Path

import pytest

pdoc = pytest.importorskip("pdoc", reason="pdoc is in the dev extra: pip install -e '.[dev]'")

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
PDOC_765 = re.compile(r"Error parsing type annotation .* for ([\w.]+)\.__init__\. ")


def readme_command() -> list[str]:
    """The module arguments of the README's ``python -m pdoc`` line."""
    (line,) = [li for li in README.splitlines() if li.startswith("python -m pdoc ")]
    words = shlex.split(line.split("#")[0])[3:]
    out = words.index("-o")
    return words[:out] + words[out + 2 :]


def _is_namedtuple(dotted: str) -> bool:
    module, _, name = dotted.rpartition(".")
    while module:
        try:
            obj = importlib.import_module(module)
            break
        except ModuleNotFoundError:
            module, _, outer = module.rpartition(".")
            name = f"{outer}.{name}"
    for part in name.split("."):
        obj = getattr(obj, part)
    return isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")


def test_the_api_reference_builds_without_warnings(tmp_path):
    modules = readme_command()
    assert "nestedfn" in modules
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*modules, output_directory=tmp_path)
    problems = []
    for w in caught:
        hit = PDOC_765.match(str(w.message))
        if not (hit and _is_namedtuple(hit.group(1))):
            problems.append(str(w.message))
    assert not problems, "\n".join(problems)
    pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.html")}
    for module in modules:
        assert module.replace(".", "/") + ".html" in pages, module
    index = (tmp_path / "nestedfn.html").read_text()
    assert "NotPackableError" in index and "compile_step" in index
