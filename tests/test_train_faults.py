"""Faults in allo_train runs, caused for real (issue 11): a kill between two renames, corrupted, truncated and deleted
checkpoint files, a full disk, two runs on one output directory, a resume under another config, bad masks.

Single-process CLI runs of the forget stage on a tiny Llama (a few seconds each); the 2-rank case (ZeRO-2, a
corrupted optimizer shard) is in test_train_pipeline.py.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_pipeline import write_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
pytestmark = pytest.mark.slow

MODEL_STATES = "deepspeed/state/mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from allo_train.locate import locate, save_importance
    from allo_train.model import build_tiny_llama
    from allo_train.tokenizer import build_char_tokenizer

    d = tmp_path_factory.mktemp("fault_assets")
    tok = build_char_tokenizer(save_dir=d / "tok")
    build_tiny_llama(tok, d / "base", hidden_size=32, num_layers=2, num_heads=2, seed=0)
    with open(d / "pref.jsonl", "w") as f, open(d / "forget.jsonl", "w") as g:
        for i in range(16):
            a, b = 10 + 3 * i, 20 + 2 * i
            good, bad = str(a + b), str(a + b + 1 + i % 9)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": good, "rejected": bad}) + "\n")
            g.write(json.dumps({"prompt": f"{a}+{b}=", "rejected": bad, "corrected": good}) + "\n")
    # Located masks from a fixed random importance (locate itself is tested in test_locate / test_train_pipeline).
    gen = torch.Generator().manual_seed(0)
    importance = {
        k: torch.rand(v.shape, generator=gen) for k, v in load_file(str(d / "base" / "model.safetensors")).items()
    }
    save_importance(importance, d / "locate" / "importance.safetensors")
    locate(importance, d / "locate", ratio=0.1, granularity="row", heatmap=False)
    return d


def forget_config(assets: Path, out: Path, **extra) -> Path:
    """A forget-only run in ``out`` (the located masks copied in): 4 steps, a checkpoint after each. ``extra``
    sections are merged into the defaults."""
    (out / "locate").mkdir(parents=True, exist_ok=True)
    for f in (assets / "locate").iterdir():
        shutil.copy(f, out / "locate" / f.name)
    sections = {
        "pipeline": {"stages": ["forget"]},
        "locate": {"ratio": 0.1, "granularity": "row"},
        "forget": {"data_path": str(assets / "forget.jsonl"), "token_weight_source": "corrected"},
        "improve": {"data_path": str(assets / "pref.jsonl"), "mask_fraction": 0.5},
    }
    for key, value in extra.items():
        sections[key] = {**sections[key], **value} if key in sections else value
    return write_config(assets, out, {"stage": 0}, **{"save_steps": 1, "save_total_limit": 3, **sections})


def cli_env(tmpdir: Path | None = None, **extra: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "ALLO_KERNELS_BACKEND": "native",  # torch ops + the native optimizer, as a plain CPU run (not the interpreter)
        **extra,
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return env


def run_cli(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "allo_train.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=cli_env(**env),
        timeout=timeout,
        preexec_fn=lambda: os.umask(0o022),
    )


def weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def train_steps(out: Path) -> list[int]:
    from allo_train.metrics import read_metrics

    return [r["step"] for r in read_metrics(out / "forget" / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def straight(assets, tmp_path_factory):
    """An uninterrupted run, started with --resume on an empty directory, in a private TMPDIR."""
    base = tmp_path_factory.mktemp("straight")
    out, tmpdir = base / "out", base / "tmpdir"
    tmpdir.mkdir()
    r = run_cli("forget", "--config", str(forget_config(assets, out)), "--resume", tmpdir=tmpdir)
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r, tmpdir


@pytest.fixture(scope="module")
def crashed(assets, tmp_path_factory):
    """A run killed (hard exit) after optimizer step 3: checkpoints 1, 2, 3 and metrics for steps 1-3."""
    out = tmp_path_factory.mktemp("crashed") / "out"
    r = run_cli("forget", "--config", str(forget_config(assets, out)), ALLO_TRAIN_CRASH_AFTER="forget:3")
    assert r.returncode == 17, r.stderr[-4000:]
    names = sorted(p.name for p in (out / "forget" / "checkpoints").iterdir())
    assert names == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert not (out / "forget" / "model").exists()
    return out


def copy_run(assets: Path, src: Path, dst: Path, **extra) -> Path:
    """A copy of run ``src`` in ``dst`` with its own config; returns the config path."""
    shutil.copytree(src, dst)
    return forget_config(assets, dst, **extra)


def test_resume_without_a_checkpoint_says_so_and_leaves_no_rendezvous_file(assets, straight):
    out, r, tmpdir = straight
    notes = [line for line in r.stdout.splitlines() if "no complete checkpoint" in line]
    assert notes == [
        f"[allo-train] forget: --resume: no complete checkpoint in {out}/forget/checkpoints; training from step 0"
    ]
    assert train_steps(out) == [1, 2, 3, 4]
    # Issue 11.9: no /tmp/allo-pg-* rendezvous file, and the final model has the usual modes (umask 022).
    assert not list(tmpdir.glob("allo-pg-*"))
    model = out / "forget" / "model"
    assert model.stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in model.iterdir())
    done = json.loads((out / "forget" / "stage_done.json").read_text())
    assert (done["stage"], done["output"], done["sparsity"]) == ("forget", "model", "delta")  # row masks, unset
    # One process, ZeRO stage 0, row deltas: the optimizer steps the fp32 deltas themselves (no master copy), each
    # has a gradient of its size, and AdamW keeps two fp32 moments per element and a step counter per delta.
    from allo_train.locate import load_masks

    base = weights(assets / "base")
    rows = {n: int(m.sum()) for n, m in load_masks(out / "locate").items() if m.any()}
    n_sel = sum(k * base[n].shape[1] for n, k in rows.items())
    state = {"gradients": 4 * n_sel, "master": 0, "optimizer_state": 8 * n_sel + 4 * len(rows)}
    assert done["trainable_state_bytes"] == state


def test_flipped_byte_is_named_and_the_newest_good_checkpoint_resumes(assets, straight, crashed, tmp_path):
    out = tmp_path / "out"
    cfg = copy_run(assets, crashed, out)
    states = out / "forget" / "checkpoints" / "checkpoint-3" / MODEL_STATES
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit inside the saved tensors
    states.write_bytes(bytes(data))
    with open(out / "forget" / "metrics.jsonl", "a") as f:
        f.write('{"stage": "forget", "step": 4, "lo')  # the torn last line of a crash
    r = run_cli("forget", "--config", str(cfg), "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    assert (
        f"[allo-train] forget: checkpoint-3 fails verification ({MODEL_STATES}: sha256 differs from the manifest"
        in r.stdout
    )
    assert "[allo-train] forget: resuming from checkpoint-2, the newest checkpoint that verifies" in r.stdout
    assert "resumed from" in r.stdout and "checkpoint-2 at step 2" in r.stdout
    assert_same_weights(straight[0] / "forget" / "model", out / "forget" / "model")
    # Issue 11.7: the torn line and the records after checkpoint 2 are gone; every step once.
    assert train_steps(out) == [1, 2, 3, 4]


def test_broken_checkpoints_are_each_named_and_the_run_stops(assets, crashed, tmp_path):
    out = tmp_path / "out"
    cfg = copy_run(assets, crashed, out)
    ckpts = out / "forget" / "checkpoints"
    (ckpts / "checkpoint-3" / MODEL_STATES).unlink()
    states2 = ckpts / "checkpoint-2" / MODEL_STATES
    states2.write_bytes(states2.read_bytes()[: states2.stat().st_size // 2])
    state1 = ckpts / "checkpoint-1" / "trainer_state.json"
    state1.write_bytes(b"\xe9" * state1.stat().st_size)  # Latin-1 garbage of the right size
    r = run_cli("forget", "--config", str(cfg), "--resume")
    assert r.returncode == 2, r.stderr[-4000:]
    assert "Traceback" not in r.stderr
    (error,) = [line for line in r.stderr.splitlines() if line.startswith("allo-train: error:")]
    assert f"no checkpoint in {ckpts} verifies" in error
    assert f"checkpoint-3: {MODEL_STATES}: missing" in error
    assert f"checkpoint-2: {MODEL_STATES}: {states2.stat().st_size} bytes, the manifest says" in error
    assert "checkpoint-1: trainer_state.json: sha256 differs from the manifest" in error
    assert not (out / "forget" / "model").exists()


def test_resume_under_another_config_lists_the_keys_unless_allowed(assets, straight, crashed, tmp_path):
    out = tmp_path / "out"
    cfg = copy_run(assets, crashed, out)
    r = run_cli("forget", "--config", str(cfg), "--resume", "learning_rate=5e-4", "logging_steps=2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-4000:]
    (error,) = [line for line in r.stderr.splitlines() if line.startswith("allo-train: error:")]
    assert "checkpoint-3 was written under other training settings" in error
    assert "forget.learning_rate: 0.002 (checkpoint) -> 0.0005 (now)" in error
    assert "logging_steps" not in error  # not a training setting
    assert "--allow-config-change" in error
    assert not (out / "forget" / "model").exists()

    r = run_cli("forget", "--config", str(cfg), "--resume", "learning_rate=5e-4", "--allow-config-change")
    assert r.returncode == 0, r.stderr[-4000:]
    assert (
        "[allo-train] forget: resuming checkpoint-3 under a changed config (--allow-config-change): "
        "forget.learning_rate: 0.002 (checkpoint) -> 0.0005 (now)" in r.stdout
    )
    assert train_steps(out) == [1, 2, 3, 4]


def test_kill_between_the_renames_of_the_final_model_is_not_a_finished_stage(assets, straight, tmp_path):
    out = tmp_path / "out"
    cfg = copy_run(assets, straight[0], out)
    # Train the stage again; killed after the finished model was moved aside and before the new one is renamed in.
    r = run_cli("forget", "--config", str(cfg), ALLO_TRAIN_CRASH_AT="swap:old-moved-aside")
    assert r.returncode == 17, r.stderr[-4000:]
    assert not (out / "forget" / "model").exists()
    assert not (out / "forget" / "stage_done.json").exists()
    (backup,) = (out / "forget").glob(".tmp-old-model-*")
    assert_same_weights(straight[0] / "forget" / "model", backup)  # the old model was kept whole
    r = run_cli("pipeline", "--config", str(cfg), "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "already finished" not in r.stdout
    assert "resumed from" in r.stdout
    assert_same_weights(straight[0] / "forget" / "model", out / "forget" / "model")
    assert (out / "forget" / "stage_done.json").is_file()
    assert not list((out / "forget").glob(".tmp-*"))
    r = run_cli("pipeline", "--config", str(cfg), "--resume")
    assert r.returncode == 0 and "[allo-train] forget: already finished" in r.stdout


def test_a_second_run_on_the_same_output_dir_stops_and_names_the_first(assets, tmp_path):
    from allo_train.lock import LOCK_FILE, OutputDirLock

    out = tmp_path / "out"
    cfg = forget_config(assets, out, max_steps=100000, save_steps=100000, logging_steps=100000)
    first = subprocess.Popen(
        [sys.executable, "-m", "allo_train.cli", "forget", "--config", str(cfg)],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert first.poll() is None, "the first run ended early"
            assert time.monotonic() < deadline, "the first run never took the lock"
            try:
                if json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        first.send_signal(signal.SIGSTOP)  # paused: it keeps its lock and leaves the CPU to the second run
        r = run_cli("forget", "--config", str(cfg), timeout=240)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-4000:]
        (error,) = [line for line in r.stderr.splitlines() if line.startswith("allo-train: error:")]
        assert f"output_dir {out} is in use by another allo-train run (pid {first.pid} on host" in error
        assert socket.gethostname() in error and "started 20" in error and "allo_train.cli forget --config" in error
        assert first.poll() is None  # the first run is alive, holding its lock
        with pytest.raises(Exception, match="in use"):
            OutputDirLock(out).acquire()
    finally:
        first.kill()  # SIGKILL (a stopped process dies too): the operating system releases the lock
        first.wait()
    OutputDirLock(out).acquire().release()


def test_full_disk_is_named_with_the_path(assets, tmp_path):
    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        out = mnt / "out"
        cfg = forget_config(assets, out)
        st = os.statvfs(mnt)
        (out / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 150_000))  # a checkpoint needs ~220 kB
        r = run_cli("forget", "--config", str(cfg))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-4000:]
        (error,) = [line for line in r.stderr.splitlines() if line.startswith("allo-train: error:")]
        tmp_ckpt = out / "forget" / "checkpoints" / ".tmp-checkpoint-1"
        assert f"no space left on device while writing checkpoint 1 into {tmp_ckpt}" in error
        assert not tmp_ckpt.exists()  # the partial checkpoint gave its space back
        assert (out / "filler").is_file()  # nothing of the user's was touched
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_masks_without_lm_head_embeddings_and_norms_are_refused(assets, tmp_path):
    from safetensors.torch import save_file

    from allo_train.locate import load_masks

    out = tmp_path / "out"
    cfg = forget_config(assets, out)
    masks = load_masks(out / "locate")
    decoder_only = {k: v for k, v in masks.items() if "layers." in k and "norm" not in k}
    save_file(decoder_only, str(out / "locate" / "masks.safetensors"))
    r = run_cli("forget", "--config", str(cfg))
    assert r.returncode != 0
    n_missing = len(masks) - len(decoder_only)
    assert f"masks file {out}/locate/masks.safetensors: no mask for {n_missing} parameter(s) of the model" in r.stderr
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert name in r.stderr
    assert not (out / "forget" / "model").exists()


def test_a_stage_saves_the_masks_it_trained(assets, tmp_path):
    from allo_train.config import DEFAULT_EXCLUDE
    from allo_train.locate import load_importance, load_masks, select_masks

    out = tmp_path / "out"
    cfg = forget_config(assets, out, pipeline={"stages": ["improve"]}, improve={"ratio": 0.3}, max_steps=2)
    r = run_cli("pipeline", "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-4000:]
    saved = load_masks(out / "improve" / "model")
    expected = select_masks(
        load_importance(out / "locate" / "importance.safetensors"),
        ratio=0.3,
        granularity="row",
        exclude=DEFAULT_EXCLUDE,
    )
    located = load_masks(out / "locate")
    assert saved.keys() == expected.keys() == located.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert sum(int(m.sum()) for m in saved.values()) > sum(int(m.sum()) for m in located.values())
    base, trained = weights(assets / "base"), weights(out / "improve" / "model")
    for name, m in saved.items():  # trained exactly where the saved masks say
        sel = m.view(-1, *([1] * (base[name].dim() - 1))).expand_as(base[name])
        assert torch.equal(trained[name][~sel], base[name][~sel]), name


ENGINE_MASKS = """
import torch
from allo_train.engine import deepspeed_config, init_distributed, initialize

init_distributed()
ds = deepspeed_config(None, micro_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=1.0, bf16=False)
kw = dict(ds_config=ds, learning_rate=1e-3, weight_decay=0.0, lr_scheduler_type="constant", total_steps=2)
kw["warmup_steps"] = 0
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
try:
    initialize(model, masks={"0.weight": torch.ones(4, 8, dtype=torch.bool)}, **kw)  # all-True, transposed
except ValueError as e:
    print("shape:", e)
masks = {"0.weight": torch.tensor([True] * 3 + [False] * 5)}  # only one parameter has a mask
initialize(model, masks=masks, **kw)
print("trained:", sorted(n for n, p in model.named_parameters() if p.requires_grad))
"""


def test_engine_freezes_parameters_without_a_mask_and_checks_shapes_first(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", ENGINE_MASKS], cwd=ROOT, env=cli_env(tmpdir=tmp_path), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith(("shape:", "trained:"))]
    assert lines == [
        "shape: mask '0.weight' has shape (4, 8) but the parameter has shape (8, 4): a mask must have the "
        "parameter's shape (elements) or (8,) (rows)",
        "trained: ['0.weight']",
    ]
    assert not list(tmp_path.glob("allo-pg-*"))  # no rendezvous file
