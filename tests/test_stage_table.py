"""The stage table (allo_train.stages.STAGES) is the one place that lists stages: the config's sections, the CLI's
commands and the training loop come from it, and a stage added as one entry (tests/example_stage.py) trains through
the CLI with nothing else changed. Constants are read from their owners."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import allo_kernels as ak
from allo_kernels.objectives import PREFERENCE_LOSS_TYPES
from allo_kernels.ops.token_scores import MASK_BY, MASK_SCOPES
from allo_train import cli, config, locate, stages
from allo_train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def field_choices(section: type, name: str) -> tuple:
    return config.choices_of(next(f for f in dataclasses.fields(section) if f.name == name).metadata)


def test_config_sections_and_cli_commands_are_the_table():
    cfg = load_config()
    assert list(cfg.sections) == list(stages.STAGES)
    for name, spec in stages.STAGES.items():
        assert isinstance(cfg.section(name), spec.section) and getattr(cfg, name) is cfg.section(name)
        assert cfg.stage_dir(name) == Path("outputs") / name
        assert (spec.runner is None) == (spec.data is not None and spec.loss is not None)
    assert set(config.config_to_dict(cfg)) >= set(stages.STAGES) and "sections" not in config.config_to_dict(cfg)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["nosuchstage"])
    assert exit_.value.code == 2
    with pytest.raises(ValueError, match="stage must be one of"):
        cfg.stage_dir("nosuchstage")


def test_choices_come_from_their_owners():
    assert field_choices(config.TrainConfig, "loss_type") is PREFERENCE_LOSS_TYPES
    for section in (config.WarmupStageConfig, config.ImproveStageConfig):
        assert field_choices(section, "loss_type") is PREFERENCE_LOSS_TYPES
    assert field_choices(config.ImproveStageConfig, "mask_by") is MASK_BY
    assert field_choices(config.ImproveStageConfig, "mask_scope") is MASK_SCOPES
    assert field_choices(config.LocateStageConfig, "granularity") is locate.GRANULARITIES
    assert config.DEFAULT_EXCLUDE is locate.DEFAULT_EXCLUDE
    assert ak.IGNORE_INDEX == -100
    from allo_train import data

    assert data.IGNORE_INDEX is ak.IGNORE_INDEX
    assert "simpo" in PREFERENCE_LOSS_TYPES


def test_model_flow_follows_starts_from():
    cfg = load_config(None, {"model_name_or_path": "base", "output_dir": "o"})
    flow = {s: stages.start_model_dir(cfg, s) for s in ("warmup", "locate", "forget", "improve")}
    assert flow == {
        "warmup": Path("base"),
        "locate": Path("base"),
        "forget": Path("base"),
        "improve": Path("o/forget/model"),
    }
    cfg = load_config(None, {"model_name_or_path": "base", "output_dir": "o", "pipeline.stages": ["sft", "improve"]})
    assert stages.start_model_dir(cfg, "improve") == Path("o/sft/model")
    assert stages.start_model_dir(cfg, "sft") == Path("base")
    with pytest.raises(ValueError, match="'model_name_or_path' is required"):
        stages.start_model_dir(load_config(), "warmup")


def test_a_stage_entry_must_be_a_training_stage_or_have_a_runner():
    with pytest.raises(ValueError, match="needs data, collator and loss"):
        stages.StageSpec(name="x", section=config.SFTStageConfig, summary="", data=stages.sft_data)
    with pytest.raises(ValueError, match="runner has no data"):
        stages.StageSpec(
            name="x", section=config.SFTStageConfig, summary="", runner=stages.locate_stage, loss=stages.sft_loss
        )


def test_a_registered_stage_gets_its_config_section(monkeypatch):
    import example_stage

    monkeypatch.setitem(stages.STAGES, "chosen_sft", example_stage.CHOSEN_SFT)
    cfg = load_config(None, ["chosen_sft.loss_scale=0.5", "chosen_sft.data_path=p.jsonl", "learning_rate=0.1"])
    assert cfg.chosen_sft.loss_scale == 0.5 and cfg.chosen_sft.learning_rate == 0.1  # inherited from the top level
    with pytest.raises(ValueError, match=r"'chosen_sft\.loss_scal'"):
        load_config(None, ["chosen_sft.loss_scal=1"])


def policy_outputs(pairs: int = 3, t: int = 6, h: int = 8, v: int = 11, seed: int = 0) -> stages.PolicyOutputs:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (2 * pairs, t), generator=g)
    labels[:, :2] = ak.IGNORE_INDEX
    return stages.PolicyOutputs(
        hidden=torch.randn(2 * pairs, t, h, generator=g),
        labels=labels,
        lm_head_weight=torch.randn(v, h, generator=g),
        lm_head_bias=None,
        ref_logprobs=-torch.rand(2 * pairs, t, generator=g),
        token_weights=None,
    )


@pytest.mark.parametrize("loss_type", PREFERENCE_LOSS_TYPES)
def test_every_preference_loss_type_can_be_chosen_in_a_config(backend, loss_type):
    backend("torch")
    cfg = load_config(None, {"loss_type": loss_type, "simpo_gamma": 0.3, "improve.mask_fraction": 0.5})
    out = policy_outputs()
    kw = dict(lm_head_weight=out.lm_head_weight, ref_logprobs=out.ref_logprobs, beta=0.1, loss_type=loss_type)
    want, _ = ak.preference_loss(out.hidden, out.labels, simpo_gamma=0.3, **kw)
    got, _ = stages.STAGES["warmup"].loss(cfg.warmup, out)
    torch.testing.assert_close(got, want)
    want, _ = ak.preference_loss(out.hidden, out.labels, simpo_gamma=0.3, mask_fraction=0.5, **kw)
    got, metrics = stages.STAGES["improve"].loss(cfg.improve, out)
    torch.testing.assert_close(got, want)
    assert metrics["tokens/rejected"] < metrics["tokens/chosen"]  # the rejected side dropped tokens


def test_constant_with_warmup_stays_constant_after_the_warmup():
    from allo_train.engine import LR_SCHEDULERS, lr_lambda

    fn = lr_lambda("constant_with_warmup", total_steps=10, warmup_steps=2)
    assert [fn(s) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0] and fn(9) == 1.0
    assert field_choices(config.TrainConfig, "lr_scheduler_type") is LR_SCHEDULERS


# ------------------------------------------------------------------------------------------------ the example stage
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from allo_train.model import build_tiny_llama
    from allo_train.tokenizer import build_char_tokenizer

    d = tmp_path_factory.mktemp("stage_assets")
    tok = build_char_tokenizer(save_dir=d / "tok")
    build_tiny_llama(tok, d / "base", hidden_size=32, num_layers=2, num_heads=2, seed=0)
    with open(d / "pref.jsonl", "w") as f:
        for i in range(12):
            a, b = 10 + 3 * i, 20 + 2 * i
            f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}) + "\n")
    return d


RUN_EXAMPLE_STAGE = (
    "import sys, example_stage; example_stage.register(); from allo_train.cli import main; sys.exit(main())"
)


def run_example_stage(assets: Path, out: Path, loss_scale: float) -> subprocess.CompletedProcess:
    cfg = {
        "model_name_or_path": str(assets / "base"),
        "output_dir": str(out),
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 2,
        "max_steps": 2,
        "logging_steps": 1,
        "max_length": 16,
        "max_prompt_length": 8,
        "deepspeed": {"zero_optimization": {"stage": 0}},
        "pipeline": {"stages": ["chosen_sft"]},
        "chosen_sft": {"data_path": str(assets / "pref.jsonl"), "loss_scale": loss_scale},
    }
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1"}
    env["ALLO_KERNELS_BACKEND"] = "native"  # torch ops + the native optimizer, as a plain CPU run
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    argv = ["chosen_sft", "--config", str(path)]
    return subprocess.run(
        [sys.executable, "-c", RUN_EXAMPLE_STAGE, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_a_stage_added_as_one_entry_trains_through_the_cli(assets, tmp_path):
    base = load_file(str(assets / "base" / "model.safetensors"))
    for scale, changes in ((1.0, True), (0.0, False)):
        out = tmp_path / f"scale{scale}"
        r = run_example_stage(assets, out, scale)
        assert r.returncode == 0, r.stderr[-4000:]
        trained = load_file(str(out / "chosen_sft" / "model" / "model.safetensors"))
        same = all(torch.equal(trained[k], base[k]) for k in base)
        assert same is not changes, scale  # the section's loss_scale reached the stage's loss
        assert json.loads((out / "chosen_sft" / "stage_done.json").read_text())["stage"] == "chosen_sft"
        rows = [json.loads(line) for line in (out / "chosen_sft" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r] == [1, 2]
