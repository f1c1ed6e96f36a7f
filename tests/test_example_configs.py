from pathlib import Path

from allo_train.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_example_allo_config_loads_with_overrides():
    cfg = load_config(ROOT / "examples" / "allo.yaml", ["improve.mask_fraction=0.2", "--seed", "7"])
    assert cfg.pipeline.stages == ["warmup", "locate", "forget", "improve"]
    assert cfg.improve.mask_fraction == 0.2 and cfg.seed == 7
    assert cfg.locate.granularity == "row" and cfg.forget.token_weight_source == "corrected"
    assert cfg.deepspeed["zero_optimization"]["stage"] == 3
    # Stage fields left unset take the top-level values.
    assert cfg.improve.per_device_train_batch_size == 2 and cfg.forget.max_length == 1024
