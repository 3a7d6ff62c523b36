"""``nestedfn plot RUN_DIR``: a PNG of a run's loss curves and of when each tier updated.

Reads ``metrics.jsonl`` only.  Top panel: training loss per step, validation loss at each
eval and the test loss (a point at the step it was measured).  Bottom panel (for nested optimizers): one row per tier with a tick at every step where
that tier's update count went up, so the frequencies are visible at a glance.
"""

from __future__ import annotations

import json
from pathlib import Path

from nestedfn.lm.errors import RunError
from nestedfn.lm.rundir import METRICS_FILE

__all__ = ["plot_run", "read_metrics"]


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict], list[dict]]:
    """``(train, eval, test records)`` of ``run_dir/metrics.jsonl``; a missing or empty file,
    bytes that are not UTF-8, a line that is not a JSON object with an int ``step`` raise a
    ``RunError`` naming the file (and line)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RunError(f"{path} does not exist: {run_dir} is not a nestedfn run directory")
    train: list[dict] = []
    evals: list[dict] = []
    tests: list[dict] = []
    kinds = {"train": train, "eval": evals, "test": tests}
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RunError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise RunError(f"{path}:{lineno}: a JSON {type(rec).__name__}, not a metrics record")
        step = rec.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise RunError(f"{path}:{lineno}: a record without an int step")
        kind = rec.get("type", "train")
        if kind not in kinds or not isinstance(rec.get(_VALUE[kind]), (int, float, type(None))):
            raise RunError(f"{path}:{lineno}: not a train, eval or test record")
        kinds[kind].append(rec)
    if not (train or evals or tests):
        raise RunError(f"{path} holds no records")
    return train, evals, tests


_VALUE = {"train": "loss", "eval": "valid_loss", "test": "test_loss"}


def _tier_ticks(train: list[dict]) -> list[list[int]]:
    """Per tier, the steps at which its update count increased."""
    ticks: list[list[int]] = []
    prev: list[int] | None = None
    for rec in train:
        counts = rec.get("tier_updates")
        if counts is None:
            continue
        if prev is None:
            prev = [0] * len(counts)
            ticks = [[] for _ in counts]
        for k, (a, b) in enumerate(zip(prev, counts)):
            if b > a:
                ticks[k].append(rec["step"])
        prev = counts
    return ticks


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the PNG (default ``run_dir/training.png``) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(out) if out else Path(run_dir) / "training.png"
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if path.suffix.lstrip(".").lower() not in formats:
        raise RunError(
            f"--out {path}: the extension must name an image format ({', '.join(sorted(formats))})"
        )
    train, evals, tests = read_metrics(run_dir)
    ticks = _tier_ticks(train)
    rows = 2 if ticks else 1
    fig, axes = plt.subplots(rows, 1, figsize=(9, 6 if ticks else 4), sharex=True, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train")
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["valid_loss"] for r in evals],
            "o-",
            lw=1.5,
            label="valid",
        )
    for r in tests:
        ax.plot([r["step"]], [r["test_loss"]], "s", ms=7, label=f"test {r['test_loss']:.3f}")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"nestedfn run {Path(run_dir).name}")
    ax.legend()
    ax.grid(alpha=0.3)
    if ticks:
        tx = axes[1][0]
        for k, steps in enumerate(ticks):
            tx.vlines(steps, k - 0.4, k + 0.4, lw=1, color=f"C{k % 10}")
        tx.set_yticks(range(len(ticks)))
        tx.set_yticklabels([f"tier {k} ({len(s)} updates)" for k, s in enumerate(ticks)])
        tx.set_ylim(-0.6, len(ticks) - 0.4)
        tx.invert_yaxis()
        tx.set_title("tier updates")
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
