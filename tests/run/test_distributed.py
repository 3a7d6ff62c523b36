"""Tests for nestedfn.distributed: no-ops on one process, exact collectives on two.

The two-process tests start real processes with ``mlx.launch -n 2`` (ring backend over
loopback) and compare what each rank computed with a numpy reference computed here.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import nestedfn.run.distributed as dist

LAUNCH_TIMEOUT = 120  # seconds; a hung ring (e.g. a peer that died) must not hang the suite


# ---------------------------------------------------------------------------------------------
# Launch helpers (also used by the end-to-end training test)


def _launcher() -> list[str]:
    """The ``mlx.launch`` next to this interpreter, else the one on PATH, else its module.
    Where CUDA is available ``mlx.launch`` picks its NCCL backend and gives rank ``r`` the GPU
    ``CUDA_VISIBLE_DEVICES=r``: two ranks need two GPUs (a one-GPU machine skips, naming it)."""
    if mx.cuda.is_available() and mx.device_count(mx.gpu) < 2:
        pytest.skip(
            "mlx.launch uses NCCL where CUDA is available, one GPU per rank: 2 ranks need 2 "
            f"GPUs, this machine has {mx.device_count(mx.gpu)}"
        )
    here = Path(sys.executable).with_name("mlx.launch")
    if here.exists():
        return [str(here)]
    found = shutil.which("mlx.launch")
    if found:
        return [found]
    try:
        import mlx._distributed_utils.launch  # noqa: F401
    except ImportError:
        pytest.skip("mlx.launch is not available in this MLX install")
    code = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"
    return [sys.executable, "-c", code]


def _free_ports(n: int) -> int:
    """A port p such that p .. p+n-1 are free on loopback now (the ring listens on them)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for k in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")


# Each launched rank's stdout and stderr go to files of its own (RANK_LOG, set up by a
# ``sitecustomize`` on the ranks' PYTHONPATH, so the command line is the one a user types):
# a failure then shows what each rank did.  ``rankR.pid`` names the process, ``rankR.status``
# holds the status it exits with (what ``sys.exit`` was given: none when it died otherwise),
# ``rankR.exit`` the time its interpreter reached exit.  SIGUSR1 makes a rank dump every
# thread's stack into its stderr file (sent before a hung launch is killed).
#
# The ranks are waited for themselves, not through ``mlx.launch``: a Ctrl-C that reaches the
# launcher inside ``Thread.is_alive`` marks that rank's reader thread finished while the rank
# still runs (CPython 3.11's ``_wait_for_tstate_lock``, bpo-45274 / python/cpython#31290), so
# the launcher can return -- and miss reporting that rank's exit -- before the rank is done.
RANK_LOG = """
import atexit, faulthandler, os, signal, sys, time
_rank, _dir = os.environ.get("MLX_RANK"), os.environ.get("NESTEDFN_TEST_RANK_LOGS")
if _rank is not None and _dir:
    _base = f"{_dir}/rank{_rank}"
    for _fd, _ext in ((1, "out"), (2, "err")):
        _f = os.open(f"{_base}.{_ext}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(_f, _fd)
        os.close(_f)
    with open(f"{_base}.pid", "w") as _f:
        _f.write(str(os.getpid()))
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _real_exit = sys.exit

    def _exit(code=None):
        status = code if isinstance(code, int) else (0 if code is None else 1)
        with open(f"{_base}.status", "w") as f:
            f.write(str(status))
        _real_exit(code)

    sys.exit = _exit

    def _exiting():
        with open(f"{_base}.exit", "a") as f:
            f.write(f"interpreter exit at {time.time():.3f}\\n")

    atexit.register(_exiting)  # registered first: runs last
"""


class Launch(subprocess.Popen):
    """A started ``mlx.launch``; ``logs`` holds each rank's output (see ``RANK_LOG``)."""

    logs: Path
    n: int


class Launched(subprocess.CompletedProcess):
    """A finished launch: the launcher's output followed by each rank's; ``ranks_err`` the
    ranks' stderr alone; ``status`` each rank's exit status (``None``: it did not exit through
    ``sys.exit``)."""

    status: list[int | None]
    ranks_err: str


def _default_sigint() -> None:
    """SIGINT's default action in the launcher (and so in its ranks): a caller started in the
    background by a shell (``cmd &``) has SIGINT ignored, which every child would inherit --
    Ctrl-C could then not be tested at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args: list[str], logs: Path, n: int = 2, cwd=None) -> Launch:
    """Start ``mlx.launch -n N python ARGS...`` on loopback, in its own process group, each
    rank's stdout/stderr written to ``logs/rankR.out``/``.err`` (``logs`` a new directory)."""
    logs.mkdir(parents=True)
    (logs / "sitecustomize.py").write_text(RANK_LOG)
    cmd = [*_launcher(), "-n", str(n), "-p", str(_free_ports(n)), sys.executable, *args]
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "MLX_HOSTFILE")}
    path = [str(logs), str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["NESTEDFN_TEST_RANK_LOGS"] = str(logs)
    proc = Launch(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )
    proc.logs, proc.n = logs, n
    return proc


def _read(path: Path, missing: str = "") -> str:
    return path.read_text(errors="replace").strip() if path.exists() else missing


def rank_output(logs: Path, n: int = 2) -> tuple[str, str]:
    """(stdout, stderr) of the ranks, in rank order, each rank's under a header line."""
    out, err = [], []
    for r in range(n):
        base = logs / f"rank{r}"
        status = _read(base.with_suffix(".status"), "none")
        exited = _read(base.with_suffix(".exit"), "no interpreter exit")
        for ext, into in (("out", out), ("err", err)):
            text = _read(base.with_suffix("." + ext), "(no file)")
            into.append(f"--- rank {r} {ext} (status {status}, {exited}) ---\n{text}\n")
    return "".join(out), "".join(err)


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ranks_running(proc: Launch) -> list[int]:
    pids = [_read(proc.logs / f"rank{r}.pid") for r in range(proc.n)]
    return [r for r, pid in enumerate(pids) if pid and _running(int(pid))]


def finish(
    proc: Launch, timeout: float = LAUNCH_TIMEOUT, launcher_may_hang: bool = False
) -> Launched:
    """Wait for a ``start``-ed launch and for each of its ranks (see ``RANK_LOG``); on timeout
    dump the ranks' stacks (SIGUSR1), kill the whole process group and fail, showing each
    rank's output.  ``launcher_may_hang``: a launcher still running after every rank exited
    with a status is killed and the ranks' results stand -- after a Ctrl-C, ``mlx.launch``
    itself can hang for good when the KeyboardInterrupt lands inside its stdin forwarding's
    ``Queue.put`` (seen: in ``threading.Lock.__enter__``), which is MLX's, not nestedfn's."""
    import time

    deadline = time.monotonic() + timeout
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_hung(proc)
        out, err = proc.communicate()
        statuses = [_status(proc.logs / f"rank{r}.status") for r in range(proc.n)]
        if not (launcher_may_hang and None not in statuses):
            _fail(proc, f"mlx.launch timed out after {timeout}s", out, err)
    while _ranks_running(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _ranks_running(proc):
        hung = _ranks_running(proc)
        kill_hung(proc)
        _fail(proc, f"rank(s) {hung} still running {timeout}s after the launch began", out, err)
    rout, rerr = rank_output(proc.logs, proc.n)
    done = Launched(proc.args, proc.returncode, out + rout, err + rerr)
    done.status = [_status(proc.logs / f"rank{r}.status") for r in range(proc.n)]
    done.ranks_err = rerr
    return done


def _status(path: Path) -> int | None:
    return int(path.read_text()) if path.exists() else None


def _fail(proc: Launch, why: str, out: str, err: str) -> None:
    rout, rerr = rank_output(proc.logs, proc.n)
    pytest.fail(f"{why}\nlauncher stdout:\n{out}\nlauncher stderr:\n{err}\n{rout}{rerr}")


def kill_hung(proc: Launch) -> None:
    """Each rank's stacks into its stderr file (SIGUSR1 to the ranks), then SIGKILL to all
    (the ranks stay in the launcher's process group when it has gone)."""
    import time

    for r in _ranks_running(proc):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(_read(proc.logs / f"rank{r}.pid")), signal.SIGUSR1)
    time.sleep(1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def launch(args: list[str], logs: Path, n: int = 2, timeout: float = LAUNCH_TIMEOUT, cwd=None):
    """Run ``mlx.launch -n N python ARGS...`` on loopback; return the CompletedProcess.

    ``mlx.launch`` exits 0 even when a rank fails, so callers must check what the ranks
    wrote.  The launcher and its ranks run in their own process group, killed on timeout.
    """
    return finish(start(args, logs, n, cwd), timeout)


# ---------------------------------------------------------------------------------------------
# One process: everything is a no-op returning its input


def _grads():
    return {
        "layers": [{"w": mx.ones((3, 2))}, {}, {"w": mx.zeros((4,), dtype=mx.bfloat16)}],
        "head": (mx.array(2.0), None),
    }


def test_single_process_world():
    assert dist.world() is None
    assert dist.world_size() == 1
    assert dist.rank() == 0
    assert dist.is_main()
    assert not dist.is_launched()


def test_single_process_collectives_return_input_unchanged():
    g = _grads()
    before = [id(x) for x in (g["layers"][0]["w"], g["layers"][2]["w"], g["head"][0])]
    for out in (
        dist.average_gradients(g),
        dist.average_gradients(g, weight=7),
        dist.average_gradients(g, fused=False),
        dist.all_sum(g),
        dist.broadcast_params(g),
    ):
        assert out is g
    after = [id(x) for x in (g["layers"][0]["w"], g["layers"][2]["w"], g["head"][0])]
    assert before == after
    assert dist.check_identical(g) is None
    assert dist.barrier() is None


def test_average_gradients_rejects_non_float_leaf_on_one_process():
    with pytest.raises(TypeError, match=r"'layers\.1\.b'.*int32"):
        dist.average_gradients({"layers": [{"a": mx.ones(2)}, {"b": mx.ones(2, mx.int32)}]})
    with pytest.raises(TypeError, match=r"'x'.*float, not an mx.array"):
        dist.average_gradients({"x": 1.5})


def test_launch_detection_from_environment(monkeypatch, tmp_path):
    for var in ("MLX_RANK", "MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_launched()

    # mlx.launch -n 1 exports an empty hostfile, on which mx.distributed.init crashes.
    hostfile = tmp_path / "hosts"
    hostfile.write_text("\n")
    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    assert not dist.is_launched()

    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"]]))
    assert dist.is_launched()

    hostfile.write_text("[not json")
    with pytest.raises(RuntimeError, match="not valid JSON"):
        dist.is_launched()

    monkeypatch.delenv("MLX_RANK")
    monkeypatch.delenv("MLX_HOSTFILE")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert not dist.is_launched()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert dist.is_launched()


def test_connect_timeout_is_an_option(monkeypatch):
    monkeypatch.setattr(dist, "_CONNECT_TIMEOUT", [dist.DEFAULT_CONNECT_TIMEOUT])
    assert dist.connect_timeout() == 300
    dist.set_connect_timeout(0)
    assert dist.connect_timeout() == 0
    for bad in ("soon", float("nan"), -1, True):
        with pytest.raises(dist.ConnectError, match="connect timeout must be"):
            dist.set_connect_timeout(bad)
    assert dist.connect_timeout() == 0


def test_a_launched_rank_whose_peer_never_starts_stops_after_the_connect_timeout(tmp_path):
    # rank 0 of the ring listens for rank 1, which never starts: without a bound it would wait
    # forever (in MLX's init, which holds the GIL); with one it is stopped, saying why
    import time

    port = _free_ports(2)
    hostfile = tmp_path / "hosts"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    env = dict(os.environ, MLX_RANK="0", MLX_HOSTFILE=str(hostfile))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    code = (
        "import nestedfn.run.distributed as d; d.set_connect_timeout(2); d.world(); "
        "print('trained alone')"
    )
    tic = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert time.monotonic() - tic < 20
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr == (
        "nestedfn: this process (rank 0 of 2) could not connect to its peers within 2 s; "
        "stopping it (are all the processes started? --connect-timeout sets the wait, "
        "0 waits forever)\n"
    )


# ---------------------------------------------------------------------------------------------
# Two launched processes


def make_inputs(r: int) -> dict:
    """Rank r's gradient tree as numpy float32 (the same code runs in the ranks and here)."""
    rng = np.random.default_rng(100 + r)

    def a(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "layers": [{"lora_a": a(5, 3), "lora_b": a(3, 5)}, {}, {"lora_a": a(7), "bias": a()}],
        "half": a(4, 2),  # travels as float16
        "brain": a(6),  # travels as bfloat16
        "empty": a(0, 3),
        "pair": (a(2), None),
    }


WORKER = """
import json, os, sys, time, traceback
import numpy as np
import mlx.core as mx
import nestedfn.run.distributed as dist
from nestedfn.tree import flatten, unflatten, to_flat

CAST = {"half": mx.float16, "brain": mx.bfloat16}

def to_mx(tree):
    return {k: (unflatten(flatten(v)[1], [mx.array(x) for x in flatten(v)[0]])
                if k not in CAST else mx.array(v).astype(CAST[k])) for k, v in tree.items()}

def to_np(tree):
    return {p: np.array(x.astype(mx.float32)) for p, x in to_flat(tree).items()}

out = sys.argv[1]
r, n = dist.rank(), dist.world_size()
res = {"rank": r, "size": n, "main": dist.is_main(), "launched": dist.is_launched()}
arrays = {}
try:
    flag = out + "/written_by_rank1_before_barrier"
    if r == 1:
        time.sleep(0.5)
        open(flag, "w").close()
    dist.barrier()
    res["flag_seen_after_barrier"] = os.path.exists(flag)
    g = to_mx(make_inputs(r))
    avg = dist.average_gradients(g)
    res["dtypes"] = {p: str(x.dtype) for p, x in to_flat(avg).items()}
    res["same_structure"] = flatten(avg)[1] == flatten(g)[1]
    per_leaf = dist.average_gradients(g, fused=False)
    res["fused_equals_per_leaf"] = all(
        bool(mx.array_equal(a, b)) for a, b in zip(flatten(avg)[0], flatten(per_leaf)[0]))
    weighted = dist.average_gradients(g, weight=mx.array(r + 1))
    compiled = mx.compile(lambda t: dist.average_gradients(t, weight=r + 1))(g["layers"][0])
    # half precision: a weight beyond float16's range, one bfloat16 would round, a sum that
    # overflows float16 where the mean does not (expected values: in the test below)
    h = {"h": mx.full((3,), 10.0 * (r + 1), dtype=mx.float16)}
    res["half_big_weight"] = [
        dist.average_gradients(h, weight=1e5 * (r + 1))["h"].tolist(),
        dist.average_gradients(h, weight=mx.array(1e5 * (r + 1)), fused=False)["h"].tolist(),
    ]
    b = {"b": mx.array([1.0 - 2.0 * r], dtype=mx.bfloat16), "f": mx.array([1.0 - 2.0 * r])}
    avg_b = dist.average_gradients(b, weight=[513, 511][r])
    res["bf16_weight"] = [avg_b["b"].astype(mx.float32).item(), str(avg_b["b"].dtype),
                          avg_b["f"].item()]
    big = {"h": mx.full((2,), 40000.0, dtype=mx.float16)}
    res["half_sum_mean"] = [dist.average_gradients(big)["h"].tolist(),
                            dist.average_gradients(big, fused=False)["h"].tolist()]
    sums = dist.all_sum({"loss": mx.array(float(r + 1)), "ntok": mx.array(r + 10)})
    res["sums"] = [sums["loss"].item(), sums["ntok"].item(), str(sums["ntok"].dtype)]
    bcast = dist.broadcast_params(g)
    res["bcast_bits_equal_rank0"] = all(
        np.array_equal(np.array(x.reshape(-1).view(mx.uint8)), np.array(y.reshape(-1).view(mx.uint8)))
        for x, y in zip(flatten(bcast)[0], flatten(to_mx(make_inputs(0)))[0]))
    dist.check_identical(bcast)  # must pass
    try:
        dist.check_identical(g)
        res["diverged_paths"] = None
    except dist.DivergenceError as e:
        res["diverged_paths"] = e.paths
    one_off = dict(bcast, half=bcast["half"] + r)
    try:
        dist.check_identical(one_off)
        res["one_off_paths"] = None
    except dist.DivergenceError as e:
        res["one_off_paths"] = e.paths
    try:  # leaves that are not arrays (a step count, a numpy counter) are compared too
        dist.check_identical({"a": mx.zeros(2), "step": 7, "np": np.arange(3)})
        dist.check_identical({"a": mx.zeros(2), "step": 7 + r, "np": np.arange(3) * r})
        res["scalar_paths"] = None
    except dist.DivergenceError as e:
        res["scalar_paths"] = e.paths
    try:
        dist.check_identical({"x": mx.zeros(3 + r)})
        res["structure_error"] = None
    except dist.DivergenceError as e:
        res["structure_error"] = str(e)
    for name, tree in (("avg", avg), ("weighted", weighted), ("compiled", compiled)):
        arrays.update({name + ":" + p: x for p, x in to_np(tree).items()})
    np.savez(f"{out}/rank{r}.npz", **arrays)
except Exception:
    res["error"] = traceback.format_exc()
with open(f"{out}/rank{r}.json", "w") as f:
    json.dump(res, f)
"""


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run WORKER on 2 launched processes once; return (json results, arrays) per rank."""
    out = tmp_path_factory.mktemp("two_ranks")
    script = out / "worker.py"
    script.write_text(
        "import numpy as np\n"
        + textwrap.dedent(inspect.getsource(make_inputs))
        + textwrap.dedent(WORKER)
    )
    proc = launch([str(script), str(out)], out / "logs")
    results, arrays = [], []
    for r in range(2):
        path = out / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote nothing\n{proc.stdout}\n{proc.stderr}"
        res = json.loads(path.read_text())
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
        results.append(res)
        arrays.append(dict(np.load(out / f"rank{r}.npz")))
    return results, arrays


def _flat_np(tree: dict) -> dict[str, np.ndarray]:
    from nestedfn.tree import to_flat

    return {p: x for p, x in to_flat(tree).items()}


def _tol(path: str) -> dict:
    if path.startswith("brain"):
        return {"rtol": 2e-2, "atol": 2e-2}
    if path.startswith("half"):
        return {"rtol": 2e-3, "atol": 2e-3}
    return {"rtol": 1e-6, "atol": 1e-6}


def test_two_ranks_world_and_barrier(two_ranks):
    results, _ = two_ranks
    assert all(r["flag_seen_after_barrier"] for r in results)
    assert [(r["rank"], r["size"], r["main"], r["launched"]) for r in results] == [
        (0, 2, True, True),
        (1, 2, False, True),
    ]


def test_two_ranks_average_equals_numpy_mean(two_ranks):
    results, arrays = two_ranks
    g0, g1 = _flat_np(make_inputs(0)), _flat_np(make_inputs(1))
    for r in range(2):
        assert results[r]["same_structure"]
        assert results[r]["fused_equals_per_leaf"]
        assert results[r]["dtypes"]["half"] == "mlx.core.float16"
        assert results[r]["dtypes"]["brain"] == "mlx.core.bfloat16"
        for p in g0:
            mean = (g0[p] + g1[p]) / 2
            np.testing.assert_allclose(arrays[r]["avg:" + p], mean, **_tol(p), err_msg=p)
            weighted = (1 * g0[p] + 2 * g1[p]) / 3
            np.testing.assert_allclose(arrays[r]["weighted:" + p], weighted, **_tol(p), err_msg=p)
        for p in ("lora_a", "lora_b"):
            ref = (1 * g0["layers.0." + p] + 2 * g1["layers.0." + p]) / 3
            np.testing.assert_allclose(arrays[r]["compiled:" + p], ref, rtol=1e-6, atol=1e-6)
    for key in arrays[0]:  # every rank ends with bit-identical averages
        np.testing.assert_array_equal(arrays[0][key], arrays[1][key], err_msg=key)


def test_two_ranks_weighted_half_precision_neither_overflows_nor_rounds_the_weight(two_ranks):
    results, _ = two_ranks
    # float16 grads 10 and 20 with weights 1e5 and 2e5 (float16 tops out at 65504)
    want = float(np.float16((1e5 * 10 + 2e5 * 20) / 3e5))
    # bfloat16 grads 1 and -1 with weights 513 and 511 (bfloat16 rounds both to 512: 0)
    exact = (513 * 1.0 + 511 * -1.0) / (513 + 511)
    for res in results:
        for got in res["half_big_weight"]:
            np.testing.assert_allclose(got, [want] * 3, rtol=1e-3)
        assert res["bf16_weight"] == [exact, "mlx.core.bfloat16", exact]
        assert res["half_sum_mean"] == [[40000.0, 40000.0]] * 2  # 80000 is inf in float16


def test_two_ranks_all_sum_broadcast_and_divergence_check(two_ranks):
    results, _ = two_ranks
    nonempty = [p for p, x in _flat_np(make_inputs(0)).items() if x.size]
    for res in results:
        assert res["sums"] == [3.0, 21, "mlx.core.int32"]
        assert res["bcast_bits_equal_rank0"]
        assert sorted(res["diverged_paths"]) == sorted(nonempty)
        assert res["one_off_paths"] == ["half"]
        assert res["scalar_paths"] == ["step", "np"]
        assert "structure, shapes or dtypes differ" in res["structure_error"]


# ---------------------------------------------------------------------------------------------
# End to end: `mlx.launch -n 2 python -m nestedfn.cli train` against one process

TRAIN_FLAGS = [
    "--batch-size", "4", "--max-seq-len", "64", "--steps", "4", "--optimizer", "nested_adam",
    "--frequencies", "1", "2", "4", "--learning-rate", "2e-3", "--eval-every", "2",
    "--eval-batches", "2", "--save-every", "2", "--seed", "3",
]  # fmt: skip

# `python -c` that gives each rank its own --out (RUN/rank0, RUN/rank1): whatever rank 1
# writes would land in its own directory.
PER_RANK_OUT = (
    "import os, sys; from nestedfn.cli import main; a = sys.argv[1:]; "
    "a[a.index('--out') + 1] += '/rank' + os.environ.get('MLX_RANK', '0'); sys.exit(main(a))"
)


# `python -c` whose rank 1 starts 1 s late: a guard on ordering.  Rank 0 must not write into
# the shared run directory before rank 1 has checked it (rank 1 would find "another run"
# there); the trainer's barrier (and today also the ring's start-up rendezvous) ensures it.
RANK1_LATE = (
    "import os, sys, time; from nestedfn.cli import main; "
    "os.environ.get('MLX_RANK') == '1' and time.sleep(1); sys.exit(main(sys.argv[1:]))"
)


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory):
    from nestedfn.lm.demo import build_demo_model, write_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    model = build_demo_model(root / "model", seed=0)
    data = write_demo_dataset(root / "data", seed=0, n_train=64, n_valid=8)
    return ["--model", str(model), "--data", str(data)]


def _cli(args: list[str], timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """``python -m nestedfn.cli ARGS`` in one process."""
    proc = subprocess.run(
        [sys.executable, "-m", "nestedfn.cli", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"nestedfn {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _launched_ok(proc: Launched) -> None:
    # mlx.launch exits 0 even when a rank fails: each rank's own status says it
    assert set(proc.status) == {0} and "exited with code" not in proc.stderr, (
        f"a rank failed:\n{proc.stdout}\n{proc.stderr}"
    )
    assert "Traceback" not in proc.stderr, f"a rank failed:\n{proc.stdout}\n{proc.stderr}"


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_run(got: Path, want: Path) -> None:
    """Same files, metrics with the same records once each, adapters within float tolerance."""
    assert _files(got) == _files(want)
    rec_got, rec_want = _records(got), _records(want)
    assert [(r["type"], r["step"]) for r in rec_got] == [(r["type"], r["step"]) for r in rec_want]
    for a, b in zip(rec_got, rec_want):
        key = "loss" if a["type"] == "train" else "valid_loss"
        assert a[key] == pytest.approx(b[key], rel=1e-4), (a, b)
        if a["type"] == "train":
            assert a["tokens"] == b["tokens"]  # the ranks' shards add up to the global batch
            assert a["tier_updates"] == b["tier_updates"]
    for name in ("adapters.safetensors", "best/adapters.safetensors"):
        x, y = mx.load(str(got / name)), mx.load(str(want / name))
        assert set(x) == set(y)
        for k in y:
            np.testing.assert_allclose(np.array(x[k]), np.array(y[k]), rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def single_run(demo_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    _cli(["train", *demo_assets, *TRAIN_FLAGS, "--out", str(out)])
    return out


def test_two_processes_train_like_one_and_only_rank0_writes(demo_assets, single_run, tmp_path):
    args = ["-c", PER_RANK_OUT, "train", *demo_assets, *TRAIN_FLAGS, "--out", str(tmp_path)]
    proc = launch(args, tmp_path / "logs")
    _launched_ok(proc)
    assert not (tmp_path / "rank1").exists(), _files(tmp_path / "rank1")  # rank 1: no files
    _same_run(tmp_path / "rank0", single_run)
    assert proc.stdout.count("wrote the run to") == 1
    # the summary too is printed once, by rank 0
    assert proc.stdout.count("train loss") == 1 and proc.stdout.count("tokens/s over") == 1


def test_two_processes_resume_matches_one_process(demo_assets, single_run, tmp_path):
    run = tmp_path / "run"
    first = ["-c", RANK1_LATE, "train", *demo_assets, *TRAIN_FLAGS, "--out", str(run)]
    _launched_ok(launch([*first, "--stop-at", "2"], tmp_path / "logs1"))
    assert [r["step"] for r in _records(run) if r["type"] == "train"] == [1, 2]
    _launched_ok(launch(["-m", "nestedfn.cli", "train", "--resume", str(run)], tmp_path / "logs2"))
    _same_run(run, single_run)


def test_ctrl_c_on_two_processes_saves_the_last_step_and_resume_matches_one_process(
    demo_assets, tmp_path
):
    # SIGINT to the launcher's process group is what Ctrl-C in its terminal does: every rank
    # gets it wherever it is (computing, or waiting in a collective for the other).  No rank
    # may hang; rank 0 checkpoints the last step it completed, which resumes like one process.
    import time

    run, one = tmp_path / "run", tmp_path / "one"
    flags = [*demo_assets, "--batch-size", "4", "--max-seq-len", "64", "--seed", "3"]
    flags += ["--frequencies", "1", "2", "--eval-every", "0", "--save-every", "1000"]
    args = ["-m", "nestedfn.cli", "train", *flags, "--steps", "1000", "--out", str(run)]
    proc = start(args, tmp_path / "logs1")
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not ((run / "metrics.jsonl").is_file() and len(_records(run)) >= 3):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_hung(proc)
            _fail(proc, "no 3 steps done", *proc.communicate())
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    got = finish(proc, timeout=60, launcher_may_hang=True)
    assert got.status == [130, 130], got.stderr  # each rank's own exit status
    # what mlx.launch reports of them (it may miss a rank: see RANK_LOG) says the same
    reported = re.findall(r"Node with rank (\d) (exited with code -?\d+|was killed)", got.stderr)
    assert all(what == "exited with code 130" for _, what in reported), got.stderr
    assert "Traceback" not in got.ranks_err, got.stderr  # (the launcher's own: MLX's)
    done = len(_records(run))
    assert (run / "checkpoints").is_dir(), got.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step_{done:08d}"]
    _launched_ok(
        launch(
            ["-m", "nestedfn.cli", "train", "--resume", str(run), "--steps", str(done + 2)],
            tmp_path / "logs2",
        )
    )
    _cli(["train", *flags, "--steps", str(done + 2), "--out", str(one)])
    assert [r["step"] for r in _records(run)] == [r["step"] for r in _records(one)]
    for a, b in zip(_records(run), _records(one)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["tokens"] == b["tokens"]
    x, y = mx.load(str(run / "adapters.safetensors")), mx.load(str(one / "adapters.safetensors"))
    assert set(x) == set(y)
    for k in y:
        np.testing.assert_allclose(np.array(x[k]), np.array(y[k]), rtol=1e-4, atol=2e-5)


# `python -c` that gives each rank its own --seed (0, 1): different initial LoRA parameters.
PER_RANK_SEED = (
    "import os, sys; from nestedfn.cli import main; "
    "sys.exit(main(sys.argv[1:] + ['--seed', os.environ.get('MLX_RANK', '0')]))"
)


def test_two_processes_starting_from_different_parameters_stop_before_writing(
    demo_assets, tmp_path
):
    run = tmp_path / "run"
    flags = [f for f in TRAIN_FLAGS if f not in ("--seed", "3")]
    args = ["-c", PER_RANK_SEED, "train", *demo_assets, *flags, "--out", str(run)]
    proc = launch(args, tmp_path / "logs")
    assert "Traceback" not in proc.stderr, proc.stderr
    # (mlx.launch terminates the other rank once one has exited: it may die of SIGTERM, None)
    assert 2 in proc.status and set(proc.status) <= {2, None}, proc.stderr
    assert "exited with code 2" in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("nestedfn train: error:")]
    assert errors and all(
        "the training state at the start" in ln and "differ across the 2 ranks: params." in ln
        for ln in errors
    ), proc.stderr
    assert not run.exists()  # rank 0 wrote nothing


def test_two_processes_resuming_different_optimizer_states_stop_before_writing(
    demo_assets, single_run, tmp_path
):
    # --resume across machines: each rank reads its own copy of the run, and rank 1's copy
    # holds other optimizer moments (same parameters, same step)
    for r in (0, 1):
        shutil.copytree(single_run, tmp_path / f"rank{r}")
        shutil.rmtree(tmp_path / f"rank{r}" / "checkpoints" / "step_00000004")
    ckpt = tmp_path / "rank1" / "checkpoints" / "step_00000002" / "arrays.safetensors"
    arrays = mx.load(str(ckpt))
    n_params = len(mx.load(str(single_run / "adapters.safetensors")))
    first_moment = str(n_params)  # leaves are stored in order: params, then opt_state
    arrays[first_moment] = arrays[first_moment] + 1.0
    mx.save_safetensors(str(ckpt), arrays)
    _reseal(ckpt.parent)  # a valid checkpoint of another state, not a damaged one
    before = {r: {p: (tmp_path / f"rank{r}" / p).read_bytes() for p in _files(tmp_path / f"rank{r}")}
              for r in (0, 1)}  # fmt: skip
    proc = launch(
        ["-c", PER_RANK_OUT, "train", "--resume", "--out", str(tmp_path)], tmp_path / "logs"
    )
    assert "Traceback" not in proc.stderr and "exited with code 2" in proc.stderr, proc.stderr
    assert 2 in proc.status and set(proc.status) <= {2, None}, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("nestedfn train: error:")]
    assert errors and all(
        "differ across the 2 ranks: opt_state." in ln and "params." not in ln for ln in errors
    ), proc.stderr
    for r in (0, 1):
        after = {p: (tmp_path / f"rank{r}" / p).read_bytes() for p in _files(tmp_path / f"rank{r}")}
        assert after == before[r]


def _reseal(ckpt_dir):
    """Record the checksums of a checkpoint whose arrays were rewritten on purpose."""
    import json

    from nestedfn.run.checkpoint import ARRAYS, META, _meta_digest, file_sha256

    meta = json.loads((ckpt_dir / META).read_text())
    f = ckpt_dir / ARRAYS
    meta["files"][ARRAYS] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    meta["digest"] = _meta_digest(meta)
    (ckpt_dir / META).write_text(json.dumps(meta))
