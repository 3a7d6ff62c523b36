"""``--resume`` checks its inputs: data and model files changed since the run started are
refused naming the file unless accepted (and the acceptance is recorded); a ``steps`` below
the checkpoint's step is refused, leaving ``config.yaml`` as it was."""

from __future__ import annotations

import json
import shutil

import pytest

from nestedfn.cli import main
from nestedfn.lm.manifest import read_manifest


@pytest.fixture
def run(assets, tmp_path):
    model, data = assets
    m, d = tmp_path / "model", tmp_path / "data"
    shutil.copytree(model, m)
    shutil.copytree(data, d)
    out = tmp_path / "run"
    args = ["train", "--model", str(m), "--data", str(d), "--out", str(out)]
    args += ["--batch-size", "2", "--max-seq-len", "24", "--lora-rank", "2", "--lora-layers", "4"]
    args += ["--steps", "4", "--save-every", "2", "--eval-every", "0"]
    assert main(args) == 0
    return out, m, d


def _resume(out, capsys, *extra):
    code = main(["train", "--resume", str(out), *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _same_size_other_bytes(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 1
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("which", ["train.jsonl", "valid.jsonl", "model.safetensors", "shrunk"])
def test_a_changed_input_is_refused_naming_it_then_accepted_and_recorded(run, capsys, which):
    out, model, data = run
    if which == "model.safetensors":
        target = model / which
        _same_size_other_bytes(target)
    elif which == "shrunk":
        target = data / "train.jsonl"
        target.write_text("".join(target.read_text().splitlines(True)[:-3]))
    else:
        target = data / which
        lines = target.read_text().splitlines(True)
        target.write_text("".join(lines[1:] + lines[:1]))  # same bytes, other order
    config_before = (out / "config.yaml").read_bytes()
    code, err = _resume(out, capsys, "--steps", "6")
    assert code == 2 and str(target) in err and "--accept-changed-inputs" in err, err
    assert len(err.strip().splitlines()) == 1
    assert (out / "config.yaml").read_bytes() == config_before
    code, err = _resume(out, capsys, "--steps", "6", "--accept-changed-inputs")
    assert code == 0, err
    record = read_manifest(out)
    assert [c["file"] for c in record["accepted_changes"]] == [str(target)]
    assert record["accepted_changes"][0]["step"] == 4
    # the new fingerprint is the run's now: a further resume needs no acceptance
    code, err = _resume(out, capsys, "--steps", "8")
    assert code == 0, err


def test_unchanged_inputs_resume_without_a_word(run, capsys):
    out, _, _ = run
    code, err = _resume(out, capsys, "--steps", "6")
    assert code == 0 and "changed" not in err, err
    assert read_manifest(out)["accepted_changes"] == []


@pytest.mark.parametrize("steps", ["1", "3"])
def test_steps_below_the_checkpoint_is_refused(run, capsys, steps):
    out, _, _ = run
    before = (out / "config.yaml").read_bytes()
    code, err = _resume(out, capsys, "--iters", steps)
    assert code == 2 and f"{steps} is below the step 4" in err, err
    assert (out / "config.yaml").read_bytes() == before


def test_the_fingerprints_are_those_of_the_files(run):
    import hashlib

    out, model, data = run
    inputs = read_manifest(out)["inputs"]
    for name in ("train.jsonl", "valid.jsonl"):
        p = data / name
        want = {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        assert inputs[str(p)] == want
    assert str(model / "model.safetensors") in inputs
    json.dumps(inputs)
