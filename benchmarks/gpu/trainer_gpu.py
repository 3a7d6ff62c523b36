"""The trainer on the default device (the GPU on the GPU machine): ``nestedfn demo`` runs, and
``nestedfn train`` with an mlx-lm config resumes bit-identically.

For ``adam`` and ``nested_adam`` (1, 2, 4): one run of ``--iters`` steps straight through, and
one stopped at ``--iters // 2 + 1`` (an odd step: a slow tier in the middle of its chunk) and
resumed (``--resume``) to the end; the two final adapters must be equal bit for bit, and so must
the per-step training losses after the stop.  Prints one line per check and writes ``--json``.

    python benchmarks/gpu/trainer_gpu.py [--iters 20] [--out DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx


def _run(cmd: list[str]) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return proc.returncode, (proc.stdout + proc.stderr)[-3000:], time.perf_counter() - t0


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r.get("type") == "train"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--demo-steps", type=int, default=40)
    p.add_argument("--out", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from nestedfn.lm.demo import build_demo_model, write_demo_dataset

    py = sys.executable
    res: dict[str, object] = {"device": str(mx.default_device()), "mlx": mx.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.out) if a.out else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rc, tail, dt = _run(
            [py, "-m", "nestedfn", "demo", "--out", str(work / "demo"), "--force"]
            + ["--steps", str(a.demo_steps)]
        )
        res["demo"] = {"rc": rc, "seconds": round(dt, 1), "tail": tail[-800:]}
        print(f"demo: rc {rc} in {dt:.1f} s\n{tail[-600:]}", flush=True)
        model = build_demo_model(work / "model")
        data = write_demo_dataset(work / "data", n_train=200, n_valid=20)
        cfg = work / "lora.yaml"
        cfg.write_text(
            f"model: {model}\ndata: {data}\ntrain: true\nfine_tune_type: lora\n"
            f"learning_rate: 1.0e-3\nbatch_size: 4\niters: {a.iters}\nmax_seq_length: 64\n"
            "num_layers: 4\nsteps_per_report: 5\nsteps_per_eval: 100000\nval_batches: 1\n"
            "save_every: 100000\nseed: 0\n"
            "lora_parameters:\n  rank: 8\n  scale: 20.0\n  dropout: 0.0\n"
        )
        stop = a.iters // 2 + 1
        for opt in ("adam", "nested_adam"):
            base = [py, "-m", "nestedfn", "train", "-c", str(cfg), "--optimizer", opt]
            full, part = work / f"{opt}_full", work / f"{opt}_resumed"
            checks: dict[str, object] = {}
            for tag, cmd in (
                ("straight", base + ["--adapter-path", str(full), "--force"]),
                (
                    "stopped",
                    base + ["--adapter-path", str(part), "--force", "--stop-at", str(stop)],
                ),
                ("resumed", [py, "-m", "nestedfn", "train", "--resume", str(part)]),
            ):
                rc, tail, dt = _run(cmd)
                checks[tag] = {"rc": rc, "seconds": round(dt, 1)}
                print(f"{opt} {tag}: rc {rc} in {dt:.1f} s", flush=True)
                if rc:
                    print(tail, flush=True)
                    checks[tag]["tail"] = tail  # type: ignore[index]
            try:
                wa = mx.load(str(full / "adapters.safetensors"))
                wb = mx.load(str(part / "adapters.safetensors"))
                same = sorted(wa) == sorted(wb) and all(
                    mx.array_equal(wa[k], wb[k]).item() for k in wa
                )
                la, lb = _losses(full), _losses(part)
                after = [s for s in la if s > stop]
                same_loss = bool(after) and all(la[s] == lb.get(s) for s in after)
                checks["adapters_bit_identical"] = same
                checks["losses_after_stop_identical"] = same_loss
                checks["final_loss"] = la[max(la)] if la else None
            except Exception as e:  # a failed run leaves nothing to compare: say so
                checks["compare_error"] = f"{type(e).__name__}: {e}"
            print(f"{opt}: {checks}", flush=True)
            res[opt] = checks
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
