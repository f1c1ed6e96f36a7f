import json

import pytest
import yaml

from allo_train import locate
from allo_train.config import (
    DEFAULT_EXCLUDE,
    TrainConfig,
    config_to_dict,
    load_config,
    parse_overrides,
    resolve_deepspeed_config,
    save_config,
)


def write_yaml(tmp_path, obj, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(obj))
    return p


def test_defaults_resolve_stage_fields_from_top_level():
    cfg = load_config()
    assert isinstance(cfg, TrainConfig)
    assert cfg.pipeline.stages == ["warmup", "locate", "forget", "improve"]
    for stage in ("sft", "correct", "warmup", "forget", "improve"):
        section = getattr(cfg, stage)
        assert section.max_length == 1024 and section.max_prompt_length == 512
        assert section.per_device_train_batch_size == 1
    # A stage's own default (ALLO's published settings; Aligner's for correct) where it has one, else the top level's.
    assert cfg.sft.learning_rate == cfg.learning_rate == 5e-6 and cfg.sft.lr_scheduler_type == "linear"
    rates = {s: getattr(cfg, s).learning_rate for s in ("warmup", "forget", "improve", "correct")}
    assert rates == {"warmup": 1e-6, "forget": 5e-7, "improve": 5e-6, "correct": 2e-5}
    assert cfg.improve.mask_fraction == 0.9 and cfg.improve.mask_by == "highest"
    assert cfg.warmup.beta == cfg.improve.beta == cfg.forget.beta == 0.1
    assert cfg.improve.loss_type == "sigmoid"
    assert cfg.forget.ratio == cfg.improve.ratio == cfg.locate.ratio == 0.05
    assert cfg.locate.exclude == list(DEFAULT_EXCLUDE)
    assert locate.DEFAULT_EXCLUDE == DEFAULT_EXCLUDE


def test_yaml_stage_values_override_top_level_and_cli_overrides_yaml(tmp_path):
    path = write_yaml(
        tmp_path,
        {
            "model_name_or_path": "m",
            "learning_rate": 1.0e-5,
            "beta": 0.2,
            "forget": {"learning_rate": 5.0e-7, "token_weight_source": "corrected", "ratio": 0.1},
            "improve": {"mask_fraction": 0.1},
            "locate": {"ratio": 0.03, "granularity": "row"},
            "deepspeed": {"zero_optimization": {"stage": 2}},
        },
    )
    cfg = load_config(path, ["improve.mask_fraction=0.2", "--beta", "0.3", "--warmup.learning_rate=2e-6", "--bf16"])
    assert cfg.model_name_or_path == "m"
    assert cfg.improve.mask_fraction == 0.2
    assert cfg.beta == 0.3 and cfg.improve.beta == 0.3 and cfg.warmup.beta == 0.3
    assert cfg.forget.learning_rate == 5e-7  # stage value wins
    assert cfg.warmup.learning_rate == 2e-6  # "2e-6" (a YAML string) is read as a float
    assert cfg.improve.learning_rate == 1e-5
    assert cfg.bf16 is True
    assert cfg.forget.ratio == 0.1 and cfg.improve.ratio == 0.03  # N1 explicit, N2 from locate.ratio
    assert cfg.improve.lr_scheduler_type == "cosine"  # the stage's own default: the top level does not set it
    assert cfg.locate.granularity == "row"
    assert resolve_deepspeed_config(cfg) == {"zero_optimization": {"stage": 2}}


def test_a_top_level_value_that_is_set_overrides_the_stages_own_defaults(tmp_path):
    cfg = load_config(None, {"learning_rate": 1e-4, "warmup_ratio": 0.0})
    for stage in ("sft", "correct", "warmup", "forget", "improve"):
        assert getattr(cfg, stage).learning_rate == 1e-4 and getattr(cfg, stage).warmup_ratio == 0.0
    assert cfg.forget.lr_scheduler_type == "cosine" and cfg.sft.lr_scheduler_type == "linear"
    cfg = load_config(None, {"learning_rate": 1e-4, "forget.learning_rate": 3e-7})
    assert cfg.forget.learning_rate == 3e-7 and cfg.improve.learning_rate == 1e-4  # the section's own value wins
    save_config(cfg, tmp_path / "resolved.yaml")
    assert config_to_dict(load_config(tmp_path / "resolved.yaml")) == config_to_dict(cfg)


def test_parse_overrides_forms():
    got = parse_overrides(["--a", "1", "--b=x", "c.d=[1, 2]", "--flag", "e=null", "--max-length", "64", "--last"])
    assert got == {"a": 1, "b": "x", "c.d": [1, 2], "flag": True, "e": None, "max_length": 64, "last": True}
    with pytest.raises(ValueError, match="positional"):
        parse_overrides(["positional"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("improve.mask_fractio=0.2", "'improve.mask_fractio'"),
        ("improve.mask_fraction=1.5", "'improve.mask_fraction' must be in [0, 1), got 1.5"),
        ("locate.granularity=neuron", "'locate.granularity' must be one of ['element', 'row', 'layer'], got 'neuron'"),
        ("locate.scope=local", "'locate.scope'"),
        ("learning_rate=abc", "'learning_rate' must be a number, got 'abc'"),
        ("learning_rate=0", "'learning_rate' must be in (0, inf), got 0.0"),
        ("per_device_train_batch_size=1.5", "'per_device_train_batch_size' must be an integer, got 1.5"),
        ("gradient_checkpointing=3", "'gradient_checkpointing' must be true or false, got 3"),
        ("pipeline.stages=[warmup, polish]", "'pipeline.stages[1]'"),
        ("pipeline.stages=[warmup, warmup]", "'pipeline.stages' lists a stage twice"),
        ("improve.loss_type=kto", "'improve.loss_type'"),
        ("forget.token_weight_source=scoring_model", "'forget.scoring_model'"),
        ("warmup.max_prompt_length=2048", "'warmup.max_prompt_length' must be < warmup.max_length (1024), got 2048"),
        ("deepspeed=3", "'deepspeed'"),
        ("locate.exclude=['re:(']", "'locate.exclude[0]'"),
        ("nosuch=1", "'nosuch'"),
        ("improve.mask_fraction.x=1", "'improve.mask_fraction' must be a number"),
        ("forget=3", "'forget' must be a mapping"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, fragment):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [["locate.method=ila", "forget.ratio=0.2"], ["pipeline.stages=[ila, forget, improve]", "improve.ratio=0.3"]],
)
def test_a_stage_ratio_with_ila_masks_is_refused_at_load(overrides):
    """ILA's masks are whole layers: a forget/improve ratio that would re-select neurons is a config error, named
    before anything runs (it was found only when the stage started)."""
    stage = overrides[1].split(".")[0]
    with pytest.raises(ValueError, match=rf"config key '{stage}\.ratio' \(0\.[23]\) differs from locate\.ratio"):
        load_config(None, overrides)
    same = overrides[:1] + [f"{stage}.ratio=0.05"]  # locate.ratio's default: nothing re-selected
    assert load_config(None, same).section(stage).ratio == 0.05
    assert load_config(None, overrides[:1]).section(stage).ratio == 0.05  # unset: locate.ratio
    assert load_config(None, ["forget.ratio=0.2"]).forget.ratio == 0.2  # located masks: re-selected, fine


def test_unknown_key_in_yaml_section(tmp_path):
    path = write_yaml(tmp_path, {"locate": {"ratoi": 0.1}})
    with pytest.raises(ValueError, match=r"unknown config key 'locate.ratoi' \(value 0.1\)"):
        load_config(path)


def test_missing_and_non_mapping_config_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(bad)


def test_deepspeed_path_is_read_and_missing_path_is_named(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}))
    cfg = load_config(None, {"deepspeed": str(ds)})
    assert resolve_deepspeed_config(cfg)["zero_optimization"]["stage"] == 3
    cfg = load_config(None, {"deepspeed": str(tmp_path / "missing.json")})
    with pytest.raises(ValueError, match=r"'deepspeed'.*missing\.json"):
        resolve_deepspeed_config(cfg)


def test_saved_config_reloads_equal(tmp_path):
    cfg = load_config(None, ["locate.exclude=['re:^model\\.embed', '*.bias']", "resume_from_checkpoint=true", "seed=7"])
    assert cfg.locate.exclude == ["re:^model\\.embed", "*.bias"]
    assert cfg.resume_from_checkpoint is True
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert cfg.stage_dir("forget") == tmp_path.__class__("outputs") / "forget"


def test_training_settings_hold_what_changes_the_result_and_not_the_cadence():
    from allo_train.config import settings_differences, training_settings

    base = training_settings(load_config(None, {"deepspeed": {"zero_optimization": {"stage": 2}}}), "forget")
    assert base["forget.learning_rate"] == 5e-7 and base["deepspeed.zero_optimization"] == {"stage": 2}
    assert base["seed"] == 42 and base["forget.data_path"] is None and "forget.logging_steps" not in base
    json.dumps(base)  # stored in trainer_state.json
    cadence = {"logging_steps": 3, "save_steps": 7, "eval_steps": 2, "save_total_limit": 5, "output_dir": "else"}
    same = training_settings(load_config(None, {**cadence, "deepspeed": {"zero_optimization": {"stage": 2}}}), "forget")
    assert settings_differences(base, same) == []
    changed = training_settings(
        load_config(None, {"learning_rate": 2e-3, "forget.beta": 0.5, "seed": 1, "deepspeed": None}), "forget"
    )
    assert settings_differences(base, changed) == [
        'deepspeed.zero_optimization: {"stage": 2} (checkpoint) -> {"stage": 0} (now)',
        "forget.beta: 0.1 (checkpoint) -> 0.5 (now)",
        "forget.learning_rate: 5e-07 (checkpoint) -> 0.002 (now)",
        "seed: 42 (checkpoint) -> 1 (now)",
    ]
    assert settings_differences({"a": 1}, {"b": 1}) == [
        "a: 1 (checkpoint) -> (not set) (now)",
        "b: (not set) (checkpoint) -> 1 (now)",
    ]
