"""Output is not the run: a closed stdout or a narrow encoding never stops training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(assets, out: Path, env: dict, steps: int = 12) -> subprocess.CompletedProcess:
    model, data = assets
    cmd = [sys.executable, "-m", "nestedfn", "train", "--model", str(model), "--data", str(data)]
    cmd += ["--out", str(out), "--batch-size", "2", "--max-seq-len", "24", "--lora-rank", "2"]
    cmd += ["--lora-layers", "4", "--steps", str(steps), "--eval-every", "4"]
    cmd += ["--steps-per-report", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    # stdout read for a few bytes, then closed: every later write gets EPIPE
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.read(200)
    proc.stdout.close()
    err = proc.stderr.read().decode("utf-8", "replace")
    proc.wait(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, "", err)


def test_a_closed_stdout_does_not_stop_training(assets, tmp_path):
    got = _run(assets, tmp_path / "run", {})
    assert got.returncode == 0 and "Traceback" not in got.stderr, got.stderr
    steps = [
        json.loads(ln)["step"]
        for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"train"' in ln
    ]
    assert steps == list(range(1, 13))
    assert (tmp_path / "run" / "checkpoints" / "step_00000012").is_dir()


def test_an_ascii_stream_and_a_non_ascii_out(assets, tmp_path):
    got = _run(assets, tmp_path / "run-é", {"PYTHONIOENCODING": "ascii"}, steps=2)
    assert got.returncode == 0 and "Traceback" not in got.stderr, got.stderr
    assert (tmp_path / "run-é" / "adapters.safetensors").is_file()
