"""Every code block of README.md runs as written: the Python blocks in order, in one
namespace (later blocks use the model and optimizer of earlier ones), and every ``nestedfn``
command line of the bash blocks parses with the real argument parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_the_python_blocks_run_in_order(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks write files (a demo model, saved states)
    namespace: dict = {}
    code = blocks("python")
    assert len(code) >= 4
    for block in code:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert "loss" in capsys.readouterr().out  # the distributed block's rank-0 print


def _commands() -> list[list[str]]:
    out = []
    for block in blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"\s#.*$", "", line)
            line = re.sub(r"\[[^\]]*\]", "", line)  # optional parts
            for part in line.split("&&"):
                words = shlex.split(part)
                for i, w in enumerate(words):
                    if w == "nestedfn" or w in ("nestedfn.cli", "nestedfn.cli:main"):
                        out.append(words[i + 1 :])
                        break
    return out


@pytest.mark.parametrize("argv", _commands(), ids=" ".join)
def test_the_nestedfn_commands_parse(argv):
    from nestedfn.cli import _parse, build_parser

    args = _parse(build_parser(), argv)
    assert args.command == argv[0]
