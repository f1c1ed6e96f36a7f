from pathlib import Path

from allo_train.config import load_config, training_settings

ROOT = Path(__file__).resolve().parents[1]


def test_example_allo_config_loads_with_overrides():
    cfg = load_config(ROOT / "examples" / "allo.yaml", ["improve.mask_fraction=0.2", "--seed", "7"])
    assert cfg.pipeline.stages == ["warmup", "locate", "forget", "improve"]
    assert cfg.improve.mask_fraction == 0.2 and cfg.seed == 7
    assert cfg.locate.granularity == "element" and cfg.forget.token_weight_source == "corrected"
    assert cfg.deepspeed["zero_optimization"]["stage"] == 3
    # Stage fields left unset take the top-level values, or the stage's published default.
    assert cfg.improve.per_device_train_batch_size == 8 and cfg.forget.max_length == 1024
    assert (cfg.warmup.learning_rate, cfg.forget.learning_rate, cfg.improve.learning_rate) == (1e-6, 5e-7, 5e-6)


def test_the_demo_cli_example_is_the_demos_own_allo_run():
    """examples/allo_demo.yaml (the README's third command) trains what the demo's ALLO rows trained: every setting
    of every stage equals the demo's allo_config (paths aside; checkpoints do not change results)."""
    from allo_train.demo import FULL, allo_config

    example = load_config(ROOT / "examples" / "allo_demo.yaml")
    demo_out = Path("demo_out")
    demo = allo_config(
        Path("outputs/allo-demo"),
        demo_out / "sft" / "sft" / "model",
        demo_out / "data" / "preference.jsonl",
        demo_out / "data" / "forget.jsonl",
        0,
        FULL,
    )
    assert example.pipeline.stages == demo.pipeline.stages
    for stage in example.pipeline.stages:
        assert training_settings(example, stage) == training_settings(demo, stage), stage
    assert example.locate == demo.locate and example.model_name_or_path == demo.model_name_or_path
    assert example.output_dir == demo.output_dir
