"""Training throughput: ``nestedfn train`` against ``python -m mlx_lm lora``, one config, one run.

Both read the *same* mlx-lm YAML config (``-c``): LoRA adapters of the tiny demo Llama
(``nestedfn.lm.demo``) on the same JSONL data, same batch size, maximum sequence length, LoRA
rank/scale, number of layers, learning rate, optimizer (Adam) and seed; each run in its own
process, alternating (``--rounds``) so that a noisy machine hits both.  On a GPU both run on
the GPU (MLX's default device).

Both are timed the same way, from outside: each process runs with unbuffered output, every
report line is stamped as it arrives, and tokens/s is the tokens trained between the second
report and the second-to-last one divided by the wall-clock time between those two lines
(batching, evaluation points, logging, checkpoint and progress output included for both; the
first window, with compilation, and the last, with the final evaluation, left out).  Tokens:
mlx-lm's running total from its report rows, nestedfn's from ``metrics.jsonl``.  mlx-lm's
own tokens/s (its step time only: no batching, no reporting) is printed beside it.

* nestedfn: ``adam`` (the config's optimizer) and ``nested_adam`` (frequencies 1, 2, 4).

Prints one line per run and the median ratios nestedfn / mlx-lm; ``--json`` writes them.
Not a test.

    python benchmarks/train_throughput.py [--iters 200] [--batch-size 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import accumulate
from pathlib import Path


def write_config(path: Path, model: Path, data: Path, a: argparse.Namespace) -> Path:
    """The one mlx-lm LoRA config both trainers read."""
    path.write_text(
        f"model: {model}\ndata: {data}\ntrain: true\nfine_tune_type: lora\n"
        f"optimizer: adam\nlearning_rate: 1.0e-3\nbatch_size: {a.batch_size}\n"
        f"iters: {a.iters}\nmax_seq_length: {a.max_seq_len}\nnum_layers: 4\n"
        f"steps_per_report: 10\nsteps_per_eval: 100000\nval_batches: 1\n"
        f"save_every: 100000\nseed: 0\n"
        f"lora_parameters:\n  rank: {a.rank}\n  scale: 20.0\n  dropout: 0.0\n"
    )
    return path


# mlx-lm's report lines: "Iter 10: Train loss 2.3, ..., Tokens/sec 1234.5, Trained Tokens
# 5678, ..." (classic) or a table row "  10    2.345 ▼    1,234    12.3k" (newer: tok/s, tokens)
_CLASSIC = re.compile(r"Iter (\d+): Train loss [^,]+,.*?Tokens/sec ([0-9.]+), Trained Tokens (\d+)")
_TABLE = re.compile(r"^\s*(\d+)\s+[0-9.]+ [▼▲]\s+([0-9,]+)\s+([0-9.]+)k\s*$")
_NESTEDFN = re.compile(r"^step (\d+)/\d+: loss")


def _stamped(cmd: list[str]) -> list[tuple[float, str]]:
    """Run ``cmd`` with unbuffered output; each output line with the time it arrived."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "TERM": "dumb"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    lines = [(time.perf_counter(), line.rstrip("\n")) for line in proc.stdout]
    if proc.wait():
        tail = "\n".join(x for _, x in lines[-30:])
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{tail}")
    return lines


def _window_rate(reports: list[tuple[int, float, float]]) -> float:
    """Tokens/s between the second report and the second-to-last one: ``reports`` holds
    (step, time the line arrived, tokens trained so far)."""
    if len(reports) < 4:
        raise SystemExit(f"too few reports to time ({len(reports)}): raise --iters")
    (_, t0, n0), (_, t1, n1) = reports[1], reports[-2]
    return (n1 - n0) / (t1 - t0)


def mlx_lm_tokens_per_sec(cfg: Path, work: Path) -> tuple[float, float]:
    """(tokens/s timed from outside, mlx-lm's own mean tokens/s after its first report)."""
    cmd = [sys.executable, "-m", "mlx_lm", "lora", "-c", str(cfg)]
    lines = _stamped(cmd + ["--adapter-path", str(work / "mlx_lm_run")])
    reports, own = [], []
    for t, line in lines:
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if m := _CLASSIC.search(line):
            reports.append((int(m[1]), t, float(m[3])))
        elif m := _TABLE.match(line):
            reports.append((int(m[1]), t, float(m[3]) * 1000))
        else:
            continue
        own.append(float(m[2].replace(",", "")))
    return _window_rate(reports), statistics.mean(own[1:])


def nestedfn_tokens_per_sec(
    cfg: Path, work: Path, extra: list[str], tag: str
) -> tuple[float, float]:
    """(tokens/s timed from outside, final train loss) of ``nestedfn train -c cfg`` with
    ``extra`` options."""
    out = work / f"nestedfn_{tag}"
    cmd = [sys.executable, "-m", "nestedfn", "train", "-c", str(cfg), "--adapter-path", str(out)]
    lines = _stamped(cmd + ["--force", *extra])
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["type"] == "train"]
    trained = dict(zip((r["step"] for r in recs), accumulate(r["tokens"] for r in recs)))
    reports = [(int(m[1]), t, trained[int(m[1])]) for t, x in lines if (m := _NESTEDFN.match(x))]
    return _window_rate(reports), recs[-1]["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from nestedfn.lm.demo import build_demo_model, write_demo_dataset

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_demo_model(work / "model")
        data = write_demo_dataset(work / "data", n_train=400, n_valid=40)
        cfg = write_config(work / "lora.yaml", model, data, a)
        print(
            f"tiny Llama (hidden 64, 4 layers), LoRA rank {a.rank} on 4 layers, batch "
            f"{a.batch_size}, max seq len {a.max_seq_len}, {a.iters} iters, {a.rounds} rounds, "
            f"one config: {cfg.name}",
            flush=True,
        )
        runs: dict[str, list[float]] = {"mlx_lm": [], "nested_adam": [], "adam": []}
        own: list[float] = []  # mlx-lm's own figure (its step time only)
        losses: dict[str, float] = {}
        for r in range(a.rounds):
            for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
                note = ""
                if name == "mlx_lm":
                    tps, mine = mlx_lm_tokens_per_sec(cfg, work)
                    own.append(mine)
                    note = f"  (its own report, step time only: {mine:.0f})"
                else:
                    extra = ["--optimizer", "nested_adam"] if name == "nested_adam" else []
                    tps, losses[name] = nestedfn_tokens_per_sec(cfg, work, extra, name)
                runs[name].append(tps)
                print(f"round {r + 1}: {name:12s} {tps:8.0f} tokens/s{note}", flush=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        for k in ("nested_adam", "adam"):
            print(
                f"nestedfn {k}: {med[k]:.0f} tokens/s = {med[k] / med['mlx_lm']:.2f}x "
                f"mlx_lm lora (Adam) {med['mlx_lm']:.0f} tokens/s (medians)"
            )
        if a.json:
            ratios = {k: med[k] / med["mlx_lm"] for k in ("nested_adam", "adam")}
            Path(a.json).write_text(
                json.dumps(
                    {
                        "runs": runs,
                        "median": med,
                        "ratio": ratios,
                        "loss": losses,
                        "mlx_lm_own_report": own,
                    },
                    indent=1,
                )
            )


if __name__ == "__main__":
    main()
