"""Why ``resident_step`` with bfloat16 Nesterov momentum refuses itself on a GPU (issue 24).

On the H200 its first-step check found ``params.0.model.norm`` beyond bfloat16 rounding of
the eager step (value_and_grad on the tree + apply_gradients); on the CPU the two are
bit-identical.  This runs the test suite's tiny model (``tests/fast/test_resident.py``) with
the check off and prints, per leaf and step, how far the resident step and the eager step
each are from a float32 reference of the same step (the bfloat16 state cast up): if both are
about as far, the check's elementwise tolerance is too tight for bfloat16 on that device; if
the resident step is much farther, it is wrong there.  Not a test.

    python benchmarks/gpu/resident_bf16.py [--steps 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from nestedfn.fast.resident import resident_step  # noqa: E402
from nestedfn.optim.optimizers import adam, momentum  # noqa: E402
from nestedfn.tree import flatten  # noqa: E402
from tests.fast.test_resident import _batch, _mlp, _mlp_loss, _reference_step, _upcast  # noqa: E402


def _err(x: mx.array, ref: mx.array) -> tuple[float, float]:
    """(max abs difference, relative L2 difference) of ``x`` from ``ref``."""
    d = x.astype(mx.float32) - ref
    norm = mx.sqrt(mx.sum(ref * ref)).item()
    return mx.max(mx.abs(d)).item(), mx.sqrt(mx.sum(d * d)).item() / max(norm, 1e-30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    print("device", mx.default_device(), "mlx", mx.__version__, flush=True)
    optimizers = {"momentum": lambda: momentum(0.05, nesterov=True), "adam": lambda: adam(1e-2)}
    for name, make in optimizers.items():
        opt = make()
        fn = resident_step(opt, _mlp_loss, _mlp(0, mx.bfloat16), chunk_size=24, verify=False)
        state = fn.init()
        for t in range(a.steps):
            batch = _batch(100 + t)
            before = fn.unpack_state(state)
            _, eager = _reference_step(opt, _mlp_loss, before, *batch)
            _, exact = _reference_step(opt, _mlp_loss, _upcast(before), *batch)
            _, state = fn(state, *batch)
            got = fn.unpack_state(state)
            trees = [(got, "resident"), (eager, "eager")]
            leaves = {w: flatten((s.params, s.opt_state))[0] for s, w in trees}
            ref_leaves, td = flatten((exact.params, exact.opt_state))
            for i, (path, ref) in enumerate(zip(td.paths(), ref_leaves)):
                if not isinstance(ref, mx.array):
                    continue
                r_abs, r_rel = _err(leaves["resident"][i], ref)
                e_abs, e_rel = _err(leaves["eager"][i], ref)
                same = mx.array_equal(leaves["resident"][i], leaves["eager"][i]).item()
                print(
                    f"{name} step {t} {path}: vs float32 resident {r_abs:.3g} ({r_rel:.3g}) "
                    f"eager {e_abs:.3g} ({e_rel:.3g}) identical={same} "
                    f"max|ref|={mx.max(mx.abs(ref)).item():.3g}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
