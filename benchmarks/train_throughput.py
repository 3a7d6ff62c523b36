"""Training throughput: ``nestedfn train`` against ``python -m mlx_lm lora``, one config, one run.

Both read the *same* mlx-lm YAML config (``-c``): LoRA adapters of the tiny demo Llama
(``nestedfn.lm.demo``) on the same JSONL data, same batch size, maximum sequence length, LoRA
rank/scale, number of layers, learning rate, optimizer (Adam) and seed; each run in its own
process, alternating (``--rounds``) so that a noisy machine hits both.  On a GPU both run on
the GPU (MLX's default device).

* mlx-lm: its own tokens/s reports (tokens = the target tokens its mask selects), the first
  report (compilation) left out.
* nestedfn: ``adam`` (the config's optimizer) and ``nested_adam`` (frequencies 1, 2, 4);
  tokens/s = target tokens of the steps after the warm-up divided by the *wall-clock* time
  between those steps' records in ``metrics.jsonl`` (batching, logging, tier statistics and
  the progress bar included).

Prints one line per run and the median ratios nestedfn / mlx-lm; ``--json`` writes them.
Not a test.

    python benchmarks/train_throughput.py [--iters 200] [--batch-size 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
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


# mlx-lm's report lines: "Iter 10: Train loss 2.3, ..., Tokens/sec 1234.5, ..." (classic) or
# a table row "  10    2.345 ▼    1,234    12.3k" (newer)
_CLASSIC = re.compile(r"Iter (\d+): Train loss [^,]+,.*?Tokens/sec ([0-9.]+)")
_TABLE = re.compile(r"^\s*(\d+)\s+[0-9.]+ [▼▲]\s+([0-9,]+)\s+[0-9.]+k", re.M)


def mlx_lm_tokens_per_sec(cfg: Path, work: Path) -> float:
    cmd = [sys.executable, "-m", "mlx_lm", "lora", "-c", str(cfg)]
    cmd += ["--adapter-path", str(work / "mlx_lm_run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"mlx_lm lora failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
    rows = _CLASSIC.findall(text) or _TABLE.findall(text)
    rates = [float(tps.replace(",", "")) for _, tps in rows]
    if len(rates) < 3:
        raise SystemExit(f"could not read mlx_lm's tokens/s reports:\n{proc.stdout[-2000:]}")
    return statistics.mean(rates[1:])


def nestedfn_tokens_per_sec(
    cfg: Path, work: Path, warmup: int, extra: list[str], tag: str
) -> tuple[float, float]:
    """(tokens/s, final train loss) of ``nestedfn train -c cfg`` with ``extra`` options."""
    out = work / f"nestedfn_{tag}"
    cmd = [sys.executable, "-m", "nestedfn", "train", "-c", str(cfg), "--adapter-path", str(out)]
    cmd += ["--force", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"nestedfn train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["type"] == "train"]
    warm = recs[warmup - 1]
    steady = recs[warmup:]
    tokens = sum(r["tokens"] for r in steady)
    return tokens / (steady[-1]["elapsed"] - warm["elapsed"]), recs[-1]["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=10, help="nestedfn steps left out")
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
        losses: dict[str, float] = {}
        for r in range(a.rounds):
            for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
                if name == "mlx_lm":
                    tps = mlx_lm_tokens_per_sec(cfg, work)
                else:
                    extra = ["--optimizer", "nested_adam"] if name == "nested_adam" else []
                    tps, losses[name] = nestedfn_tokens_per_sec(cfg, work, a.warmup, extra, name)
                runs[name].append(tps)
                print(f"round {r + 1}: {name:12s} {tps:8.0f} tokens/s", flush=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        for k in ("nested_adam", "adam"):
            print(
                f"nestedfn {k}: {med[k]:.0f} tokens/s = {med[k] / med['mlx_lm']:.2f}x "
                f"mlx_lm lora (Adam) {med['mlx_lm']:.0f} tokens/s (medians)"
            )
        if a.json:
            ratios = {k: med[k] / med["mlx_lm"] for k in ("nested_adam", "adam")}
            Path(a.json).write_text(
                json.dumps({"runs": runs, "median": med, "ratio": ratios, "loss": losses}, indent=1)
            )


if __name__ == "__main__":
    main()
