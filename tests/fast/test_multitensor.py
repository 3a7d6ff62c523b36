"""The GPU multi-tensor step: its generated sources, its plumbing (leaf groups, tiers, chunk sums,
the tree layout) through a pure-MLX stand-in for the kernel, and its fallback.

The CUDA kernels themselves run only on an NVIDIA GPU (benchmarks/gpu/run_all.sh); here the
``"emulate"`` backend computes each launch with MLX operations in the kernel's order, so the
grouping, the scalars and the state layout are checked against eager ``apply_gradients``."""

from __future__ import annotations

import re
import warnings

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nestedfn.fast import multitensor as mt
from nestedfn.fast.compile import CompiledStep, compile_step
from nestedfn.optim.core import TrainState, apply_gradients, init
from nestedfn.optim.optimizers import adam, adamw, lion, momentum, muon
from nestedfn.tiered.cms import nested, nested_adam, tier_stats
from nestedfn.tree import flatten

OPTIMIZERS = {
    "adam": lambda: adam(1e-2),
    "adam_nobc": lambda: adam(1e-2, bias_correction=False),
    "adamw": lambda: adamw(1e-2, weight_decay=0.1),
    "lion": lambda: lion(1e-3, weight_decay=0.05),
    "lion_nowd": lambda: lion(1e-3),
    "momentum": lambda: momentum(1e-2, 0.9),
    "nesterov": lambda: momentum(1e-2, 0.9, nesterov=True),
    "adam_schedule": lambda: adam(lambda s: 1e-2 / (1 + s)),
    "adam_array_schedule": lambda: adam(lambda s: mx.array(1e-2, dtype=mx.float32) * 0.5),
    "nested_adam": lambda: nested_adam(1e-2, (1, 2, 4), tiers="depth"),
    "nested_adam_sum": lambda: nested_adam(1e-2, (1, 3), tiers="depth", reduce="sum"),
    "nested_adam_schedule": lambda: nested_adam(lambda s: 1e-2 / (1 + s), (1, 2)),
    "nested_lion": lambda: nested(lion(1e-3), "depth", (1, 2)),
}


def _params(n_layers: int = 4, seed: int = 0) -> dict:
    mx.random.seed(seed)
    return {
        "layers": [
            {
                "a": mx.random.normal((7, 3)),
                "b": mx.random.normal((300,)),
                "c": {"w": mx.random.normal((5,))},
            }
            for _ in range(n_layers)
        ],
        "head": mx.random.normal((2, 2)),
    }


def _grads(params: dict, seed: int) -> dict:
    mx.random.seed(seed)
    leaves, td = flatten(params)
    from nestedfn.tree import unflatten

    return unflatten(td, [mx.random.normal(x.shape) for x in leaves])


def _near(x: mx.array, y: mx.array) -> bool:
    """Equal to float32 rounding: the largest difference within 1e-5 of the largest value
    (the compiled graph reads the step as a float32 array; eager as a Python int)."""
    return mx.max(mx.abs(x - y)).item() <= 1e-5 * mx.max(mx.abs(y)).item()


def _leaves(state: TrainState) -> list:
    return flatten({"p": state.params, "s": state.opt_state})[0]


def _run(opt, steps: int, group: int, backend: str = "emulate"):
    step = mt.MultiTensorStep(opt, backend_name=backend, group=group)
    params = _params()
    a = b = init(opt, params)
    for i in range(steps):
        g = _grads(params, 100 + i)
        a = step(a, g)
        b = apply_gradients(opt, b, g)
    return step, a, b


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("group", [1, 5, 64])
def test_emulated_step_equals_apply_gradients(name: str, group: int) -> None:
    """Over 8 steps (every phase of the tiers), the multi-tensor plumbing gives the eager
    result bit for bit (the stand-in rounds as the kernel does) in the tree layout, the new
    leaves views of the launches' flat outputs."""
    opt = OPTIMIZERS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step, a, b = _run(opt, 8, group)
    assert not step.off and step.multitensor_steps >= 1
    la, lb = _leaves(a), _leaves(b)
    assert flatten(a.opt_state)[1] == flatten(b.opt_state)[1]
    assert a.step == b.step == 8
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert mx.array_equal(x, y).item()
    assert all(same for _, _, same in step.checks)


GPU = mt.backend()


@pytest.mark.skipif(GPU is None, reason="needs a GPU (MLX's CUDA or Metal backend)")
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_gpu_kernels_equal_apply_gradients(name: str) -> None:
    """On the GPU, the generated kernels over 8 steps: the eager result to float32 rounding
    (bit for bit where MLX's own kernels round each operation once), the tree layout, and no
    fallback (the self-check passed)."""
    opt = OPTIMIZERS[name]()
    with mx.stream(mx.gpu):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            step, a, b = _run(opt, 8, 5, backend=GPU)
        assert not step.off and step.multitensor_steps >= 1
        assert flatten(a.opt_state)[1] == flatten(b.opt_state)[1]
        for x, y in zip(_leaves(a), _leaves(b)):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert _near(x, y)
    print(name, "bit-identical:", all(same for _, _, same in step.checks), step.checks)


def test_nested_inactive_tier_keeps_its_arrays_and_tier_stats() -> None:
    opt = nested_adam(1e-2, (1, 2), tiers="depth")
    step = mt.MultiTensorStep(opt, backend_name="emulate")
    params = _params()
    s0 = init(opt, params)
    s1 = step(s0, _grads(params, 1))  # step 0: tier 1 (frequency 2) inactive
    p0, p1 = flatten(s0.params)[0], flatten(s1.params)[0]
    kept = sum(x is y for x, y in zip(p0, p1))
    assert kept == [r.arrays for r in tier_stats(s1.opt_state)][1]
    assert [r.updates for r in tier_stats(s1.opt_state)] == [1, 0]


def test_a_replaced_leaf_is_checked_again() -> None:
    """The step trusts only the very arrays it made: a moment swapped for a bfloat16 array
    after a served step sends the call to the MLX graph (no kernel reads it as float32)."""
    opt = adam(1e-2)
    step = mt.MultiTensorStep(opt, backend_name="emulate")
    params = _params()
    s1 = step(init(opt, params), _grads(params, 1))
    served = step.multitensor_steps
    mu = s1.opt_state[0].mu
    mu["head"] = mu["head"].astype(mx.bfloat16)
    calls = []
    step._launch = lambda *a: calls.append(a)  # must not be reached
    step(s1, _grads(params, 2))
    assert not calls and step.multitensor_steps == served and not step.off


def test_self_check_mismatch_warns_once_and_returns_eager(monkeypatch) -> None:
    """A kernel that computes something else: one warning, the eager result, the graph after."""

    right = mt.emulate

    def wrong(sig, inputs):
        return [x * 0 for x in right(sig, inputs)]

    monkeypatch.setattr(mt, "emulate", wrong)
    opt = adam(1e-2)
    step = mt.MultiTensorStep(opt, backend_name="emulate")
    mt._WARNED.clear()
    params = _params()
    a = b = init(opt, params)
    with pytest.warns(RuntimeWarning, match="differs from apply_gradients") as rec:
        for i in range(3):
            g = _grads(params, i)
            a = step(a, g)
            b = apply_gradients(opt, b, g)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert step.off and step.multitensor_steps == 0
    for x, y in zip(_leaves(a), _leaves(b)):  # the graph: equal to float32 rounding
        assert _near(x, y)


def test_the_stand_in_runs_the_kernels_statements(monkeypatch) -> None:
    """``emulate`` executes the generated per-element statements themselves: a wrong
    coefficient in them (1 - b2 for 1 - b1) is caught by the self-check on the CPU."""
    right = mt._element_body
    monkeypatch.setattr(
        mt, "_element_body", lambda sig: [x.replace("OMB1", "OMB2") for x in right(sig)]
    )
    opt = adam(1e-2)
    step = mt.MultiTensorStep(opt, backend_name="emulate")
    mt._WARNED.clear()
    params = _params()
    with pytest.warns(RuntimeWarning, match="differs from apply_gradients"):
        step(init(opt, params), _grads(params, 1))
    assert step.off and step.multitensor_steps == 0


def test_kernel_factory_error_falls_back_with_one_warning(monkeypatch) -> None:
    """A kernel that does not compile (the factory raises): one warning, the graph's result."""

    def broken(sig, backend):
        raise RuntimeError("nvrtc: error: expected a ';'")

    monkeypatch.setattr(mt, "make_kernel", broken)
    opt = lion(1e-3)
    step = mt.MultiTensorStep(opt, backend_name="cuda")
    step._device_ok = lambda: True  # as on a GPU
    mt._WARNED.clear()
    params = _params()
    a = b = init(opt, params)
    with pytest.warns(RuntimeWarning, match="kernel failed") as rec:
        for i in range(2):
            g = _grads(params, i)
            a = step(a, g)
            b = apply_gradients(opt, b, g)
    assert len(rec) == 1 and step.off
    for x, y in zip(_leaves(a), _leaves(b)):
        assert _near(x, y)


def test_unsupported_calls_take_the_graph() -> None:
    """Other dtypes, and an optimizer without a spec, run the MLX graph (no warning)."""
    assert not mt.supports(muon(1e-2))
    assert not mt.supports(adamw(1e-2, mask=lambda p: {k: True for k in p}))
    opt = adam(1e-2)
    step = mt.MultiTensorStep(opt, backend_name="emulate")
    params = {"w": mx.ones((3,), dtype=mx.bfloat16)}
    s = init(opt, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = step(s, {"w": mx.ones((3,), dtype=mx.bfloat16)})
    assert step.multitensor_steps == 0 and not step.off
    ref = apply_gradients(opt, s, {"w": mx.ones((3,), dtype=mx.bfloat16)})
    assert mx.allclose(out.params["w"], ref.params["w"]).item()


def test_cpu_default_keeps_the_cpu_step() -> None:
    """On the CPU, compile_step is untouched by the GPU hunk."""
    with mx.stream(mx.cpu):
        if mx.default_device() == mx.cpu:
            step = compile_step(adam(1e-2))
            assert type(step) is CompiledStep


def test_turned_off_by_the_native_kill_switch(monkeypatch) -> None:
    """``NESTEDFN_NATIVE=0`` turns off the multi-tensor step as it turns off the native one."""
    assert mt.supports(adam(1e-2))
    monkeypatch.setenv("NESTEDFN_NATIVE", "0")
    assert not mt.supports(adam(1e-2))
    step = mt.MultiTensorStep(adam(1e-2), backend_name="emulate")
    params = _params()
    step(init(adam(1e-2), params), _grads(params, 1))
    assert step.off and step.multitensor_steps == 0


SIGS = st.builds(
    mt.KernelSig,
    algo=st.sampled_from([mt.ADAM, mt.LION, mt.MOMENTUM, mt.ACCUMULATE]),
    k=st.integers(1, 40),
    bias_correction=st.booleans(),
    nesterov=st.booleans(),
    has_wd=st.booleans(),
    post=st.booleans(),
    acc=st.booleans(),
    mean=st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(SIGS)
def test_generated_sources(sig: mt.KernelSig) -> None:
    """Deterministic; every pseudo-op expanded; every argument the body names is a kernel
    argument; CUDA rounds each operation explicitly; one switch case per leaf; both backends
    come from the same element statements."""
    for backend in ("cuda", "metal"):
        header, src = mt.kernel_source(sig, backend)
        assert (header, src) == mt.kernel_source(sig, backend)
        text = header + src
        assert re.search(r"(?<![A-Za-z0-9_])(MUL|ADD|DIV|SQRT)\(", text) is None
        assert text.count("(") == text.count(")") and text.count("{") == text.count("}")
        assert src.count("case ") == sig.k
        assert src.count("+ off") == sig.k * len(sig.output_names())
        names = set(sig.input_names()) | set(sig.output_names())
        for call in re.findall(r"nf_leaf\(([^)]*)\)", src):
            for arg in call.split(", ")[:-4]:
                assert arg.removesuffix(" + off") in names
        if backend == "cuda":
            body = header.split("{", 1)[1]
            # no bare float arithmetic that the compiler could contract into an FMA
            assert re.search(r"[A-Za-z0-9_\]\)] [*/] [A-Za-z0-9_(]", body) is None
    assert mt.kernel_name(sig, "cuda") != mt.kernel_name(sig, "metal")
    assert mt.kernel_name(sig, "cuda") != mt.kernel_name(sig._replace(k=sig.k + 1), "cuda")


def test_generated_cuda_compiles_as_cpp(tmp_path) -> None:
    """The CUDA source, wrapped as MLX wraps it, is valid C++ for a host compiler once the CUDA
    intrinsics are stubbed (the kernel's syntax and names, checked without a GPU)."""
    import shutil
    import subprocess

    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    stub = (
        "#include <cstddef>\n#include <cstdint>\n#include <cmath>\n"
        "#define __device__\n#define __forceinline__ inline\n#define __restrict__\n"
        "#define __global__\nstruct D { unsigned x; }; static D blockIdx, threadIdx;\n"
        "static float __fmul_rn(float a, float b) { return a * b; }\n"
        "static float __fadd_rn(float a, float b) { return a + b; }\n"
        "static float __fdiv_rn(float a, float b) { return a / b; }\n"
        "static float __fsqrt_rn(float a) { return std::sqrt(a); }\n"
    )
    for sig in (
        mt.KernelSig(mt.ADAM, 3, has_wd=True, post=True, acc=True, mean=True),
        mt.KernelSig(mt.LION, 2, has_wd=True),
        mt.KernelSig(mt.MOMENTUM, 4, nesterov=True),
        mt.KernelSig(mt.ACCUMULATE, 2),
    ):
        header, src = mt.kernel_source(sig, "cuda")
        types = {n: "const float*" for n in sig.input_names()}
        types["meta"] = "const int32_t*"
        args = [f"{types[n]} {n}" for n in sig.input_names()]
        args += [f"float* {n}" for n in sig.output_names()]
        code = stub + header + f"__global__ void k({', '.join(args)}) {{\n{src}\n}}\n"
        path = tmp_path / "k.cpp"
        path.write_text(code)
        proc = subprocess.run(
            [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", str(path)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
