import json
import random

import numpy as np
import pytest
import torch

from allo_train.checkpoint import COMPLETE_MARKER, CheckpointError, CheckpointManager, is_complete
from allo_train.files import DiskFullError


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


# ---- issue 11: manifests, named errors, a full disk, the output-directory lock, model swaps, metrics after a crash
def saved_checkpoints(root, steps=(1, 2, 3)):
    mgr = CheckpointManager(root)
    model, opt = model_and_optimizer()
    for step in steps:
        mgr.save(
            step,
            state_dicts={"model": model.state_dict(), "optimizer": opt.state_dict()},
            write_fn=lambda d: (
                (d / "engine").mkdir() or (d / "engine" / "shard.bin").write_bytes(bytes(range(256)) * 64)
            ),
            data_state={"position": step},
        )
    return mgr


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib

    from allo_train.checkpoint import MANIFEST_FILE, verify_manifest

    path = saved_checkpoints(tmp_path, steps=(1,)).latest()
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == sorted(set(files) - {MANIFEST_FILE, COMPLETE_MARKER})
    for rel, entry in manifest["files"].items():
        data = (path / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_manifest(path) == []


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:100]), "engine/shard.bin: 100 bytes, the manifest says 16384"),
        (lambda f: f.write_bytes(b""), "engine/shard.bin: 0 bytes, the manifest says 16384"),
        (lambda f: f.unlink(), "engine/shard.bin: missing (the manifest lists 16384 bytes)"),
        (lambda f: f.write_bytes(b"\xff" + f.read_bytes()[1:]), "engine/shard.bin: sha256 differs from the manifest"),
    ],
    ids=["truncated", "zero-length", "deleted", "one byte"],
)
def test_damaged_file_is_named_and_the_newest_good_checkpoint_is_chosen(tmp_path, damage, problem):
    mgr = saved_checkpoints(tmp_path)
    damage(tmp_path / "checkpoint-3" / "engine" / "shard.bin")
    sel = mgr.select()
    assert sel.path == tmp_path / "checkpoint-2"
    ((rejected, problems),) = sel.rejected
    assert rejected.name == "checkpoint-3" and len(problems) == 1 and problems[0].startswith(problem)
    assert mgr.load(restore_rng=False).step == 2
    with pytest.raises(CheckpointError, match=r"checkpoint-3 fails verification: engine/shard\.bin"):
        mgr.select(tmp_path / "checkpoint-3")


def test_no_verifying_checkpoint_stops_with_every_problem_named(tmp_path):
    mgr = saved_checkpoints(tmp_path, steps=(1, 2))
    (tmp_path / "checkpoint-2" / "model.pt").unlink()
    state = tmp_path / "checkpoint-1" / "trainer_state.json"
    state.write_bytes(b"\xe9" * state.stat().st_size)  # garbage of the right length: found by its checksum
    with pytest.raises(CheckpointError) as info:
        mgr.load()
    msg = str(info.value)
    assert f"no checkpoint in {tmp_path} verifies" in msg
    assert "checkpoint-2: model.pt: missing" in msg
    assert "checkpoint-1: trainer_state.json: sha256 differs from the manifest" in msg
    # A checkpoint without a manifest (an older allo) does not verify either.
    (tmp_path / "checkpoint-2" / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match=r"MANIFEST\.json is missing"):
        mgr.select(tmp_path / "checkpoint-2")


def test_unreadable_files_name_the_file_even_unverified(tmp_path):
    mgr = saved_checkpoints(tmp_path, steps=(1,))
    state = tmp_path / "checkpoint-1" / "trainer_state.json"
    good_state = state.read_bytes()
    state.write_bytes(b"\xe9\xff garbage")
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: not a trainer state \(UnicodeDecodeError"):
        mgr.load(verify=False)
    state.write_bytes(good_state)
    (tmp_path / "checkpoint-1" / "rng_state_0.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"rng_state_0\.pt: cannot read the RNG state of rank 0"):
        mgr.load(verify=False, rank=0)
    (tmp_path / "checkpoint-1" / "model.pt").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(CheckpointError, match=r"model\.pt: cannot read the state dict 'model'"):
        mgr.load(verify=False, restore_rng=False).state_dict("model")


def test_full_disk_during_a_save_is_named_with_the_path(tmp_path, monkeypatch):
    from allo_train import files

    mgr = CheckpointManager(tmp_path)
    mgr.save(1)

    def to_full_device(d):  # the kernel's own ENOSPC: /dev/full always reports a full device
        (d / "part.bin").write_bytes(b"x")
        with open("/dev/full", "wb") as f:
            f.write(b"\0" * 1_000_000)
            f.flush()

    with pytest.raises(
        DiskFullError, match=r"no space left on device while writing checkpoint 2 into .*\.tmp-checkpoint-2"
    ):
        mgr.save(2, write_fn=to_full_device)
    assert not (tmp_path / ".tmp-checkpoint-2").exists()  # the partial checkpoint is removed, its space given back
    assert [p.name for p in mgr.complete_checkpoints()] == ["checkpoint-1"]

    # DeepSpeed's torch.save(path) reports a full disk as a RuntimeError without errno: told by the free space.
    def cpp_stream_failure(d):
        raise RuntimeError("basic_ios::clear: iostream error")

    with pytest.raises(RuntimeError, match="basic_ios") as info:  # plenty of space: not a full disk
        mgr.save(3, write_fn=cpp_stream_failure)
    assert not isinstance(info.value, DiskFullError)
    monkeypatch.setattr(files, "free_bytes", lambda path: 4096)
    with pytest.raises(DiskFullError, match=r"no space left on device .*basic_ios::clear.*4096 bytes free"):
        mgr.save(3, write_fn=cpp_stream_failure)


def test_metrics_after_a_crash_keep_each_step_once(tmp_path):
    from allo_train.metrics import MetricsLogger, read_metrics, truncate_metrics

    with MetricsLogger(tmp_path, stage="forget", enabled=True) as log:
        for step in range(1, 6):
            log.log(step, {"loss": float(step)})
            log.log(step, {"eval/loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "forget", "step": 6, "lo')  # torn by a kill or a full disk
    # Resumed from the checkpoint of step 3: steps 4, 5 and the torn line go, then the run appends 4, 5, 6.
    with MetricsLogger(tmp_path, stage="forget", enabled=True, start_step=3) as log:
        for step in (4, 5, 6):
            log.log(step, {"loss": 10.0 * step})
    records = read_metrics(tmp_path)
    assert [(r["step"], r.get("loss")) for r in records if "loss" in r] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
        (6, 60.0),
    ]
    assert [r["step"] for r in records if "eval/loss" in r] == [1, 2, 3]
    assert truncate_metrics(tmp_path / "metrics.jsonl", 0) == 0 and read_metrics(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a metrics record"):
        truncate_metrics(tmp_path / "metrics.jsonl", 5)


def test_metrics_on_a_full_disk_name_the_file(tmp_path):
    from allo_train.metrics import MetricsLogger

    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC from the kernel
    log = MetricsLogger(tmp_path, enabled=True)
    with pytest.raises(DiskFullError, match=rf"no space left on device while writing {tmp_path}/metrics\.jsonl"):
        log.log(1, {"loss": 1.0})


LOCK_HOLDER = """
import sys, time
from allo_train.lock import OutputDirLock
OutputDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_output_dir_lock_between_two_processes_is_released_by_a_kill(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from allo_train.lock import OutputDirInUseError, OutputDirLock, hold_output_dir

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirInUseError) as info:
            OutputDirLock(tmp_path).acquire()
        msg = str(info.value)
        assert f"output_dir {tmp_path} is in use by another allo-train run (pid {holder.pid} on host" in msg
        assert "started " in msg and "command: python -c" in msg
    finally:
        holder.kill()  # SIGKILL: no cleanup runs; the operating system drops the lock
        holder.wait()
    with hold_output_dir(tmp_path) as lock, hold_output_dir(tmp_path) as again:  # re-entrant in one process
        assert lock is again
        child = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from allo_train.lock import OutputDirLock; OutputDirLock(sys.argv[1]).acquire()",
                str(tmp_path),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        assert child.returncode != 0 and f"(pid {os.getpid()} on host" in child.stderr
    OutputDirLock(tmp_path).acquire().release()


def test_swapping_a_directory_in_never_leaves_a_half_deleted_one(tmp_path, monkeypatch):
    import os

    from allo_train import files

    final = tmp_path / "model"
    final.mkdir()
    (final / "weights").write_text("old")
    new = files.new_temp_dir(tmp_path, "model")
    (new / "weights").write_text("new")
    real_replace = os.replace

    def failing_second_rename(src, dst):
        if str(src) == str(new):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", failing_second_rename)
    with pytest.raises(OSError):
        files.swap_in_dir(new, final)
    assert (final / "weights").read_text() == "old"  # the old one is put back
    monkeypatch.setattr(files.os, "replace", real_replace)
    files.swap_in_dir(new, final)
    assert (final / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_full_disk_while_saving_the_final_model_keeps_the_old_one(tmp_path):
    from safetensors.torch import save_file

    from allo_train.model import save_pretrained_atomic

    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda d, **kw: save_file({"w": torch.zeros(2)}, f"{d}/model.safetensors")
    out = save_pretrained_atomic(model, None, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]

    def onto_full_device(d):
        # What safetensors' Rust writer raised on a full 64 kB tmpfs (it writes a temporary file and renames it, so
        # /dev/full cannot stand in here: it would be replaced).
        from safetensors import SafetensorError

        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(DiskFullError, match=r"no space left on device while saving the model into .*\.tmp-model-"):
        save_pretrained_atomic(model, None, out, write_extra=onto_full_device)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the old model stays, the partial one is gone
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
