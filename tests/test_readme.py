"""Every code block of README.md and of the pages in docs/ runs as written: the README's Python
blocks in order, in one namespace (later blocks use the model and optimizer of earlier ones),
then each page's blocks in order, in a copy of that namespace (a page builds on the README's
tour); every ``nestedfn`` command line of their bash blocks parses with the real argument
parser; every relative link of the README names a file that exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}


def blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"^ *```{lang}\n(.*?)^ *```", text, re.S | re.M)


def _dedent(block: str) -> str:
    """A block inside a list item is indented like the item's text."""
    lines = block.splitlines()
    pad = min((len(li) - len(li.lstrip()) for li in lines if li.strip()), default=0)
    return "\n".join(li[pad:] for li in lines) + "\n"


def test_the_python_blocks_run_in_order(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks write files (a demo model, saved states)
    namespace: dict = {}
    code = blocks("python")
    assert len(code) >= 4
    for block in code:
        exec(compile(_dedent(block), "README.md", "exec"), namespace)  # noqa: S102
    ran = []
    for name, text in PAGES.items():
        page_ns = dict(namespace)
        for block in blocks("python", text):
            exec(compile(_dedent(block), f"docs/{name}", "exec"), page_ns)  # noqa: S102
            ran.append(name)
    assert {"optimizers.md", "distributed.md", "step_latency.md"} <= set(ran)
    assert "loss" in capsys.readouterr().out  # the distributed block's rank-0 print


def _commands() -> list[list[str]]:
    out = []
    for text in [README, *PAGES.values()]:
        for block in blocks("bash", text):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s#.*$", "", line)
                line = re.sub(r"\[[^\]]*\]", "", line)  # optional parts
                for part in line.split("&&"):
                    words = shlex.split(part)
                    for i, w in enumerate(words):
                        cli = w == "nestedfn" and (i == 0 or words[i - 1] == "-m")
                        if cli or w in ("nestedfn.cli", "nestedfn.cli:main"):
                            out.append(words[i + 1 :])
                            break
    return out


@pytest.mark.parametrize("argv", _commands(), ids=" ".join)
def test_the_nestedfn_commands_parse(argv):
    from nestedfn.cli import _lora_parser, _parse, build_parser

    if argv[0] == "lora":  # python -m mlx_lm lora's own parser reads the rest (as cli.main does)
        args = _lora_parser().parse_args(argv[1:])
        assert args.train == ("--train" in argv)
        return
    args = _parse(build_parser(), argv)
    assert args.command == argv[0]


def test_the_commands_of_the_readme_and_the_pages_are_collected():
    assert {a[0] for a in _commands()} >= {"demo", "train", "inspect", "plot"}
    launched = "train --model PATH --data DIR --out RUN_DIR --batch-size 8 --steps 200"
    assert launched.split() in _commands()  # docs/distributed.md: mlx.launch ... nestedfn.cli


def test_the_readme_links_name_files_that_exist():
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README)
    assert any(link.startswith("docs/") for link in links)
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_the_readme_is_a_guide_not_a_notebook():
    """The README stays short; methods, full tables and caveats live in docs/."""
    assert len(README.splitlines()) <= 350
