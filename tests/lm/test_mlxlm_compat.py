"""mlx-lm's config keys and flags in nestedfn train (nestedfn.lm.mlxlm_compat, the CLI)."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
import yaml

from nestedfn.cli import build_parser, main
from nestedfn.lm.config import ConfigError, TrainConfig, load_config, save_config


def write(tmp_path, text: str):
    path = tmp_path / "lora.yaml"
    path.write_text(text)
    return path


def test_mlx_lm_keys_set_the_same_options_as_nestedfn_s(tmp_path):
    mlx = load_config(
        write(
            tmp_path,
            "iters: 30\nnum_layers: 2\nmax_seq_length: 64\nsteps_per_eval: 5\nval_batches: -1\n"
            "grad_accumulation_steps: 2\noptimizer: adamw\n"
            "optimizer_config: {adam: {}, adamw: {betas: [0.8, 0.99], weight_decay: 0.1}, sgd: {}}\n"
            "lora_parameters: {rank: 4, scale: 10.0, dropout: 0.1, keys: [self_attn.q_proj]}\n",
        )
    )
    ours = TrainConfig(
        steps=30,
        lora_layers=2,
        max_seq_len=64,
        eval_every=5,
        eval_batches=-1,
        grad_accumulation=2,
        optimizer="adamw",
        optimizer_args={"b1": 0.8, "b2": 0.99, "weight_decay": 0.1},
        lora_rank=4,
        lora_scale=10.0,
        lora_dropout=0.1,
        lora_keys=["self_attn.q_proj"],
    )
    assert mlx == ours


def test_optimizer_flag_picks_its_optimizer_config_entry(tmp_path):
    path = write(
        tmp_path, "optimizer: adam\noptimizer_config: {adam: {eps: 0.1}, muon: {momentum: 0.9}}\n"
    )
    assert load_config(path).optimizer_args == {"eps": 0.1}
    # muon is mlx.optimizers.Muon (as in mlx-lm): its own keyword names
    assert load_config(path, optimizer="muon").optimizer_args == {"momentum": 0.9}


@pytest.mark.parametrize(
    "text, match",
    [
        ("iters: 5\nsteps: 6\n", "steps and iters set the same option to different values"),
        ("lora_parameters: {rank: 4}\nlora_rank: 8\n", "lora_rank and lora_parameters.rank"),
        ("hf_dataset: {path: x}\n", "hf_dataset downloads a Hugging Face dataset"),
        ("lora_parameters: {rank: 4, alpha: 16}\n", "uses scale, not alpha"),
        ("lora_parameters: {rnak: 4}\n", "'rnak' \\(did you mean 'rank'\\?\\)"),
        ("itres: 5\n", "'itres' \\(did you mean 'iters'\\?\\)"),
        ("fine_tune_type: qlora\n", "fine_tune_type must be one of lora, dora, full"),
        ("lr_schedule: {name: cosine_decay, arguments: [1e-3, 9]}\nwarmup_steps: 2\n", "keep one"),
        ("train: false\n", "train: false needs test: true"),
        ("training_mode: dpo\n", "training_mode 'dpo': nestedfn trains the language-model loss"),
    ],
)
def test_mistakes_are_one_clear_error(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_mlx_lm_s_example_config_reads_as_it_means(tmp_path):
    # the shape of mlx-lm's examples/lora_config.yaml (newer mlx-lm adds training_mode)
    c = load_config(
        write(
            tmp_path,
            'model: "mlx_model"\ntrain: true\nfine_tune_type: lora\ntraining_mode: normal\n'
            'optimizer: adamw\ndata: "/path/to/data"\nseed: 0\nnum_layers: 16\nbatch_size: 4\n'
            "iters: 1000\nval_batches: 25\nlearning_rate: 1e-5\nsteps_per_report: 10\n"
            'steps_per_eval: 200\nresume_adapter_file: null\nadapter_path: "adapters"\n'
            "save_every: 100\ntest: false\ntest_batches: 100\nmax_seq_length: 2048\n"
            "grad_checkpoint: false\nlora_parameters:\n  keys: [self_attn.q_proj, self_attn.v_proj]\n"
            "  rank: 8\n  scale: 20.0\n  dropout: 0.0\n",
        )
    )
    assert (c.optimizer, c.lora_layers, c.steps, c.learning_rate) == ("adamw", 16, 1000, 1e-5)
    assert c.lora_keys == ["self_attn.q_proj", "self_attn.v_proj"] and c.adapter_path == "adapters"


def test_both_names_with_one_value_is_fine_and_saved_config_speaks_mlx_lm(tmp_path):
    c = load_config(write(tmp_path, "iters: 7\nsteps: 7\nlora_parameters: {rank: 2}\n"))
    save_config(c, tmp_path)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["iters"] == 7 and "steps" not in saved and saved["lora_parameters"]["rank"] == 2
    assert load_config(tmp_path / "config.yaml") == c


def test_a_mistyped_flag_suggests_the_nearest_one(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--itres", "5"])
    assert e.value.code == 2
    assert "did you mean '--iters'?" in capsys.readouterr().err


def test_every_mlx_lm_lora_flag_is_a_nestedfn_train_flag():
    from mlx_lm.lora import build_parser as mlx_lm_parser

    ours = {o for a in _train_parser()._actions for o in a.option_strings}
    theirs = {o for a in mlx_lm_parser()._actions for o in a.option_strings}
    assert theirs <= ours, theirs - ours


def _train_parser():
    return build_parser()._subparsers._group_actions[0].choices["train"]


def test_help_lists_every_choice_and_a_tiers_example():
    text = _train_parser().format_help()
    for choices in ("{lora,dora,full}", "{constant,cosine}", "{shallow_fast,deep_fast}"):
        assert choices in text
    assert "nested_adam" in text and "--tiers '{mlp: 1, .*: 0}'" in " ".join(text.split())


def test_reporting_flags_warn_once_and_the_run_goes_on(capsys):
    # the run goes on to its next check (no model given here): one warning, then that error
    assert main(["train", "--report-to", "wandb", "--project-name", "p"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "report_to, project_name ignored" in err[0]
    assert "no model given" in err[1]


def complete_mlx_lm_config(model, data, out) -> dict:
    """A config with every key ``python -m mlx_lm lora`` reads (its CONFIG_DEFAULTS), in
    mlx-lm's names and meaning, plus nestedfn's own tiers beside them."""
    return {
        "model": str(model),
        "train": True,
        "fine_tune_type": "lora",
        "optimizer": "adam",
        "optimizer_config": {
            "adam": {"betas": [0.9, 0.99]},
            "adamw": {},
            "muon": {},
            "sgd": {},
            "adafactor": {},
        },
        "data": str(data),
        "seed": 0,
        "num_layers": 2,
        "batch_size": 2,
        "iters": 4,
        "val_batches": 1,
        "learning_rate": 1e-3,
        "steps_per_report": 2,
        "steps_per_eval": 2,
        "resume_adapter_file": None,
        "adapter_path": str(out),
        "save_every": 2,
        "test": True,
        "test_batches": 2,
        "max_seq_length": 32,
        "config": None,
        "grad_checkpoint": True,
        "grad_accumulation_steps": 2,
        "clear_cache_threshold": 0,
        "lr_schedule": {"name": "cosine_decay", "arguments": [2e-3, 2, 1e-4], "warmup": 1},
        "lora_parameters": {
            "rank": 4,
            "dropout": 0.0,
            "scale": 10.0,
            "keys": ["self_attn.q_proj", "self_attn.v_proj"],
        },
        "mask_prompt": False,
        "report_to": None,
        "project_name": None,
        "trust_remote_code": False,
        "frequencies": [1, 2],  # nestedfn's own, beside mlx-lm's keys
        "tier_reduce": "sum",
    }


def test_a_complete_mlx_lm_config_runs_unchanged(assets, tmp_path, capsys):
    import mlx_lm
    from mlx_lm.lora import CONFIG_DEFAULTS

    model, data = assets
    test_data = tmp_path / "data"
    test_data.mkdir()
    for split in ("train", "valid", "test"):
        src = "valid" if split == "test" else split
        (test_data / f"{split}.jsonl").write_text((data / f"{src}.jsonl").read_text())
    run = tmp_path / "run"
    config = complete_mlx_lm_config(model, test_data, run)
    assert set(CONFIG_DEFAULTS) <= set(config), set(CONFIG_DEFAULTS) - set(config)
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "step 2/4: loss" in out and "step 4/4: loss" in out and "Test loss" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["iters"] == 4 and saved["num_layers"] == 2 and saved["grad_checkpoint"]
    assert saved["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert saved["optimizer_args"] == {"b1": 0.9, "b2": 0.99}
    keys = set(mx.load(str(run / "adapters.safetensors")))
    assert {k.split(".")[2] for k in keys} == {"2", "3"}
    assert {k.split(".")[4] for k in keys} == {"q_proj", "v_proj"}
    adapter_config = json.loads((run / "adapter_config.json").read_text())
    assert adapter_config["lora_parameters"]["scale"] == 10.0
    mlx_lm.load(str(model), adapter_path=str(run))


def _readme_table() -> list[list[str]]:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "mlx_lm.md").read_text()
    body = text.split("<!-- mlx-lm table -->")[1].split("<!-- end mlx-lm table -->")[0]
    rows = [r.strip().strip("|").split(" | ") for r in body.strip().splitlines()[2:]]
    return [[c.strip() for c in r] for r in rows]


def test_the_readme_table_names_every_mlx_lm_flag_and_key_and_nestedfn_takes_them():
    import re

    from mlx_lm.lora import CONFIG_DEFAULTS
    from mlx_lm.lora import build_parser as mlx_lm_parser

    from nestedfn.lm.mlxlm_compat import accepted_keys

    theirs = {o for a in mlx_lm_parser()._actions for o in a.option_strings} - {"-h", "--help"}
    ours = {o for a in _train_parser()._actions for o in a.option_strings}
    keys = set(accepted_keys([f.name for f in __import__("dataclasses").fields(TrainConfig)]))
    nested = {"rank", "scale", "dropout", "keys", "name", "arguments", "warmup", "warmup_init"}
    nested |= {"prompt_feature", "completion_feature", "text_feature", "chat_feature"}
    nested |= {"training_mode"}  # read by mlx-lm's datasets / newer mlx-lm
    named_flags, named_keys = set(), set()
    for mlx_lm_cell, nestedfn_cell, _ in _readme_table():
        for tok in re.findall(r"`([^`]+)`", mlx_lm_cell):
            if tok.startswith("-"):
                assert tok in theirs and tok in ours, tok
                named_flags.add(tok)
            else:
                assert tok in CONFIG_DEFAULTS or tok in nested or tok == "hf_dataset", tok
                named_keys.add(tok)
        for tok in re.findall(r"`([^`]+)`", nestedfn_cell):
            if tok.startswith("--"):
                assert tok.split()[0] in ours, tok
            elif re.fullmatch(r"[a-z_]+", tok) and not mlx_lm_cell:
                assert tok in keys, tok
    assert theirs <= named_flags, theirs - named_flags
    assert set(CONFIG_DEFAULTS) - {"config"} <= named_keys, set(CONFIG_DEFAULTS) - named_keys


def test_reporting_keys_warn_once_and_the_config_loads(tmp_path, capsys):
    path = write(tmp_path, "report_to: wandb\nproject_name: p\nwandb: myproj\niters: 3\n")
    assert load_config(path).steps == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "report_to, project_name, wandb ignored" in err[0]
