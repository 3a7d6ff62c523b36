"""Checkpoints: bit-exact round trips, structure checks, atomic writes under a kill, pruning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nestedfn.optim.core import TrainState
from nestedfn.run.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from nestedfn.testing import strategies as nfs
from nestedfn.tree import TreeMismatchError, flatten


class AdamLike(NamedTuple):
    count: int
    mu: dict
    nu: dict


def bits(x):
    """Raw bits of an array leaf (so NaN payloads and -0.0 count), else the value itself."""
    if isinstance(x, mx.array):
        if x.dtype in (mx.bfloat16, mx.float16):
            return ("f16bits", str(x.dtype), x.shape, np.array(x.view(mx.uint16)).tobytes())
        return (str(x.dtype), x.shape, np.array(x).tobytes())
    if isinstance(x, np.ndarray | np.generic):
        return ("np", x.dtype.str, np.shape(x), np.asarray(x).tobytes(), type(x).__name__)
    return (type(x).__name__, x if x == x else "nan")


def assert_identical(a, b):
    la, ta = flatten(a)
    lb, tb = flatten(b)
    assert ta == tb
    assert [bits(x) for x in la] == [bits(x) for x in lb]


def sample_state(step=7):
    w = mx.array([[1.5, -0.0], [float("nan"), 3.25]], dtype=mx.bfloat16)
    params = {
        "layers": [{"q": {"lora_a": mx.arange(6, dtype=mx.float32).reshape(2, 3)}}, {}],
        "head": w,
        "bias": None,
    }
    opt = (
        AdamLike(count=3, mu={"x": mx.array([1e-30, 2.0], dtype=mx.float16)}, nu={}),
        (),
        [],
        {"lr": 0.1, "flag": True, "name": "tier0", "counter": 2**40, "tiny": 5e-324},
        mx.array(11, dtype=mx.int32),
        np.array([1.0, 2.0], dtype=np.float64),
        np.int64(4),
    )
    return TrainState(params=params, opt_state=opt, step=step)


def test_round_trip_bit_exact(tmp_path):
    state = sample_state()
    extra = {"data_index": 12, "seed": 3, "config": {"lr": 1e-3, "tiers": [1, 4]}}
    path = save_checkpoint(tmp_path, state, extra, step=7)
    assert path == tmp_path / "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == ["arrays.safetensors", "meta.json"]
    like = sample_state(step=0)
    restored, got_extra = load_checkpoint(path, like)
    assert got_extra == extra
    assert isinstance(restored, TrainState) and isinstance(restored.opt_state[0], AdamLike)
    assert restored.step == 7 and type(restored.step) is int
    assert restored.opt_state[0].count == 3 and type(restored.opt_state[0].count) is int
    assert restored.params["head"].dtype == mx.bfloat16
    assert_identical(restored, state)


def test_array_step_round_trips(tmp_path):
    state = sample_state(step=mx.array(9, dtype=mx.int32))
    restored, _ = load_checkpoint(save_checkpoint(tmp_path, state, {}, 9), state)
    assert restored.step.dtype == mx.int32 and restored.step.item() == 9


def test_empty_state_round_trips(tmp_path):
    state = TrainState(params={}, opt_state=(), step=0)
    restored, extra = load_checkpoint(save_checkpoint(tmp_path, state, {}, 0), state)
    assert restored == state and extra == {}


_leaves = st.one_of(
    nfs.mlx_arrays(dtypes=(mx.float32, mx.bfloat16, mx.float16, mx.int32)),
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=False, width=64),
    st.booleans(),
)


@settings(max_examples=20)
@given(tree=nfs.trees(leaves=_leaves, max_leaves=8))
def test_any_tree_round_trips(tmp_path_factory, tree):
    d = tmp_path_factory.mktemp("ck")
    restored, _ = load_checkpoint(save_checkpoint(d, tree, {"k": 1}, 1), tree)
    assert_identical(restored, tree)


def test_structure_mismatch_names_path(tmp_path):
    path = save_checkpoint(tmp_path, sample_state(), {}, 1)
    other = sample_state()
    other.params["layers"][1]["extra"] = mx.zeros(2)
    with pytest.raises(TreeMismatchError, match=r"params\.layers\.1: dict keys differ"):
        load_checkpoint(path, other)
    shorter = sample_state()._replace(opt_state=sample_state().opt_state[:-1])
    with pytest.raises(TreeMismatchError, match="opt_state: length 7 in checkpoint, 6 in like"):
        load_checkpoint(path, shorter)
    renamed = sample_state()
    renamed.opt_state[3]["rate"] = renamed.opt_state[3].pop("lr")
    with pytest.raises(TreeMismatchError, match="only in checkpoint"):
        load_checkpoint(path, renamed)


def test_shape_dtype_and_kind_mismatch(tmp_path):
    path = save_checkpoint(tmp_path, sample_state(), {}, 1)
    wrong = sample_state()
    wrong.params["head"] = wrong.params["head"].astype(mx.float32)
    with pytest.raises(TreeMismatchError, match=r"params\.head: checkpoint has mlx.core.bfloat16"):
        load_checkpoint(path, wrong)
    wrong = sample_state()
    wrong.params["layers"][0]["q"]["lora_a"] = mx.zeros((3, 2))
    with pytest.raises(TreeMismatchError, match=r"lora_a.*\[2, 3\].*\[3, 2\]"):
        load_checkpoint(path, wrong)
    with pytest.raises(TreeMismatchError, match="step: checkpoint leaf is int, like's is array"):
        load_checkpoint(path, sample_state(step=mx.array(0)))


def test_bad_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="not JSON-able"):
        save_checkpoint(tmp_path, sample_state(), {"f": object()}, 1)
    with pytest.raises(CheckpointError, match="non-negative int"):
        save_checkpoint(tmp_path, sample_state(), {}, -1)
    with pytest.raises(CheckpointError, match="'params.x' is a object"):
        save_checkpoint(tmp_path, TrainState({"x": object()}, (), 0), {}, 1)
    assert list_checkpoints(tmp_path) == []  # nothing half-written was left behind
    assert [p.name for p in tmp_path.iterdir()] == []
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "step_00000001", sample_state())


def test_same_step_is_replaced(tmp_path):
    save_checkpoint(tmp_path, sample_state(), {"v": 1}, 5)
    save_checkpoint(tmp_path, sample_state(), {"v": 2}, 5)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]
    assert load_checkpoint(tmp_path / "step_00000005", sample_state())[1] == {"v": 2}


def test_latest_and_prune(tmp_path):
    assert latest_checkpoint(tmp_path / "nowhere") is None
    state = TrainState({"w": mx.ones(2)}, (), 0)
    for s in (3, 20, 100, 7, 250):
        save_checkpoint(tmp_path, state, {"s": s}, s)
    (tmp_path / "step_00000999").mkdir()  # no meta.json: not a checkpoint
    (tmp_path / "notes").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000250"
    removed = prune_checkpoints(tmp_path, keep_last=2, protect=(tmp_path / "step_00000007",))
    assert sorted(p.name for p in removed) == ["step_00000003", "step_00000020"]
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_00000007",
        "step_00000100",
        "step_00000250",
    ]
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(tmp_path, keep_last=0)


# A child process saves step 1, then dies (SIGKILL) in the middle of writing step 2.
_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import mlx.core as mx
    import nestedfn.run.checkpoint as ck
    from nestedfn.optim.core import TrainState

    directory, where = Path(sys.argv[1]), sys.argv[2]
    state = lambda v: TrainState({"w": mx.full((64, 64), v)}, (3, {"m": mx.zeros(4)}), int(v))
    ck.save_checkpoint(directory, state(1.0), {"data_index": 1}, 1)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    write_file = ck._write_file

    def half_then_die(d, name, fill):
        # the file `where` names: half of it on disk, then SIGKILL
        if name == {"arrays": ck.ARRAYS, "meta": ck.META}[where]:
            write_file(d, name, fill)
            fd = d.open_fd(name, os.O_RDWR)
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os.close(fd)
            die()
        write_file(d, name, fill)

    if where in ("arrays", "meta"):  # half of the array file / of meta.json on disk
        ck._write_file = half_then_die
    else:  # every file complete, killed just before the rename
        ck.os.replace = lambda *a, **k: die()
    ck.save_checkpoint(directory, state(2.0), {"data_index": 2}, 2)
    print("not killed")
    """
)


@pytest.mark.parametrize("where", ["arrays", "meta", "rename"])
def test_kill_mid_write_leaves_previous_checkpoint(tmp_path, where):
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), where],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr + proc.stdout
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1  # the interrupted write is there, but never read
    like = TrainState({"w": mx.zeros((64, 64))}, (0, {"m": mx.ones(4)}), 0)
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "step_00000001"
    state, extra = load_checkpoint(latest, like)
    assert extra == {"data_index": 1} and state.step == 1
    assert np.array_equal(np.array(state.params["w"]), np.full((64, 64), 1.0, np.float32))
    # the next save cleans the leftover and becomes the latest
    save_checkpoint(tmp_path, like, {"data_index": 3}, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000003"
    assert json.loads((tmp_path / "step_00000003" / "meta.json").read_text())["step"] == 3


def test_checkpoint_dir_is_a_path(tmp_path):
    p = save_checkpoint(str(tmp_path), TrainState({}, (), 0), {}, 12345678)
    assert isinstance(p, Path) and p.name == "step_12345678" and os.path.isdir(p)


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    from nestedfn.run.checkpoint import atomic_write, atomic_write_text

    path = tmp_path / "f.txt"
    atomic_write_text(path, "old\n")

    def half_then_die(p):
        with open(p, "w") as f:
            f.write("ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_die)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary left
    assert atomic_write_text(path, "new\n") == path and path.read_text() == "new\n"


@pytest.mark.parametrize("name", ["arrays.safetensors", "meta.json"])
@pytest.mark.parametrize("mode", ["truncate", "zero-fill", "delete", "flip"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, name, mode):
    """Every way a file can be damaged is told from a good one by the recorded checksums:
    never other values loaded silently (a flipped bit in the arrays used to load)."""
    from nestedfn.run.checkpoint import verify_checkpoint

    path = save_checkpoint(tmp_path, sample_state(), {"k": 1.5}, 3)
    verify_checkpoint(path)  # intact
    f = path / name
    data = f.read_bytes()
    if mode == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif mode == "zero-fill":
        f.write_bytes(bytes(len(data)))
    elif mode == "delete":
        f.unlink()
    else:
        for i in (len(data) - 1, len(data) // 2):  # two positions, either must be caught
            b = bytearray(data)
            b[i] ^= 0x04
            f.write_bytes(bytes(b))
            with pytest.raises(CheckpointError, match=name):
                load_checkpoint(path, sample_state())
        return
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(path, sample_state())


def test_a_float64_leaf_is_a_checkpoint_error_naming_its_path(tmp_path):
    b = mx.zeros(2, dtype=mx.float64, stream=mx.cpu)  # float64 exists on the CPU only
    state = TrainState({"w": mx.zeros(2), "layers": [{"b": b}]}, (), 0)
    with pytest.raises(CheckpointError, match="leaf 'params.layers.0.b' is a float64"):
        save_checkpoint(tmp_path, state, {}, 1)
    assert list(tmp_path.iterdir()) == []
