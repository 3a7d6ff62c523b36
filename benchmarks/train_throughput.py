"""Training throughput: ``nestedfn train`` against mlx-lm's own LoRA trainer, in one run.

Both train LoRA adapters of the same tiny demo Llama (``nestedfn.lm.demo``) on the same JSONL
data with the same batch size, maximum sequence length, LoRA rank/scale and number of layers,
each in its own process, alternating (``--rounds``) so that a noisy shared machine hits both.

* mlx-lm: ``python -m mlx_lm lora --train`` with Adam; its own tokens/s reports
  (tokens = the target tokens its mask selects), the first report (compilation) left out.
* nestedfn: ``python -m nestedfn.cli train`` with ``nested_adam`` (frequencies 1, 2, 4) and
  with plain ``adam`` (one frequency); tokens/s = target tokens of steps after the warm-up,
  divided by the *wall-clock* time between those steps' records in ``metrics.jsonl`` (so
  batching, logging, tier statistics and the progress bar are all included).

Prints one line per run and the median ratio nestedfn / mlx-lm.  Not a test.

    python benchmarks/train_throughput.py [--steps 200] [--batch-size 4] [--rounds 2]
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


def mlx_lm_tokens_per_sec(model: Path, data: Path, work: Path, a: argparse.Namespace) -> float:
    cfg = work / "mlx_lm.yaml"
    cfg.write_text(
        f"lora_parameters:\n  rank: {a.rank}\n  scale: 20.0\n  dropout: 0.0\n"
        f"num_layers: 4\nlearning_rate: 1.0e-3\n"
    )
    cmd = [
        sys.executable, "-m", "mlx_lm", "lora", "--train", "-c", str(cfg),
        "--model", str(model), "--data", str(data), "--adapter-path", str(work / "mlx_lm_run"),
        "--batch-size", str(a.batch_size), "--iters", str(a.steps),
        "--max-seq-length", str(a.max_seq_len), "--steps-per-report", "10",
        "--steps-per-eval", "100000", "--val-batches", "1", "--save-every", "100000",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"mlx_lm lora failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
    # its report rows: "  ITER    LOSS ▼    TOKENS/S    TRAINED_k"
    rows = re.findall(r"^\s*(\d+)\s+[0-9.]+ [▼▲]\s+([0-9,]+)\s+[0-9.]+k", text, re.M)
    rates = [float(tps.replace(",", "")) for _, tps in rows]
    if len(rates) < 3:
        raise SystemExit(f"could not read mlx_lm's tokens/s reports:\n{proc.stdout[-2000:]}")
    return statistics.mean(rates[1:])


def nestedfn_tokens_per_sec(
    model: Path, data: Path, work: Path, a: argparse.Namespace, optimizer: list[str], tag: str
) -> float:
    out = work / f"nestedfn_{tag}"
    cmd = [
        sys.executable, "-m", "nestedfn.cli", "train", "--model", str(model), "--data", str(data),
        "--out", str(out), "--force", "--steps", str(a.steps), "--batch-size", str(a.batch_size),
        "--max-seq-len", str(a.max_seq_len), "--lora-rank", str(a.rank), "--lora-scale", "20",
        "--lora-layers", "4", "--learning-rate", "1e-3", "--eval-every", "0",
        "--save-every", "100000", *optimizer,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"nestedfn train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["type"] == "train"]
    warm = recs[a.warmup - 1]
    steady = recs[a.warmup :]
    tokens = sum(r["tokens"] for r in steady)
    return tokens / (steady[-1]["elapsed"] - warm["elapsed"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=10, help="nestedfn steps left out")
    a = p.parse_args()
    from nestedfn.lm.demo import build_demo_model, write_demo_dataset

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_demo_model(work / "model")
        data = write_demo_dataset(work / "data", n_train=400, n_valid=40)
        print(
            f"tiny Llama (hidden 64, 4 layers), LoRA rank {a.rank} on 4 layers, batch "
            f"{a.batch_size}, max seq len {a.max_seq_len}, {a.steps} steps, {a.rounds} rounds"
        )
        runs: dict[str, list[float]] = {"mlx_lm": [], "nested_adam": [], "adam": []}
        for r in range(a.rounds):
            for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
                if name == "mlx_lm":
                    tps = mlx_lm_tokens_per_sec(model, data, work, a)
                elif name == "nested_adam":
                    tps = nestedfn_tokens_per_sec(
                        model, data, work, a, ["--optimizer", "nested_adam"], name
                    )
                else:
                    opt = ["--optimizer", "adam", "--frequencies", "1"]
                    tps = nestedfn_tokens_per_sec(model, data, work, a, opt, name)
                runs[name].append(tps)
                print(f"round {r + 1}: {name:12s} {tps:8.0f} tokens/s", flush=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        for k in ("nested_adam", "adam"):
            print(
                f"nestedfn {k}: {med[k]:.0f} tokens/s = {med[k] / med['mlx_lm']:.2f}x "
                f"mlx_lm lora (Adam) {med['mlx_lm']:.0f} tokens/s (medians)"
            )


if __name__ == "__main__":
    main()
