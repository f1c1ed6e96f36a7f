import json
import random

import numpy as np
import pytest
import torch

from allo_train.checkpoint import COMPLETE_MARKER, CheckpointManager, is_complete


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def test_save_and_load_restores_state_rng_and_data_position(tmp_path):
    model, opt = model_and_optimizer()
    mgr = CheckpointManager(tmp_path)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = mgr.save(
        7,
        stage="forget",
        state_dicts={"model": model.state_dict(), "optimizer": opt.state_dict()},
        data_state={"epoch": 1, "position": 12},
        extra={"loss": 0.5},
    )
    assert path == tmp_path / "checkpoint-7" and is_complete(path)
    expected = (random.random(), float(np.random.rand()), torch.rand(3))

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    ckpt = mgr.load()
    assert (ckpt.path, ckpt.step, ckpt.stage) == (path, 7, "forget")
    assert ckpt.data_state == {"epoch": 1, "position": 12} and ckpt.extra == {"loss": 0.5}
    assert random.random() == expected[0]
    assert float(np.random.rand()) == expected[1]
    assert torch.equal(torch.rand(3), expected[2])

    fresh, fresh_opt = model_and_optimizer(seed=5)
    fresh.load_state_dict(ckpt.state_dict("model"))
    fresh_opt.load_state_dict(ckpt.state_dict("optimizer"))
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match="no state dict 'scheduler'"):
        ckpt.state_dict("scheduler")


def test_write_fn_writes_into_the_temporary_directory(tmp_path):
    seen = []

    def write_fn(d):
        seen.append(d.name)
        assert not (d / COMPLETE_MARKER).exists()  # the marker comes last
        (d / "engine").mkdir()
        (d / "engine" / "shard_0.bin").write_bytes(b"abc")

    path = CheckpointManager(tmp_path).save(3, write_fn=write_fn)
    assert seen == [".tmp-checkpoint-3"]
    assert (path / "engine" / "shard_0.bin").read_bytes() == b"abc"
    assert not (tmp_path / ".tmp-checkpoint-3").exists()


def test_crash_mid_write_leaves_nothing_that_looks_complete(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(10, stage="improve", data_state={"position": 1})

    def crash(d):
        (d / "half_written.bin").write_bytes(b"x" * 10)
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        mgr.save(20, stage="improve", write_fn=crash)
    assert (tmp_path / ".tmp-checkpoint-20").is_dir()  # the partial directory is there...
    assert not (tmp_path / "checkpoint-20").exists()
    assert mgr.latest() == tmp_path / "checkpoint-10"  # ...and ignored
    assert mgr.load(restore_rng=False).step == 10

    # A directory with the final name but no marker (e.g. copied by hand, killed during rmtree) is ignored too.
    (tmp_path / "checkpoint-30").mkdir()
    (tmp_path / "checkpoint-30" / "trainer_state.json").write_text(json.dumps({"step": 30}))
    assert mgr.latest() == tmp_path / "checkpoint-10"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        mgr.load(tmp_path / "checkpoint-30")

    # The next save cleans up the leftover temporary directory.
    mgr.save(40)
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert [p.name for p in mgr.complete_checkpoints()] == ["checkpoint-10", "checkpoint-40"]


def test_save_total_limit_keeps_the_newest_by_step(tmp_path):
    mgr = CheckpointManager(tmp_path, save_total_limit=2)
    for step in (5, 50, 100, 1000):  # numeric order, not lexical
        mgr.save(step)
    assert [p.name for p in mgr.complete_checkpoints()] == ["checkpoint-100", "checkpoint-1000"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-100", "checkpoint-1000"]
    # Re-saving an existing step replaces it.
    mgr.save(1000, extra={"again": True})
    assert mgr.load(restore_rng=False).extra == {"again": True}


def test_empty_or_missing_root_has_no_checkpoint(tmp_path):
    assert CheckpointManager(tmp_path / "none").load() is None
    with pytest.raises(ValueError, match="save_total_limit"):
        CheckpointManager(tmp_path, save_total_limit=0)
    with pytest.raises(ValueError, match="step"):
        CheckpointManager(tmp_path).save(-1)


def test_barrier_and_non_main_ranks(tmp_path):
    calls = []
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, barrier=lambda: calls.append("barrier"), rank=0)
    assert calls == ["barrier"] * 3
    # A non-main rank writes its RNG state and engine files into the main rank's temporary directory.
    (tmp_path / ".tmp-checkpoint-2").mkdir()
    mgr.save(2, is_main=False, rank=1, write_fn=lambda d: (d / "rank1.bin").write_bytes(b"1"))
    assert (tmp_path / ".tmp-checkpoint-2" / "rng_state_1.pt").is_file()
    assert (tmp_path / ".tmp-checkpoint-2" / "rank1.bin").is_file()
    assert mgr.latest() == tmp_path / "checkpoint-1"


# Metrics live next to checkpoints in a stage directory; their logger and plots are tested here.
def test_metrics_logger_jsonl_and_loss_curves(tmp_path):
    from allo_train.metrics import MetricsLogger, plot_loss_curves, read_metrics

    with MetricsLogger(tmp_path, stage="warmup", enabled=True, tensorboard=True) as log:
        for step in range(1, 4):
            log.log(step, {"loss": torch.tensor(1.0 / step), "rewards/margins": np.float32(0.5), "note": "x"})
        log.log(4, {"loss": 0.1}, stage="improve")
    with MetricsLogger(tmp_path, enabled=False) as silent:
        assert silent.log(1, {"loss": 1.0}) is None
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "improve", "ste')  # torn last line of a crashed run
    records = read_metrics(tmp_path)
    assert [(r["stage"], r["step"], r["loss"]) for r in records] == [
        ("warmup", 1, 1.0),
        ("warmup", 2, 0.5),
        ("warmup", 3, pytest.approx(1 / 3)),
        ("improve", 4, 0.1),
    ]
    assert records[0]["rewards/margins"] == 0.5 and records[0]["note"] == "x"
    with pytest.raises(ValueError, match="'loss' must be a scalar"):
        MetricsLogger(tmp_path / "x", enabled=True).log(1, {"loss": torch.ones(2)})

    paths = plot_loss_curves(tmp_path, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["loss_improve.png", "loss_warmup.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
