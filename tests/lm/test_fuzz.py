"""The fast profile of the boundary fuzzer (``benchmarks/faults.py --only fuzz`` is the long
one): random command lines, configs, data files and run-directory states through the CLI,
in-process, held to one oracle -- exit 0 with a correct run, or 2/74/130/143 with one error
line; no traceback; nothing outside the run directory changed; the user's files kept; no
silent acceptance (exit 0 with a symlink on the run's paths or a value that must be
refused)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from nestedfn.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _faults():
    spec = importlib.util.spec_from_file_location("faults", ROOT / "benchmarks" / "faults.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["faults"] = mod
    spec.loader.exec_module(mod)
    return mod


faults = _faults()


@pytest.fixture(scope="module")
def done(assets, tmp_path_factory):
    model, data = assets
    out = tmp_path_factory.mktemp("fuzz") / "done"
    args = ["train", "--model", str(model), "--data", str(data), "--out", str(out)]
    args += ["--batch-size", "2", "--max-seq-len", "24", "--lora-rank", "2", "--lora-layers", "4"]
    # best/ and two checkpoints: every path a resume reads and --force empties is there
    assert main([*args, "--steps", "2", "--eval-every", "1", "--save-every", "1"]) == 0
    return out


@settings(
    max_examples=8,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=faults.fuzz_cases())
def test_the_boundary_holds_the_oracle(assets, done, case):
    model, data = assets
    result = faults.fuzz_case(model, data, done, case)
    assert result["ok"] and not result["silent"], (case, result)


@pytest.mark.parametrize(
    "case",
    [
        {"mode": "force", "run_state": [("best", "link-dir")]},
        {"mode": "force", "run_state": [("checkpoints", "link-dir")]},
        {"mode": "new", "run_state": [("metrics.jsonl", "dangling")]},
        {"mode": "new", "run_state": [(".nestedfn.lock", "link-file")]},
        {"mode": "resume", "run_state": [("config.yaml", "link-file")]},
        {"mode": "new", "flags": [("--optimizer-args", "{b1: 1.5}")]},
        {"mode": "new", "config": "1: 2\n"},
        {"mode": "new", "config": faults._BOMB},
        {"mode": "new", "data": "one-record"},
    ],
)
def test_the_cases_of_issue_23_hold_the_oracle(assets, done, case):
    """Each was a data loss, a silent acceptance or a traceback before (``benchmarks/
    faults.py``'s oracle caught every one on the code of the time)."""
    model, data = assets
    full = {"flags": [], "run_state": [], "data": "ok", "config": None, **case}
    result = faults.fuzz_case(model, data, done, full)
    assert result["ok"] and not result["silent"] and result["code"] == 2, result


# ---- permission states: the CLI run without root's power over file modes -----------------


def _unprivileged_or_skip() -> None:
    prefix, why = faults.unprivileged()
    if prefix is None:
        pytest.skip(f"cannot run the CLI bound by file permissions: {why}")


@settings(
    max_examples=3,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=faults.fuzz_perm_cases())
def test_permission_states_hold_the_oracle(assets, done, case):
    """Read-only and unreadable run directories, checkpoints, metrics, config and manifest, a
    parent where a new ``--out`` cannot be made: exit 0 with a correct run, or one error line
    naming the path, nothing outside changed, no completed step lost (a subprocess each)."""
    _unprivileged_or_skip()
    model, data = assets
    result = faults.fuzz_perm_case(model, data, done, case, timeout=300)
    assert result["ok"] and not result["silent"], (case, result)


@pytest.mark.parametrize(
    "case,names",
    [
        # was exit 0: the manifest taken for missing, rewritten, its input fingerprints unchecked
        ({"mode": "resume", "perms": [(".nestedfn-run.json", "unreadable")]}, ".nestedfn-run.json"),
        # was refused only at the first save after the steps, naming a temporary inside it
        ({"mode": "resume", "perms": [("checkpoints", "read-only")], "flags": [("--steps", "3")]},
         "checkpoints"),
    ],
)  # fmt: skip
def test_permission_cases_refused_before_any_step(assets, done, case, names):
    _unprivileged_or_skip()
    model, data = assets
    result = faults.fuzz_perm_case(model, data, done, case, timeout=300)
    assert result["ok"] and result["code"] == 74, (case, result)
    assert result["error"].endswith(f"/run/{names}: Permission denied"), result
