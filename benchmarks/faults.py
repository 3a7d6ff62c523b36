"""The fault matrix: does ``nestedfn train`` survive what the world does to a run?

Run:

    python benchmarks/faults.py [--kills 20] [--jobs 2] [--seed 0] [--only kill,corrupt,...]

Every trial runs the real command (``python -m nestedfn train``) on the demo's tiny Llama
(12 steps, a checkpoint every 2, an eval every 4, tiers 1/2/4 so that slow tiers are cut off
mid-chunk) and holds the outcome against a run that went straight through:

* ``kill``: SIGKILL, SIGINT and SIGTERM at a random moment of the training (a uniform delay
  after the first metrics record: steps, evals, checkpoint and adapter writes alike; a kill
  that finds a temporary of an atomic write in the directory counts as mid-write), then
  ``--resume`` until done (a run killed before its first checkpoint is started again with
  ``--force``).  Chained: SIGKILL again during the resume, twice.  Pass: the final adapters,
  best adapters and metrics records (timings aside) are bit-identical to the straight run,
  SIGINT/SIGTERM exit 130/143 naming the checkpoint that the resume then uses, no temporary
  is left.
* ``corrupt``: each file kind of a stopped run directory (the latest checkpoint's
  ``arrays.safetensors`` and ``meta.json``, ``config.yaml``, ``metrics.jsonl``, the adapters
  and their config, ``best/``'s, the manifest) truncated to half, zero-filled, deleted or with
  one bit flipped, then ``--resume``.  Pass: refused (status 2, a line naming the file or the
  option) or continued with a warning naming the file, ending bit-identical to the straight
  run.  Fail: anything else (a *silent acceptance*).
* ``concurrent``: a second new run on one ``--out``, and a second ``--resume``, started while
  the first holds the run's lock (the first is paused with SIGSTOP meanwhile).  Pass: the
  first runs (and ends bit-identical), the second exits 2 naming the holder.
* ``os``: ``--out`` on a full file system (a small tmpfs), a read-only one, in an immutable
  directory (``chattr +i``) and under a regular file.  Pass: status 74, one line naming the
  path and the cause, no traceback, no temporary, every checkpoint written before intact
  (and, for the full disk, the run resumes bit-identical once there is room).  Needs root for
  ``mount``/``chattr``; what cannot run is reported as skipped.
* ``force``: ``--force`` on directories holding the user's files.  Pass: nothing of theirs
  deleted (refused, listing them, or left alone).
* ``fuzz`` (``--fuzz N`` examples, Hypothesis): random command lines (good and bad values of
  the size, rate, optimizer and YAML flags), config files (non-string keys, bad YAML, alias
  bombs), data files (garbage, non-UTF-8, one record, empty) and run-directory states
  (symlinks to the user's files and directories, dangling ones, damaged files) on a new run,
  ``--force`` or ``--resume``, the CLI run in-process.  One oracle: exit 0 with a correct run
  (every step's record, finite losses, the adapters), or exit 2/74/130/143 with exactly one
  error line; no traceback; nothing outside the run directory changed; nothing of the
  user's in it removed; no completed step lost (recorded past the last checkpoint by a run
  that stopped).  Counted: cases, tracebacks, silent acceptances (exit 0 without a correct
  run, or with a symlink on the run's paths, or where a permission state must stop it),
  outside changes, user files removed, steps lost.  Permission states (``--fuzz-perms N``):
  the run directory, its parent, ``checkpoints/`` and the newest checkpoint, ``best/``,
  ``metrics.jsonl``, ``config.yaml``, the adapters and the manifest read-only or
  unreadable, and a new ``--out`` in a parent that cannot take it; the CLI runs as a
  subprocess that file modes bind (``unprivileged()``: root without its capabilities), and
  an error line must name a path of the case.

Prints one line per category and the totals, e.g. ``SIGKILL 20/20 resumed bit-identical``,
``tracebacks 0``, ``user files deleted 0``.  Every process's stderr is scanned for
``Traceback``.  ``tests/lm/test_faults.py`` runs a few of these trials in the suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STEPS, SAVE_EVERY, EVAL_EVERY, STOP_AT = 12, 2, 4, 8
TIMING = ("time", "elapsed", "peak_memory_gb")


@dataclass
class Ctx:
    root: Path
    model: Path
    data: Path
    ref: Path  # the straight run
    base: Path  # a run stopped at STOP_AT (for corruption and concurrent resumes)
    train_time: float  # seconds from the first metrics record to the end of the straight run
    tracebacks: list[str] = field(default_factory=list)


def run_args(ctx: Ctx, out: Path, *extra: str) -> list[str]:
    return [
        *("--model", str(ctx.model), "--data", str(ctx.data), "--out", str(out)),
        *("--batch-size", "2", "--max-seq-len", "24", "--lora-rank", "2", "--lora-layers", "4"),
        *("--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--eval-every", str(EVAL_EVERY)),
        *("--keep-last", "2", "--eval-batches", "1", *extra),
    ]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    return env


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nestedfn", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=str(ROOT),
    )


def finish(ctx: Ctx, proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate()
    if "Traceback" in err:
        ctx.tracebacks.append(err[-2000:])
    return proc.returncode, err


def cli(ctx: Ctx, args: list[str]) -> tuple[int, str]:
    return finish(ctx, start(args))


def resume(ctx: Ctx, out: Path) -> tuple[int, str]:
    return cli(ctx, ["--resume", str(out)])


def records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if k not in TIMING})
    return out


def same_as_ref(ctx: Ctx, run: Path, best: bool = True, metrics: bool = True) -> bool:
    names = ["adapters.safetensors"] + (["best/adapters.safetensors"] if best else [])
    for name in names:
        a, b = run / name, ctx.ref / name
        if not (a.is_file() and a.read_bytes() == b.read_bytes()):
            return False
    return not metrics or records(run) == records(ctx.ref)


def temporaries(run: Path) -> list[Path]:
    """Temporaries of atomic writes (``.NAME.PID-RANDOM``) and of checkpoints (``.tmp-``)."""
    from nestedfn.lm.manifest import _ATOMIC_TMP

    found = []
    for d in (run, run / "best", run / "checkpoints"):
        if d.is_dir():
            found += [
                p for p in d.iterdir() if p.name.startswith(".tmp-") or _ATOMIC_TMP.match(p.name)
            ]
    return found


def setup(root: Path) -> Ctx:
    from nestedfn.lm.demo import build_demo_model, write_demo_dataset

    model = build_demo_model(root / "model", seed=0)
    data = write_demo_dataset(root / "data", seed=0, n_train=64, n_valid=8)
    ctx = Ctx(root, model, data, root / "ref", root / "base", 0.0)
    proc = start(run_args(ctx, ctx.ref))
    first = _wait_for(ctx.ref / "metrics.jsonl", proc)
    rc, err = finish(ctx, proc)
    assert rc == 0, err
    ctx.train_time = time.monotonic() - first
    rc, err = cli(ctx, run_args(ctx, ctx.base, "--stop-at", str(STOP_AT)))
    assert rc == 0, err
    return ctx


def _wait_for(path: Path, proc: subprocess.Popen) -> float:
    while not path.exists() and proc.poll() is None:
        time.sleep(0.02)
    return time.monotonic()


# ---- kills ------------------------------------------------------------------------------


def _wait_for_a_write(run: Path, proc: subprocess.Popen, limit: float) -> None:
    """Poll (as fast as Python can) until a temporary of a write appears, or ``limit`` s."""
    end = time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < end and not temporaries(run):
        pass


def kill_trial(ctx: Ctx, sig: int, seed: int, chain: int = 1, mid_write: bool = False) -> dict:
    """Kill a run ``chain`` times (the first one a new run, then resumes) at random moments
    (``mid_write``: the moment a temporary of a checkpoint, adapter or config write shows),
    then resume until done; compare with the straight run."""
    rng = random.Random(seed)
    run = ctx.root / f"kill-{signal.Signals(sig).name}-{seed}-{chain}-{int(mid_write)}"
    shutil.rmtree(run, ignore_errors=True)
    result = {"ok": False, "mid_write": False, "why": ""}
    args = run_args(ctx, run)
    for _ in range(chain):
        proc = start(args)
        _wait_for(run / "metrics.jsonl", proc)
        if mid_write:
            time.sleep(rng.uniform(0, ctx.train_time / 2))
            _wait_for_a_write(run, proc, ctx.train_time)
        else:
            time.sleep(rng.uniform(0, ctx.train_time))
        if proc.poll() is None:
            if temporaries(run):
                result["mid_write"] = True
            proc.send_signal(sig)
            if sig == signal.SIGKILL and temporaries(run):
                result["mid_write"] = True
        rc, err = finish(ctx, proc)
        # 130/143: stopped by the trainer; -2/-15: the signal came after the run had ended
        allowed = (0, 130, -2) if sig == signal.SIGINT else (0, 143, -15)
        if sig != signal.SIGKILL and rc not in allowed:
            result["why"] = f"exit {rc} after {signal.Signals(sig).name}: {err[-300:]}"
            return result
        if rc in (130, 143) and "checkpoint " in err:
            named = err.split("checkpoint ")[-1].split(";")[0].strip()
            from nestedfn.run.checkpoint import latest_checkpoint

            if Path(named) != latest_checkpoint(run / "checkpoints"):
                result["why"] = f"named {named}, resume would use another"
                return result
        args = ["--resume", str(run)]
    for _ in range(3):
        rc, err = resume(ctx, run)
        if rc == 0:
            break
        if "no checkpoint" in err or "holds no run" in err or "nothing to resume" in err:
            rc, err = cli(ctx, run_args(ctx, run, "--force"))  # killed before checkpoint 1
            if rc == 0:
                break
        result["why"] = f"resume exit {rc}: {err[-300:]}"
        return result
    left = temporaries(run)
    if left:
        result["why"] = f"temporaries left: {left}"
    elif not same_as_ref(ctx, run):
        result["why"] = "not bit-identical"
    else:
        result["ok"] = True
    shutil.rmtree(run, ignore_errors=True)
    return result


# ---- corruption -------------------------------------------------------------------------

FILE_KINDS = {
    "checkpoint arrays": f"checkpoints/step_{STOP_AT:08d}/arrays.safetensors",
    "checkpoint meta": f"checkpoints/step_{STOP_AT:08d}/meta.json",
    "config.yaml": "config.yaml",
    "metrics.jsonl": "metrics.jsonl",
    "adapters": "adapters.safetensors",
    "adapter config": "adapter_config.json",
    "best adapters": "best/adapters.safetensors",
    "best adapter config": "best/adapter_config.json",
    "manifest": ".nestedfn-run.json",
}
MODES = ("truncate", "zero-fill", "delete", "flip a bit")


def damage(path: Path, mode: str, rng: random.Random) -> None:
    data = path.read_bytes()
    if mode == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif mode == "zero-fill":
        path.write_bytes(bytes(len(data)))
    elif mode == "delete":
        path.unlink()
    else:
        i = rng.randrange(len(data))
        b = bytearray(data)
        b[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(b))


def corruption_trial(ctx: Ctx, kind: str, mode: str, seed: int) -> dict:
    rng = random.Random(seed)
    run = ctx.root / f"corrupt-{kind.replace(' ', '_')}-{mode.replace(' ', '_')}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(ctx.base, run)
    rel = FILE_KINDS[kind]
    damage(run / rel, mode, rng)
    rc, err = resume(ctx, run)
    said = "\n".join(ln for ln in err.splitlines() if ln.startswith("nestedfn"))  # no bar
    named = Path(rel).name in said
    if rc == 2 and named and said.count(" error: ") == 1:
        outcome = "refused"
    elif rc == 0 and named and "warning" in said:
        # continued, said so: the trajectory must still be the straight run's (best/ may keep
        # its damage until a better eval rewrites it, and a deleted metrics file loses its
        # records, as the warnings say)
        same = same_as_ref(
            ctx, run, best=not kind.startswith("best"), metrics=not kind.startswith("metrics")
        )
        outcome = "warned" if same else "wrong"
    elif rc == 0 and not said and same_as_ref(ctx, run):
        outcome = "no effect"  # e.g. a flipped bit that YAML reads the same
    else:
        outcome = "silent" if rc == 0 else f"exit {rc}"
    shutil.rmtree(run, ignore_errors=True)
    return {"outcome": outcome, "err": said.splitlines()[-1:]}


# ---- concurrency ------------------------------------------------------------------------


def concurrent_trial(ctx: Ctx, kind: str) -> dict:
    run = ctx.root / f"concurrent-{kind}"
    shutil.rmtree(run, ignore_errors=True)
    if kind == "resume":
        shutil.copytree(ctx.base, run)
        args = ["--resume", str(run)]
    else:
        args = run_args(ctx, run)
    # The second starts while the first holds the lock, for sure: the first is stopped
    # (SIGSTOP: it keeps its lock) once its pid is in the lock file, until the second has
    # exited.  Two started at once overlapped only by timing: on a loaded machine the second
    # could import for longer than the first trained, find a finished run and say --resume.
    a = start(args)
    lock = run / ".nestedfn.lock"
    while a.poll() is None and f"pid {a.pid} " not in _read_quietly(lock):
        time.sleep(0.02)
    a.send_signal(signal.SIGSTOP)
    try:
        rb, eb = finish(ctx, start(args))
    finally:
        a.send_signal(signal.SIGCONT)
    ra, ea = finish(ctx, a)
    codes = [ra, rb]
    ok = codes == [0, 2] and "in use by" in eb and same_as_ref(ctx, run)
    shutil.rmtree(run, ignore_errors=True)
    return {"ok": ok, "codes": codes, "loser": eb.strip()[-200:], "winner": ea.strip()[-200:]}


def _read_quietly(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""


# ---- OS errors --------------------------------------------------------------------------


def _intact_checkpoints(run: Path) -> bool:
    from nestedfn.run.checkpoint import CheckpointError, verify_checkpoint

    ck = run / "checkpoints"
    try:
        for p in ck.iterdir() if ck.is_dir() else []:
            verify_checkpoint(p)
    except CheckpointError:
        return False
    return True


def _one_line_74(rc: int, err: str, what: str) -> bool:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("nestedfn train: error:")]
    return rc == 74 and len(lines) == 1 and what in lines[0] and "Traceback" not in err


def _mount(target: Path, opts: str) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True
    )
    return r.returncode == 0


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], capture_output=True)


def os_trials(ctx: Ctx) -> dict[str, str]:
    out: dict[str, str] = {}
    # full disk: a tmpfs too small for the whole run (checkpoints are ~240 kB each)
    mnt = ctx.root / "full"
    if _mount(mnt, "size=600k"):
        try:
            run = mnt / "run"
            rc, err = cli(ctx, run_args(ctx, run))
            ok = _one_line_74(rc, err, "No space left on device") and not temporaries(run)
            ok = ok and _intact_checkpoints(run)
            if ok:  # room again: the run resumes where it stopped, bit-identical
                moved = ctx.root / "full-moved"
                shutil.rmtree(moved, ignore_errors=True)
                shutil.copytree(run, moved)
                rc2, err2 = resume(ctx, moved)
                ok = rc2 == 0 and same_as_ref(ctx, moved)
                shutil.rmtree(moved, ignore_errors=True)
            out["full disk (tmpfs)"] = "pass" if ok else f"FAIL {rc}: {err[-300:]}"
        finally:
            _umount(mnt)
    else:
        out["full disk (tmpfs)"] = "skipped (mount not permitted)"
    mnt = ctx.root / "ro"
    if _mount(mnt, "ro,size=1m"):
        try:
            rc, err = cli(ctx, run_args(ctx, mnt / "run"))
            ok = _one_line_74(rc, err, "Read-only file system")
            out["read-only file system"] = "pass" if ok else f"FAIL {rc}: {err[-300:]}"
        finally:
            _umount(mnt)
    else:
        out["read-only file system"] = "skipped (mount not permitted)"
    imm = ctx.root / "immutable"
    imm.mkdir(exist_ok=True)
    if subprocess.run(["chattr", "+i", str(imm)], capture_output=True).returncode == 0:
        try:
            rc, err = cli(ctx, run_args(ctx, imm / "run"))
            ok = _one_line_74(rc, err, "Operation not permitted")
            out["immutable directory"] = "pass" if ok else f"FAIL {rc}: {err[-300:]}"
        finally:
            subprocess.run(["chattr", "-i", str(imm)], capture_output=True)
    else:
        out["immutable directory"] = "skipped (chattr not permitted)"
    regular = ctx.root / "a-file"
    regular.write_text("not a directory\n")
    rc, err = cli(ctx, run_args(ctx, regular / "run"))
    out["under a regular file"] = (
        "pass" if _one_line_74(rc, err, "Not a directory") else f"FAIL {rc}: {err[-300:]}"
    )
    return out


# ---- --force and the user's files --------------------------------------------------------


def force_trials(ctx: Ctx) -> tuple[int, int, int]:
    """(trials passed, trials, user files deleted)."""
    cases = {
        "files in checkpoints/ and best/": ["checkpoints/important.txt", "best/mine.txt"],
        "a config.yaml of the user's, no run": ["config.yaml"],
        "a note next to a run": ["notes.txt"],
    }
    passed = deleted = 0
    for i, (case, files) in enumerate(cases.items()):
        run = ctx.root / f"force-{i}"
        shutil.rmtree(run, ignore_errors=True)
        if case.startswith("a config.yaml"):
            run.mkdir()
        else:
            shutil.copytree(ctx.ref, run)
        for f in files:
            (run / f).parent.mkdir(parents=True, exist_ok=True)
            (run / f).write_text(f"the user's {f}\n")
        rc, err = cli(ctx, run_args(ctx, run, "--force"))
        gone = [
            f for f in files if not (run / f).is_file() or "the user's" not in (run / f).read_text()
        ]
        deleted += len(gone)
        expect_refusal = case != "a note next to a run"
        ok = not gone and (
            rc == 2 and all(Path(f).name in err for f in files) if expect_refusal else rc == 0
        )
        passed += ok
        shutil.rmtree(run, ignore_errors=True)
    return passed, len(cases), deleted


# ---- fuzz: the boundary, with Hypothesis ------------------------------------------------

# per flag: (values a run takes, values it must refuse)
FUZZ_FLAGS = {
    "--batch-size": (["2", "1"], ["0", "-1", "100000000", "x"]),
    "--lora-rank": (["2", "1"], ["0", "10000000", "1.5"]),
    "--learning-rate": (["1e-3", "0"], ["nan", "inf", "-1", "abc"]),
    "--optimizer": (["adam", "sgd", "lion", "nested_adam"], ["nope"]),
    "--optimizer-args": (["{b1: 0.5}", "{}"], ["{b1: 1.5}", "{1: 2}", "{b1: 0.9", "{eps: 0}"]),
    "--tiers": (["depth"], ["{(: 0}", "[1, 2]"]),
    "--steps": (["2", "3"], ["0", "-3", "x"]),
    "--max-seq-len": (["24", "16"], ["0", "100000000"]),
    # any positive ints (tier 0 may be the slow one: [2, 1] is [1, 2] with deep_fast)
    "--frequencies": (["1 2", "1", "2 1"], ["0", "1 0"]),
}
RUN_PATHS = [
    "checkpoints",
    "best",
    "metrics.jsonl",
    "config.yaml",
    ".nestedfn.lock",
    ".nestedfn-run.json",
    "adapters.safetensors",
]
LINKS = ["link-file", "link-dir", "dangling"]
RUN_STATES = [*LINKS, "garbage", "empty-dir", "missing"]
DATA_STATES = ["ok", "garbage", "non-utf8", "one-record", "empty", "array-line"]
_BOMB = "a: &l0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 10)
)
CONFIGS = [None, "steps: 2\n", "1: 2\n", "lora_parameters: {rank: 2, 3: 4}\n", "{a: 1", _BOMB]


def fuzz_cases():  # noqa: ANN201 - a Hypothesis strategy
    """Cases of the fuzzer: ``{"mode", "flags", "run_state", "data", "config"}``."""
    from hypothesis import strategies as st

    def value(f: str) -> st.SearchStrategy:  # mostly values a run takes: deeper paths run
        good, bad = FUZZ_FLAGS[f]
        return st.sampled_from(good * 3 + bad)

    flag = st.sampled_from(sorted(FUZZ_FLAGS)).flatmap(lambda f: st.tuples(st.just(f), value(f)))
    return st.fixed_dictionaries(
        {
            "mode": st.sampled_from(["new", "force", "resume"]),
            "flags": st.lists(flag, max_size=2, unique_by=lambda t: t[0]),
            "run_state": st.lists(
                st.tuples(st.sampled_from(RUN_PATHS), st.sampled_from(RUN_STATES + LINKS * 2)),
                max_size=2,
                unique_by=lambda t: t[0],
            ),
            "data": st.sampled_from(["ok"] * 5 + DATA_STATES),
            "config": st.sampled_from([None] * 6 + CONFIGS),
        }
    )


def _snapshot(root: Path, skip: Path | None = None) -> dict:
    out = {}
    for d, dirs, files in os.walk(root, followlinks=False):
        if skip is not None and Path(d) == skip:
            dirs[:] = []
            continue
        for n in dirs + files:
            p = Path(d) / n
            if skip is not None and p == skip:
                continue
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                out[str(p)] = ("file", p.read_bytes())
            else:
                out[str(p)] = ("dir",)
    return out


def _prepare_fuzz(root: Path, model: Path, data: Path, done: Path, case: dict) -> tuple:
    """Lay out one case under ``root``: the data (maybe damaged), the run directory in its
    state (a finished run for --force/--resume), the user's files beside and inside it."""
    d = root / "data"
    shutil.copytree(data, d)
    train = d / "train.jsonl"
    lines = train.read_text().splitlines(True)
    damage = {
        "garbage": b"\x00\x01garbage\n",
        "non-utf8": b'{"text": "\xff\xfe"}\n',
        "one-record": lines[0].encode(),
        "empty": b"",
        "array-line": b"[1, 2]\n",
    }
    if case["data"] in damage:
        train.write_bytes(damage[case["data"]])
    outside = root / "outside"
    (outside / "adapters").mkdir(parents=True)
    (outside / "adapters" / "adapters.safetensors").write_bytes(b"the user's weights")
    (outside / "victim.txt").write_text("the user's text\n")
    run = root / "run"
    if case["mode"] == "new":
        run.mkdir()
    else:
        shutil.copytree(done, run, symlinks=True)
    (run / "notes.txt").write_text("the user's notes\n")
    links = []
    for name, state in case["run_state"]:
        p = run / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        if state == "link-file":
            p.symlink_to(outside / "victim.txt")
        elif state == "link-dir":
            p.symlink_to(outside / "adapters")
        elif state == "dangling":
            p.symlink_to(outside / "nothing-here")
        elif state == "garbage":
            p.write_bytes(b"\x00garbage\xff")
        elif state == "empty-dir":
            p.mkdir()
        if state in ("link-file", "link-dir", "dangling"):
            links.append(name)
    argv = ["train"]
    if case["mode"] == "resume":
        argv += ["--resume", str(run)]
    else:
        argv += ["--model", str(model), "--data", str(d), "--out", str(run)]
        argv += ["--batch-size", "2", "--max-seq-len", "24", "--lora-rank", "2"]
        argv += ["--lora-layers", "4", "--steps", "2", "--eval-every", "0"]
        if case["mode"] == "force":
            argv.append("--force")
    for f, v in case["flags"]:
        argv += [f, *v.split(" ")] if f == "--frequencies" else [f, v]
    if case["config"] is not None:
        (root / "c.yaml").write_text(case["config"])
        argv += ["--config", str(root / "c.yaml")]
    return run, argv, links


def fuzz_case(model: Path, data: Path, done: Path, case: dict) -> dict:
    """Run one case in-process and hold it to the oracle (the module doc); returns
    ``{"ok", "code", "traceback", "silent", "outside", "user_removed", "why"}``."""
    import io
    import traceback
    from contextlib import redirect_stderr, redirect_stdout

    from nestedfn.cli import main as cli_main

    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        run, argv, links = _prepare_fuzz(root, model, data, done, case)
        before, steps_before = _snapshot(root, skip=run), _last_step(run)
        err, out = io.StringIO(), io.StringIO()
        tb = ""
        with redirect_stderr(err), redirect_stdout(out):
            try:
                code = cli_main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 2
            except BaseException:  # an escape is a traceback at the CLI
                code, tb = None, traceback.format_exc()
        return _oracle(case, code, err.getvalue(), tb, root, run, before, links, None, steps_before)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _oracle(
    case: dict,
    code: int | None,
    text: str,
    tb: str,
    root: Path,
    run: Path,
    before: dict,
    links: list[str],
    notes: Path | None = None,
    steps_before: int = 0,
) -> dict:
    """The fuzzer's one oracle (the module doc) on a finished case: ``text`` is its stderr,
    ``tb`` a traceback that escaped (in-process), ``before`` the snapshot of ``root`` outside
    ``run`` taken before it ran, ``notes`` the user's file that must survive, ``steps_before``
    the last step ``run`` recorded before it ran."""
    errors = [ln for ln in text.splitlines() if ": error:" in ln]
    result = {"code": code, "traceback": bool(tb) or "Traceback" in text}
    after = _snapshot(root, skip=run)
    result["outside"] = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    notes = run / "notes.txt" if notes is None else notes
    result["steps_lost"] = _steps_lost(run, steps_before) if code != 0 else 0
    result["user_removed"] = not (notes.is_file() and "the user's" in notes.read_text())
    why = ""
    silent = False
    if code == 0:
        correct, why = _correct_run(run)
        refuse = _must_refuse(case)
        if links:
            silent, why = True, f"exit 0 with symlink(s) {links} on the run's paths"
        elif refuse:
            silent, why = True, f"exit 0 though {refuse} must be refused"
        elif not correct:
            silent = True
    elif code not in (2, 74, 130, 143):
        why = f"exit {code}"
    elif len(errors) != 1:
        why = f"{len(errors)} error lines: {text[-300:]!r}"
    elif case.get("perms") and str(root) not in errors[0]:
        why = f"the error line names no path of the case: {errors[0]!r}"
    elif result["steps_lost"]:
        why = f"{result['steps_lost']} completed step(s) past the last checkpoint lost"
    result["silent"] = silent
    result["error"] = errors[0] if errors else ""
    result["why"] = why or (tb[-300:] if tb else "")
    result["ok"] = not (why or result["traceback"] or result["outside"] or result["user_removed"])
    return result


# what a resume reads before its first step: unreadable, it cannot continue the same run
RESUME_READS = {
    "config.yaml",
    ".nestedfn-run.json",
    "metrics.jsonl",
    "checkpoints",
    "checkpoints/LATEST",
    "checkpoints/LATEST/arrays.safetensors",
    "checkpoints/LATEST/meta.json",
}


def _perm_must_refuse(case: dict) -> str:
    """What in a permission case a run must refuse, or ``""``: a run directory it cannot
    write, a new ``--out`` it cannot make, a resume's inputs it cannot read, ``checkpoints/``
    or ``best/`` that a resume writes and ``--force`` empties."""
    for target, state in case.get("perms", []):
        if target == "." or (target == ".." and case["mode"] == "new-out"):
            return f"{state} {target}"
        if case["mode"] == "resume" and state == "unreadable" and target in RESUME_READS:
            return f"{state} {target}"
        if case["mode"] in ("resume", "force") and target in ("checkpoints", "best"):
            return f"{state} {target}"
    return ""


def _last_step(run: Path) -> int:
    """The last training step ``run``'s metrics record (0: none, or no records to go by)."""
    try:
        records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r.get("step") or 0 for r in records if r.get("type") == "train"]
        return int(max(steps, default=0))
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def _steps_lost(run: Path, before: int) -> int:
    """Steps this invocation completed (recorded past ``before``, the last step recorded when
    it started) that no checkpoint holds: work a resume must do again."""
    from nestedfn.run.checkpoint import latest_checkpoint, step_of

    try:
        ckpt = latest_checkpoint(run / "checkpoints")
    except OSError:
        ckpt = None
    saved = step_of(ckpt) if ckpt is not None else 0
    return max(_last_step(run) - max(saved, before), 0)


def _must_refuse(case: dict) -> str:
    """What in ``case`` a run must refuse (a value of a flag's refused list, a bad config or
    damaged data for a new run, a permission state that stops it), or ``""``."""
    if _perm_must_refuse(case):
        return _perm_must_refuse(case)
    for f, v in case["flags"]:
        if v in FUZZ_FLAGS[f][1]:
            return f"{f} {v}"
    if case["config"] not in (None, "steps: 2\n"):
        return f"config {case['config'][:30]!r}"
    if case["mode"] != "resume" and case["data"] != "ok":
        return f"data {case['data']}"
    return ""


def _correct_run(run: Path) -> tuple[bool, str]:
    """Exit 0 means a correct run: every step's record with a finite loss, the adapters."""
    import yaml

    try:
        steps = yaml.safe_load((run / "config.yaml").read_text())["iters"]
        recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    except Exception as e:  # noqa: BLE001 - any failure to read is an incorrect run
        return False, f"exit 0 but the run is unreadable ({type(e).__name__}: {e})"
    train = [r for r in recs if r.get("type") == "train"]
    if [r["step"] for r in train] != list(range(1, steps + 1)):
        return False, f"exit 0 but train records {[r['step'] for r in train]} for {steps} steps"
    if any(r.get("loss") is None for r in train):
        return False, "exit 0 with a non-finite loss"
    if not (run / "adapters.safetensors").is_file():
        return False, "exit 0 without adapters"
    return True, ""


# ---- fuzz: permission states, the CLI run without the power to override them ----------

# Targets inside the run directory ("." the directory itself, ".." its parent, LATEST the
# newest checkpoint) and what is done to them: "read-only" (a directory 0o555, a file
# 0o444), "unreadable" (0o000).  Mode "new-out": --out names a directory not made yet.
PERM_TARGETS = [
    ".",
    "..",
    "checkpoints",
    "checkpoints/LATEST",
    "checkpoints/LATEST/arrays.safetensors",
    "checkpoints/LATEST/meta.json",
    "best",
    "metrics.jsonl",
    "config.yaml",
    "adapters.safetensors",
    ".nestedfn-run.json",
]
PERM_STATES = ["read-only", "unreadable"]


def fuzz_perm_cases():  # noqa: ANN201 - a Hypothesis strategy
    """Cases of the permission fuzzer: ``{"mode", "perms": [(target, state), ...]}`` (a new
    run's directory holds only the user's notes: its targets are "." and "..")."""
    from hypothesis import strategies as st

    def perms(targets: list[str]) -> st.SearchStrategy:
        pair = st.tuples(st.sampled_from(targets), st.sampled_from(PERM_STATES))
        return st.lists(pair, min_size=1, max_size=2, unique_by=lambda t: t[0])

    def case(mode: str) -> st.SearchStrategy:
        targets = {"new": [".", ".."], "new-out": [".."]}.get(mode, PERM_TARGETS)
        return st.fixed_dictionaries({"mode": st.just(mode), "perms": perms(targets)})

    return st.sampled_from(["new", "new-out", "force", "resume", "resume"]).flatmap(case)


_UNPRIVILEGED: list = []


def unprivileged() -> tuple[list[str] | None, str]:
    """``(prefix, "")``: a command prefix that runs a process which file permissions bind, or
    ``(None, why not)``.  An ordinary user needs none (``[]``).  Root keeps its user id and
    loses every capability (``setpriv --bounding-set=-all``; ``CAP_DAC_OVERRIDE`` is what
    lets root ignore a mode): the run's files are root's, so their owner bits apply as they
    would to a user's own read-only files.  (Switching to ``nobody`` would also need the
    interpreter, the model and the data readable by it: here the interpreter is under
    ``/root``, mode 0700.)  Probed once: the prefix must really be refused a 0o444 file."""
    if _UNPRIVILEGED:
        return _UNPRIVILEGED[0]
    found: tuple[list[str] | None, str]
    if os.geteuid() != 0:
        found = ([], "")
    elif shutil.which("setpriv") is None:
        found = (None, "running as root and setpriv (util-linux) is not installed")
    else:
        prefix = [shutil.which("setpriv") or "setpriv", "--bounding-set=-all", "--inh-caps=-all"]
        with tempfile.TemporaryDirectory() as d:
            probe = Path(d) / "read-only"
            probe.write_text("")
            probe.chmod(0o444)
            code = (
                "import sys\ntry:\n open(sys.argv[1], 'a')\nexcept PermissionError:\n sys.exit(7)"
            )
            r = subprocess.run(
                [*prefix, sys.executable, "-c", code, str(probe)], capture_output=True
            )
        found = (prefix, "") if r.returncode == 7 else (None, f"setpriv did not drop root's "
                 f"power over file modes (exit {r.returncode}: {r.stderr.decode()[-200:]})")  # fmt: skip
    _UNPRIVILEGED.append(found)
    return found


def _apply_perms(run: Path, perms: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Set each ``(target, state)``; those set (an absent target is left out)."""
    from nestedfn.run.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run / "checkpoints") if (run / "checkpoints").is_dir() else None
    changed: list[tuple[Path, str, str]] = []
    for target, state in perms:
        name = target.replace("LATEST", latest.name) if latest is not None else target
        p = run.parent if target == ".." else run / name
        if "LATEST" not in name and p.exists() and not p.is_symlink():
            changed.append((p, target, state))
    # deepest first: an unreadable directory would hide what is below it
    for p, _, state in sorted(changed, key=lambda t: -len(t[0].parts)):
        p.chmod((0o555 if p.is_dir() else 0o444) if state == "read-only" else 0o000)
    return [(target, state) for _, target, state in changed]


def _restore_perms(root: Path) -> None:
    """Owner read/write/search on everything under ``root`` again (to inspect and remove)."""
    root.chmod(0o700)
    for d, dirs, files in os.walk(root):
        for n in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(d, n), 0o700, follow_symlinks=False)
        for n in files:
            with contextlib.suppress(OSError, NotImplementedError):
                os.chmod(os.path.join(d, n), 0o600, follow_symlinks=False)


def fuzz_perm_case(model: Path, data: Path, done: Path, case: dict, timeout: float = 600) -> dict:
    """Run one permission case: the CLI as a subprocess without root's power over file modes
    (``unprivileged()``), held to the fuzzer's oracle; ``{"skipped": why}`` where it cannot
    run."""
    prefix, why = unprivileged()
    if prefix is None:
        return {"skipped": why}
    full = {"flags": [], "run_state": [], "data": "ok", "config": None, **case}
    root = Path(tempfile.mkdtemp(prefix="fuzz-perm-"))
    try:
        mode = "new" if case["mode"] == "new-out" else case["mode"]
        run, argv, _ = _prepare_fuzz(root, model, data, done, {**full, "mode": mode})
        notes = run / "notes.txt"
        if case["mode"] == "new-out":  # --out names a directory to make in `parent`
            parent = root / "parent"
            parent.mkdir()
            notes = parent / "notes.txt"
            notes.write_text("the user's notes\n")
            shutil.rmtree(run)
            argv[argv.index(str(run))] = str(parent / "run")
            run = parent / "run"
        steps_before = _last_step(run)
        full["perms"] = _apply_perms(run, case["perms"])  # what the oracle holds it to
        before = _snapshot(root, skip=run)
        cmd = [*prefix, sys.executable, "-m", "nestedfn.cli", *argv]
        try:
            r = subprocess.run(
                cmd, capture_output=True, text=True, env=_env(), cwd=str(ROOT), timeout=timeout
            )
            code, text = r.returncode, r.stderr
        except subprocess.TimeoutExpired as e:
            code, text = None, f"hung for {timeout} s: {(e.stderr or b'')[-300:]!r}"
        _restore_perms(root)
        return _oracle(full, code, text, "", root, run, before, [], notes, steps_before)
    finally:
        _restore_perms(root)
        shutil.rmtree(root, ignore_errors=True)


def fuzz_trials(model: Path, data: Path, done: Path, n: int, seed: int) -> list[dict]:
    """``n`` Hypothesis examples of ``fuzz_cases`` through ``fuzz_case`` (all kept)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    results: list[dict] = []

    @hseed(seed)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(fuzz_cases())
    def trial(case: dict) -> None:
        results.append({"case": case, **fuzz_case(model, data, done, case)})

    trial()
    return results


def fuzz_perm_trials(model: Path, data: Path, done: Path, n: int, seed: int) -> list[dict]:
    """``n`` Hypothesis examples of ``fuzz_perm_cases`` through ``fuzz_perm_case``; one
    ``{"skipped": why}`` where the CLI cannot be run bound by file permissions."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    prefix, why = unprivileged()
    if prefix is None:
        return [{"skipped": why}]
    results: list[dict] = []

    @hseed(seed)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(fuzz_perm_cases())
    def trial(case: dict) -> None:
        results.append({"case": case, **fuzz_perm_case(model, data, done, case)})

    trial()
    return results


def _fuzz_line(name: str, res: list[dict]) -> str:
    tally = Counter(r["code"] for r in res)
    return (
        f"{name} {sum(r['ok'] for r in res)}/{len(res)} cases held the oracle (exit "
        + ", ".join(f"{k}: {v}" for k, v in sorted(tally.items(), key=str))
        + f"); tracebacks {sum(r['traceback'] for r in res)}, silent acceptances "
        f"{sum(r['silent'] for r in res)}, outside changes "
        f"{sum(bool(r['outside']) for r in res)}, user files removed "
        f"{sum(r['user_removed'] for r in res)}, completed steps lost "
        f"{sum(r['steps_lost'] for r in res)}"
    )


# ---- main -------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="trials per signal (default 20)")
    ap.add_argument("--chained", type=int, default=None, help="chained SIGKILL trials")
    ap.add_argument(
        "--mid-write", type=int, default=None, help="SIGKILL/SIGINT trials aimed at a write"
    )
    ap.add_argument("--jobs", type=int, default=2, help="trials run at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="kill,corrupt,concurrent,os,force,fuzz")
    ap.add_argument("--fuzz", type=int, default=200, help="fuzzer examples (default 200)")
    ap.add_argument(
        "--fuzz-perms", type=int, default=40, help="permission-state examples (default 40)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()
    only = set(args.only.split(","))
    chained = args.chained if args.chained is not None else max(args.kills // 4, 1)
    mid_writes = args.mid_write if args.mid_write is not None else max(args.kills // 2, 1)
    root = Path(tempfile.mkdtemp(prefix="nestedfn-faults-"))
    started = time.monotonic()
    failures: list[str] = []
    lines: list[str] = []

    def say(line: str) -> None:  # as each category ends; the summary again at the end
        lines.append(line)
        print(line, flush=True)

    def fail(found: list[str]) -> list[str]:
        for f in found:
            print("FAIL", f, flush=True)
        return found

    try:
        ctx = setup(root)
        pool = ThreadPoolExecutor(args.jobs)
        if "kill" in only:
            plans = [("SIGKILL", signal.SIGKILL, 1, args.kills, False)]
            plans += [("SIGKILL aimed at a write", signal.SIGKILL, 1, mid_writes, True)]
            plans += [("SIGKILL chained x3", signal.SIGKILL, 3, chained, False)]
            plans += [("SIGINT", signal.SIGINT, 1, args.kills, False)]
            plans += [("SIGINT aimed at a write", signal.SIGINT, 1, mid_writes, True)]
            plans += [("SIGTERM", signal.SIGTERM, 1, args.kills, False)]
            for name, sig, chain, n, aim in plans:
                if n == 0:
                    continue
                base_seed = args.seed * 100_000 + 1000 * chain + sig * 100 + 50 * aim
                seeds = [base_seed + i for i in range(n)]
                res = list(
                    pool.map(
                        lambda s, sig=sig, chain=chain, aim=aim: kill_trial(
                            ctx, sig, s, chain, aim
                        ),
                        seeds,
                    )
                )
                ok = sum(r["ok"] for r in res)
                mid = sum(r["mid_write"] for r in res)
                say(f"{name} {ok}/{n} resumed bit-identical ({mid} mid-write)")
                failures += fail([f"{name}: {r['why']}" for r in res if not r["ok"]])
        if "corrupt" in only:
            trials = [(k, m) for k in FILE_KINDS for m in MODES]
            res = list(pool.map(lambda km: corruption_trial(ctx, *km, args.seed), trials))
            tally = Counter(r["outcome"] for r in res)
            good = tally["refused"] + tally["warned"] + tally["no effect"]
            say(
                f"corruption {good}/{len(trials)} refused or fell back ({tally['refused']} refused, "
                f"{tally['warned']} continued with a warning naming the file, {tally['no effect']} "
                f"without effect); silent acceptances {tally['silent'] + tally['wrong']}"
            )
            failures += fail(
                [
                    f"corrupt {k} ({m}): {r['outcome']} {r['err']}"
                    for (k, m), r in zip(trials, res)
                    if r["outcome"] not in ("refused", "warned", "no effect")
                ]
            )
        if "concurrent" in only:
            res = list(pool.map(lambda k: concurrent_trial(ctx, k), ["new", "resume"]))
            ok = sum(r["ok"] for r in res)
            lines.append(
                f"concurrent runs {ok}/2 (one ran, bit-identical; the other exit 2 naming the holder)"
            )
            failures += fail([f"concurrent: {r}" for r in res if not r["ok"]])
        if "os" in only:
            res = os_trials(ctx)
            ran = {k: v for k, v in res.items() if not v.startswith("skipped")}
            ok = sum(v == "pass" for v in ran.values())
            skipped = [k for k, v in res.items() if v.startswith("skipped")]
            say(
                f"OS errors {ok}/{len(ran)} one line, exit 74, checkpoints intact ("
                + ", ".join(ran)
                + (f"; skipped: {', '.join(skipped)}" if skipped else "")
                + ")"
            )
            failures += fail([f"os {k}: {v}" for k, v in ran.items() if v != "pass"])
        if "force" in only:
            ok, n, deleted = force_trials(ctx)
            say(f"--force {ok}/{n} kept the user's files; user files deleted {deleted}")
            if ok != n:
                failures += fail([f"--force: {n - ok} trial(s) failed"])
        pool.shutdown()
        if "fuzz" in only and args.fuzz:
            tic = time.monotonic()
            res = fuzz_trials(ctx.model, ctx.data, ctx.base, args.fuzz, args.seed)
            say(_fuzz_line("fuzz", res) + f" ({time.monotonic() - tic:.0f} s)")
            failures += fail([f"fuzz {r['case']}: {r['why']}" for r in res if not r["ok"]])
        if "fuzz" in only and args.fuzz_perms:
            tic = time.monotonic()
            res = fuzz_perm_trials(ctx.model, ctx.data, ctx.base, args.fuzz_perms, args.seed)
            if "skipped" in res[0]:
                say(f"fuzz permissions skipped: {res[0]['skipped']}")
            else:
                line = _fuzz_line("fuzz permissions (unprivileged CLI)", res)
                say(line + f" ({time.monotonic() - tic:.0f} s)")
                failures += fail([f"fuzz {r['case']}: {r['why']}" for r in res if not r["ok"]])
        say(f"tracebacks {len(ctx.tracebacks)}")
        print("\n".join(lines))
        for tb in ctx.tracebacks[:3]:
            print("TRACEBACK", tb)
        print(f"({time.monotonic() - started:.0f} s)")
        return 1 if failures or ctx.tracebacks else 0
    finally:
        if not args.keep:
            with contextlib.suppress(Exception):
                shutil.rmtree(root)


if __name__ == "__main__":
    sys.exit(main())
