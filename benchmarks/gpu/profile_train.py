"""Where the host time of a training step goes: ``nestedfn train`` (Adam, the config of
``benchmarks/train_throughput.py``) under cProfile on the default device, in this process.

Prints the functions with the most own time and the nestedfn/mlx-lm functions with the most
cumulative time, and writes the raw stats to ``--out``.pstats.  Not a test.

    python benchmarks/gpu/profile_train.py [--iters 60] [--out DIR/profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_throughput as tt  # noqa: E402

from nestedfn.cli import entry  # noqa: E402
from nestedfn.lm.demo import build_demo_model, write_demo_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--out", default="profile")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_demo_model(work / "model")
        data = write_demo_dataset(work / "data", n_train=400, n_valid=40)
        ns = argparse.Namespace(batch_size=4, iters=a.iters, max_seq_len=128, rank=8)
        cfg = tt.write_config(work / "lora.yaml", model, data, ns)
        sys.argv = ["nestedfn", "train", "-c", str(cfg), "--adapter-path", str(work / "run")]
        sys.argv += ["--force", "--optimizer", a.optimizer]
        prof = cProfile.Profile()
        prof.enable()
        try:
            entry()
        except SystemExit:
            pass
        prof.disable()
    prof.dump_stats(a.out + ".pstats")
    for key, pattern in (("tottime", ""), ("cumulative", "nestedfn|mlx_lm")):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(pattern, 35)
        print(buf.getvalue()[-6000:])


if __name__ == "__main__":
    main()
