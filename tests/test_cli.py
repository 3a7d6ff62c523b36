"""The ``nestedfn`` command end to end: demo, plot, inspect, and every user error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nestedfn.cli import DEMO_CONTINUATION, DEMO_PROMPT, main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from nestedfn.lm.demo import build_demo_model, write_demo_dataset

    root = tmp_path_factory.mktemp("cli")
    return build_demo_model(root / "model"), write_demo_dataset(
        root / "data", n_train=32, n_valid=8
    )


def test_the_suggested_generation_continues_a_sentence_of_the_demo_dataset(tmp_path):
    # after `nestedfn demo` (150 steps) that command prints exactly DEMO_CONTINUATION (greedy,
    # checked by hand: every byte wins by >= 2 nats; the base model prints "zzzz..."); here:
    # the prompt and continuation are the start of real dataset sentences
    import re

    from nestedfn.lm import demo

    def one_of(words):
        return "(" + "|".join(map(re.escape, words)) + ")"

    template = (
        rf"{one_of(demo._NAMES)} sees {one_of(demo._NUMBERS)} {one_of(demo._ANIMALS)}s in the "
        rf"{one_of(demo._PLACES)}\. One more comes, now there are"
    )
    assert re.fullmatch(template, DEMO_PROMPT + DEMO_CONTINUATION)
    data = demo.write_demo_dataset(tmp_path, n_train=400, n_valid=1)
    text = (data / "train.jsonl").read_text()
    assert text.count(DEMO_CONTINUATION) > 50  # about a third of the sentences


def test_demo_trains_loss_falls_then_plot_and_inspect(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["demo", "--out", str(run), "--steps", "12"]) == 0
    out = capsys.readouterr().out
    assert "tier  frequency" in out and "wrote the run to" in out
    assert f'--max-tokens 30 --prompt "{DEMO_PROMPT}"' in out and str(run.absolute()) in out
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["valid_loss"] for r in records if r["type"] == "eval"]
    train = [r for r in records if r["type"] == "train"]
    assert len(train) == 12 and len(evals) >= 2
    assert evals[-1] < evals[0] - 0.5, evals
    assert train[-1]["tier_updates"] == [12, 6, 3]
    assert (run / "adapters.safetensors").is_file() and (run / "best").is_dir()

    assert main(["plot", str(run)]) == 0
    png = (run / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    capsys.readouterr()
    assert main(["inspect", "--model", str(run / "model"), "--frequencies", "1", "3"]) == 0
    table = capsys.readouterr().out
    assert "tier  frequency" in table and "\n1             3" in table


def _old_run(path):
    """A directory holding a previous run: files whose bytes must survive every failure."""
    path.mkdir()
    (path / "config.yaml").write_text("steps: 1\n")
    (path / "adapters.safetensors").write_bytes(b"old adapters")
    (path / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 1.0}\n')
    return {p.name: p.read_bytes() for p in path.iterdir()}


def _data(tmp_path, train_text, valid_text='{"text": "a b c"}\n'):
    d = tmp_path / "badData"
    d.mkdir()
    if train_text is not None:
        (d / "train.jsonl").write_text(train_text)
    (d / "valid.jsonl").write_text(valid_text)
    return d


GOOD = '{"text": "one two three"}\n'


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing_model", "does not exist"),
        ("malformed_line", "train.jsonl:3: malformed JSON"),
        ("empty_train", "train.jsonl: data file is empty"),
        ("missing_train", "train.jsonl: data file not found"),
        ("unknown_format", "train.jsonl:1: record in none of the known formats"),
        ("latin1_line", "train.jsonl:2: not UTF-8 text (byte 0xe9"),
        (
            "unknown_yaml_key",
            "unknown option(s) 'learnig_rate' (did you mean 'learning_rate'?); valid options: model",
        ),
        ("too_many_tiers", "5 tiers need at least 5 distinct layer indices"),
        ("tier_pattern_matches_nothing", "pattern 'q_porj' matches no parameter path"),
        ("occupied_out_dir", "already holds a run"),
        ("lora_scale_word_in_yaml", "lora_scale must be a finite number, got 'big'"),
        ("lora_dropout_word_in_yaml", "lora_dropout must be a number in [0, 1), got 'x'"),
        ("tiers_with_one_frequency", "would be ignored: frequencies [1] is a single tier"),
        ("tier_order_flag_with_one_frequency", "--tier-order would be ignored: frequencies [1]"),
        ("tiers_depth_flag_multiscale", "--tiers would be ignored: multiscale_momentum has its"),
        ("optimizer_arg_fails_first_step", "b1 must be a number in [0, 1), got 'x'"),
        ("num_layers_beyond_the_model", "num_layers must be -1 (all) or in 1..4"),
    ],
)
def test_user_errors_exit_2_with_a_message_and_overwrite_nothing(
    case, expect, assets, tmp_path, capsys
):
    model, data = assets
    run = tmp_path / "run"
    before = _old_run(run)
    args = ["train", "--model", str(model), "--data", str(data), "--out", str(run), "--force"]
    args += ["--steps", "2", "--batch-size", "2", "--max-seq-len", "16"]
    if case == "missing_model":
        args[2] = str(tmp_path / "no_such_model")
    elif case == "malformed_line":
        args[4] = str(_data(tmp_path, GOOD + GOOD + '{"text": "x"\n'))
    elif case == "empty_train":
        args[4] = str(_data(tmp_path, "\n"))
    elif case == "missing_train":
        args[4] = str(_data(tmp_path, None))
    elif case == "latin1_line":
        args[4] = str(_data(tmp_path, GOOD + '{"text": "caf\u00e9"}\n'))
        (tmp_path / "badData" / "train.jsonl").write_bytes(GOOD.encode() + b'{"text": "caf\xe9"}\n')
    elif case == "unknown_format":
        args[4] = str(_data(tmp_path, '{"input": "q", "output": "a"}\n'))
    elif case == "unknown_yaml_key":
        (tmp_path / "run.yaml").write_text("learnig_rate: 0.1\n")
        args += ["--config", str(tmp_path / "run.yaml")]
    elif case == "too_many_tiers":
        args += ["--frequencies", "1", "2", "4", "8", "16"]
    elif case == "tier_pattern_matches_nothing":
        args += ["--frequencies", "1", "2", "--tiers", "{'q_porj': 1, '.*': 0}"]
    elif case == "occupied_out_dir":
        args.remove("--force")
    elif case.endswith("_word_in_yaml"):
        key, value = ("lora_scale", "big") if "scale" in case else ("lora_dropout", "x")
        (tmp_path / "run.yaml").write_text(f"{key}: {value}\n")
        args += ["--config", str(tmp_path / "run.yaml")]
    elif case == "tiers_with_one_frequency":
        args += ["--frequencies", "1", "--tiers", "{'mlp': 1, '.*': 0}"]
    elif case == "tier_order_flag_with_one_frequency":
        args += ["--frequencies", "1", "--tier-order", "deep_fast"]
    elif case == "tiers_depth_flag_multiscale":
        args += ["--optimizer", "multiscale_momentum", "--tiers", "depth"]
    elif case == "num_layers_beyond_the_model":
        args += ["--num-layers", "16"]
    elif case == "optimizer_arg_fails_first_step":
        args += ["--optimizer", "adam", "--frequencies", "1", "--optimizer-args", "{b1: x}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_ctrl_c_exits_130_saying_how_to_resume_and_resume_finishes(
    assets, tmp_path, capsys, monkeypatch
):
    import mlx.core as mx

    model, data = assets
    run = tmp_path / "run"
    args = ["train", "--model", str(model), "--data", str(data), "--out", str(run)]
    args += ["--steps", "4", "--batch-size", "2", "--max-seq-len", "16", "--eval-every", "0"]
    real, calls = mx.get_peak_memory, []

    def ctrl_c_in_step_3():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(mx, "get_peak_memory", ctrl_c_in_step_3)
    assert main(args) == 130
    monkeypatch.undo()
    err = capsys.readouterr().err.splitlines()[-1] + "\n"  # after the progress bar
    assert err == (
        f"nestedfn train: interrupted: 2 steps done, checkpoint "
        f"{run / 'checkpoints' / 'step_00000002'}; continue with: nestedfn train --resume {run}\n"
    )
    assert main(["train", "--resume", str(run)]) == 0
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_real_process_reports_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "nestedfn", "train", "--model", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # the default run directory, ./adapters (mlx-lm's), is not created
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 2
    assert f"nestedfn train: error: model path {tmp_path / 'nope'} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "adapters").exists()


def test_train_with_an_mlx_optimizer_name_runs_through_from_mlx(assets, tmp_path):
    model, data = assets
    run = tmp_path / "run"
    args = ["train", "--model", str(model), "--data", str(data), "--out", str(run)]
    args += ["--optimizer", "adafactor", "--steps", "4", "--batch-size", "2"]
    assert main(args + ["--max-seq-len", "24", "--eval-every", "0"]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]


def _tiny(assets, out, *extra: str) -> list[str]:
    model, data = assets
    return [
        "train", "--model", str(model), "--data", str(data), "--out", str(out),
        "--batch-size", "2", "--max-seq-length", "32", "--num-layers", "2", "--lora-rank", "2",
        "--learning-rate", "3e-3", "--steps-per-eval", "3", "--val-batches", "1", *extra,
    ]  # fmt: skip


def test_version(capsys):
    import nestedfn

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert (
        e.value.code == 0 and capsys.readouterr().out.strip() == f"nestedfn {nestedfn.__version__}"
    )


def test_stop_at_says_where_it_evaluated_and_resume_covers_the_whole_run(assets, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_tiny(assets, run, "--iters", "6", "--stop-at", "4")) == 0
    out = capsys.readouterr().out
    # mlx-lm's evaluations: after steps 0 and 2 (before iterations 1 and 3), none at the stop
    assert "(after step 0) ->" in out and "(after step 2)" in out
    assert "no evaluation at the stop (step 4)" in out
    first = float(out.split("train loss ")[1].split(" ")[0])
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "resumed at step 4" in out
    assert out.split("train loss ")[1].startswith(f"{first:.3f} -> ")  # from step 1, not step 5
    assert "(after step 5)" in out and "the last evaluation comes before the last step" in out


def test_plot_draws_a_test_point_and_refuses_bad_metrics_in_one_line(assets, tmp_path, capsys):
    model, data = assets
    run = tmp_path / "run"
    (data / "test.jsonl").write_text((data / "valid.jsonl").read_text())
    assert main(_tiny(assets, run, "--iters", "2", "--test")) == 0
    assert '"type": "test"' in (run / "metrics.jsonl").read_text()
    assert main(["plot", str(run)]) == 0
    capsys.readouterr()
    assert main(["plot", str(run), "--out", str(tmp_path / "x.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x.txt" in err and "png" in err
    good = (run / "metrics.jsonl").read_bytes()
    for bad, says in [
        (b'{"type": "train", "step": 1, "loss": 1.0}\n\xff\xfe\n', ":2: not UTF-8"),
        (b"[1, 2]\n", ":1: a JSON list, not a metrics record"),
        (b'{"type": "eval", "valid_loss": 2.0}\n', ":1: a record without an int step"),
    ]:
        (run / "metrics.jsonl").write_bytes(bad)
        assert main(["plot", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and "Traceback" not in err, err
    (run / "metrics.jsonl").write_bytes(good)


def test_a_dataset_smaller_than_the_batch_is_refused_as_mlx_lm_does(assets, tmp_path, capsys):
    model, data = assets
    small = tmp_path / "data"
    small.mkdir()
    (small / "train.jsonl").write_text(
        "\n".join((data / "train.jsonl").read_text().split("\n")[:3])
    )
    (small / "valid.jsonl").write_text((data / "valid.jsonl").read_text())
    args = _tiny(assets, tmp_path / "run", "--iters", "2", "--batch-size", "4")
    args[args.index("--data") + 1] = str(small)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "train.jsonl: 3 example(s), fewer than batch_size 4" in err
    assert not (tmp_path / "run").exists()


def test_a_second_demo_into_its_directory_says_what_demo_takes(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["demo", "--out", str(run), "--steps", "1"]) == 0
    capsys.readouterr()
    assert main(["demo", "--out", str(run), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"nestedfn demo --out {run.absolute()} --force" in err and "pass --resume" not in err


def test_lora_takes_mlx_lm_s_command_line(assets, tmp_path, capsys):
    model, data = assets
    base = ["lora", "--model", str(model), "--data", str(data)]
    assert main(base) == 2  # --train is off unless given, as in mlx-lm
    assert "at least one of --train or --test" in capsys.readouterr().err
    run = tmp_path / "run"
    args = [*base, "--train", "--adapter-path", str(run), "--iters", "3", "--batch-size", "2"]
    args += ["--num-layers", "2", "--max-seq-length", "32", "--report-to", "wandb"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert err.count("warning") == 1 and "report_to ignored" in err
    saved = (run / "config.yaml").read_text()
    assert "optimizer: adam\n" in saved and "iters: 3" in saved
    assert (run / "adapters.safetensors").is_file() and "train loss" in out
