"""Bounded YAML: alias bombs, deep nesting and non-string keys are one-line errors, fast."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nestedfn.cli import main
from nestedfn.lm.config import parse_yaml
from nestedfn.lm.yamlload import MAX_NODES, YamlError


def bomb(levels: int, width: int = 9) -> str:
    text = "a: &l0 [" + ", ".join(['"x"'] * width) + "]\n"
    for i in range(1, levels + 1):
        text += f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]\n"
    return text


@pytest.mark.parametrize("levels", [6, 9, 12])
def test_an_alias_bomb_is_refused(levels):
    assert width_expansion(levels) > MAX_NODES
    with pytest.raises(YamlError, match="aliases expand the document past"):
        parse_yaml("optimizer_args:\n  " + bomb(levels).replace("\n", "\n  "))


def width_expansion(levels: int, width: int = 9) -> int:
    return sum(width**k for k in range(levels + 2))


def test_a_few_aliases_are_fine():
    assert parse_yaml(bomb(2, 3))["l2"] == [[["x"] * 3] * 3] * 3


@pytest.mark.parametrize(
    "text,path",
    [
        ("1: 2", "key 1 "),
        ("null: 2", "key null"),
        ("lora_parameters: {rank: 8, 3: 4}", "in lora_parameters"),
    ],
)
def test_non_string_keys_are_one_line_naming_the_key(text, path):
    with pytest.raises(YamlError) as e:
        parse_yaml(text)
    assert path in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["[" * 3000 + "]" * 3000, "- " * 3000 + "1", "a: &x [*x]"])
def test_deep_or_self_referring_documents_are_refused(text):
    with pytest.raises(YamlError):
        parse_yaml(text)


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=60))
def test_any_text_is_a_value_or_one_line(text):
    try:
        parse_yaml(text)
    except YamlError as e:
        assert "\n" not in str(e)
    except yaml.YAMLError as e:  # pragma: no cover - every YAML error is a YamlError
        raise AssertionError(f"not one line: {e!r}") from None


@pytest.mark.parametrize("flag", ["--tiers", "--lr-schedule", "--optimizer-args"])
@pytest.mark.parametrize("value", ["{b1: 0.9", "{1: 2}", bomb(9)])
def test_cli_yaml_flags_are_one_line(flag, value, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["train", flag, value, "--out", "x"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


def test_a_config_with_an_int_key_is_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("steps: 2\n1: 2\n")
    code = main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "key 1" in err and len(err.strip().splitlines()) == 1, err
