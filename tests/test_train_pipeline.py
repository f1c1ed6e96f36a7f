"""End-to-end allo_train runs: 2 ranks, gloo on 127.0.0.1, a tiny randomly initialised Llama, CPU.

warmup -> locate -> forget -> improve at ZeRO-2, ZeRO-3 and ZeRO-2 with optimizer offload, forget and improve in delta
mode (row masks, ``sparsity`` unset: row deltas, a stock torch AdamW): parameters outside the located neurons stay
bit-identical through forget and improve after the merge, selected ones change, metrics are written, the saved model
loads with ``from_pretrained`` and ``deltas.safetensors`` put onto the stage's starting model gives it bit for bit;
at ZeRO-3 and with offload the improve stage resumed from its mid-run checkpoint ends as the uninterrupted run. A run
killed mid-stage (ZeRO-2, forget) and resumed ends with the same weights as an uninterrupted run. Masked mode
(SparseAdamW) runs in the single-rank scoring-model test. The sft stage (its loss: fused_linear_cross_entropy, the
gradients made in the forward) trains the same weights at ZeRO-3 as at ZeRO-0.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    from allo_train.model import build_tiny_llama
    from allo_train.tokenizer import build_char_tokenizer

    d = tmp_path_factory.mktemp("assets")
    tok = build_char_tokenizer(save_dir=d / "tok")
    build_tiny_llama(tok, d / "base", hidden_size=32, num_layers=2, num_heads=2, seed=0)
    r = random.Random(0)
    with open(d / "pref.jsonl", "w") as f, open(d / "forget.jsonl", "w") as g:
        for _ in range(16):
            a, b = r.randint(1, 60), r.randint(1, 60)
            good, bad = str(a + b), str(a + b + r.randint(1, 9))
            f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": good, "rejected": bad}) + "\n")
            g.write(json.dumps({"prompt": f"{a}+{b}=", "rejected": bad, "corrected": good}) + "\n")
    return d


def write_config(assets: Path, out: Path, zero: dict, **extra) -> Path:
    cfg = {
        "model_name_or_path": str(assets / "base"),
        "output_dir": str(out),
        "learning_rate": 2e-3,
        "per_device_train_batch_size": 2,
        "max_steps": 4,
        "logging_steps": 1,
        "save_steps": 2,
        "max_length": 24,
        "max_prompt_length": 12,
        "eval_fraction": 0.25,
        "lr_scheduler_type": "constant",
        "deepspeed": {"zero_optimization": zero},
        "warmup": {"data_path": str(assets / "pref.jsonl")},
        "locate": {"ratio": 0.1, "granularity": "row"},
        "forget": {"data_path": str(assets / "forget.jsonl"), "token_weight_source": "corrected"},
        "improve": {"data_path": str(assets / "pref.jsonl"), "mask_fraction": 0.5},
        **extra,
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, *args: str, world_size: int = 2, env_extra: dict | None = None, timeout: int = 420):
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            **(env_extra or {}),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "allo_train.cli", "pipeline", "--config", str(config), *args],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], outs


def weights(model_dir: Path) -> dict:
    return load_file(str(model_dir / "model.safetensors"))


def expanded(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask if mask.shape == like.shape else mask.view(-1, *([1] * (like.dim() - 1))).expand_as(like)


def check_sparse_updates(assets: Path, out: Path, *, stages=("forget", "improve"), sparsity: str = "delta") -> None:
    from allo_train.locate import load_masks

    base = weights(assets / "base")
    masks = load_masks(out / "locate")
    assert set(masks) == set(base)
    n_selected = sum(int(expanded(m, base[k]).sum()) for k, m in masks.items())
    assert n_selected > 0
    for stage in stages:
        w = weights(out / stage / "model")
        changed_selected = 0
        for name, b in base.items():
            sel = expanded(masks[name], b)
            assert torch.equal(w[name][~sel], b[~sel]), f"{stage}: unselected entries of {name} changed"
            changed_selected += int((w[name][sel] != b[sel]).sum())
        assert changed_selected > n_selected // 2, f"{stage}: only {changed_selected}/{n_selected} selected changed"
        assert (out / stage / "model" / "masks.safetensors").is_file()
        done = json.loads((out / stage / "stage_done.json").read_text())
        assert done["sparsity"] == sparsity
        state = done["trainable_state_bytes"]  # rank 0's: the deltas' gradients, master and Adam state, or more
        dense = sum(b.numel() for k, b in base.items() if masks[k].any())  # the selected matrices, whole
        if sparsity == "delta":  # 2 ranks: half the deltas each (ZeRO pads partitions a little), fp32 master too
            assert 4 * n_selected <= 2 * state["gradients"] < 4 * n_selected + 4096
            assert state["master"] == state["gradients"]
            assert 8 * n_selected <= 2 * state["optimizer_state"] < 8 * n_selected + 8192
        else:  # one rank, stage 0: SparseAdamW steps the selected matrices themselves, with compact Adam state
            assert state["gradients"] == 4 * dense and state["master"] == 0
            assert 8 * n_selected <= state["optimizer_state"] < 8 * n_selected + 4096
        assert (out / stage / "model" / "deltas.safetensors").is_file() == (sparsity == "delta")
    warm = weights(out / "warmup" / "model")
    assert all(not torch.equal(warm[k], base[k]) for k in base if "layers.0.mlp" in k)  # warm-up is dense
    for stage in ("warmup", *stages):
        rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if "loss" in r]
        assert [r["step"] for r in train] == [1, 2, 3, 4]
        assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in train)  # finite, positive
        assert any("eval/loss" in r for r in rows)
        if stage != "forget":
            assert "rewards/accuracies" in train[0] and "eval/rewards/accuracies" in rows[-1]
        assert (out / stage / f"loss_{stage}.png").is_file()
    assert (out / "locate" / "mask_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def check_delta_outputs(assets: Path, out: Path) -> None:
    """The saved models load as plain Hugging Face models; each stage's deltas.safetensors put onto the model it
    started from (forget: base; improve: forget's) and merged gives the saved weights bit for bit."""
    from transformers import AutoModelForCausalLM

    import allo_kernels as ak

    for stage, start in (("forget", assets / "base"), ("improve", out / "forget" / "model")):
        saved = weights(out / stage / "model")
        loaded = AutoModelForCausalLM.from_pretrained(out / stage / "model")
        assert loaded.state_dict().keys() == saved.keys()  # no delta left in the model
        assert all(torch.equal(t, saved[k]) for k, t in loaded.state_dict().items())
        rebuilt = AutoModelForCausalLM.from_pretrained(start)
        attached = ak.load_row_deltas(rebuilt, out / stage / "model" / "deltas.safetensors")
        assert attached and ak.merge_row_deltas(rebuilt) == list(attached)
        assert all(torch.equal(t, saved[k]) for k, t in rebuilt.state_dict().items()), stage


@pytest.mark.parametrize(
    "name,zero,resume",
    [
        ("zero2", {"stage": 2}, False),  # killed and resumed: test_killed_and_resumed_run_matches_uninterrupted
        ("zero3", {"stage": 3}, True),
        ("zero2_offload", {"stage": 2, "offload_optimizer": {"device": "cpu"}}, True),
    ],
)
def test_pipeline_two_ranks(assets, tmp_path, name, zero, resume):
    out = tmp_path / name
    codes, logs = launch(write_config(assets, out, zero))
    assert codes == [0, 0], logs[0][-4000:] + logs[1][-4000:]
    assert "[allo-train] forget: sparsity delta: row deltas on" in logs[0]
    check_sparse_updates(assets, out)
    check_delta_outputs(assets, out)
    if not resume:
        return
    # improve again from its checkpoint at step 2 (of 4), as a run killed after it would: the deltas, their Adam
    # state and the data order come back from the checkpoint, and the end is the uninterrupted run's, bit for bit.
    uninterrupted = shutil.move(out / "improve" / "model", tmp_path / "improve_uninterrupted")
    (out / "improve" / "stage_done.json").unlink()
    codes, logs = launch(write_config(assets, out, zero), "--resume")
    assert codes == [0, 0], logs[0][-4000:] + logs[1][-4000:]
    assert "forget: already finished" in logs[0] and "improve: resumed from" in logs[0], logs[0][-4000:]
    assert "checkpoint-2 at step 2" in logs[0]
    for f in ("model.safetensors", "deltas.safetensors"):
        a, b = load_file(str(Path(uninterrupted) / f)), load_file(str(out / "improve" / "model" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


RESUME_STAGES = {"pipeline": {"stages": ["warmup", "locate", "forget"]}, "save_steps": 1}
CRASH = "ALLO_TRAIN_CRASH_AFTER"  # test hook of allo_train.stages: hard exit after the given step


@pytest.fixture(scope="module")
def straight_zero2(assets, tmp_path_factory):
    """An uninterrupted 2-rank ZeRO-2 run of warmup -> locate -> forget, checkpointing every step."""
    ref_out = tmp_path_factory.mktemp("straight_zero2") / "straight"
    codes, logs = launch(write_config(assets, ref_out, {"stage": 2}, **RESUME_STAGES))
    assert codes == [0, 0], logs[0][-4000:]
    return ref_out


@pytest.fixture(scope="module")
def crashed_zero2(assets, tmp_path_factory):
    """The same run killed (hard exit on both ranks) after optimizer step 2 of forget."""
    crash_out = tmp_path_factory.mktemp("crashed_zero2") / "crashed"
    codes, _ = launch(write_config(assets, crash_out, {"stage": 2}, **RESUME_STAGES), env_extra={CRASH: "forget:2"})
    assert codes == [17, 17]
    assert not (crash_out / "forget" / "model").exists()
    assert sorted(p.name for p in (crash_out / "forget" / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    return crash_out


def copy_of(assets: Path, run: Path, out: Path) -> Path:
    """A copy of ``run`` in ``out`` and the config for it."""
    shutil.copytree(run, out)
    return write_config(assets, out, {"stage": 2}, **RESUME_STAGES)


def test_killed_and_resumed_run_matches_uninterrupted(assets, straight_zero2, crashed_zero2, tmp_path):
    ref_out, crash_out = straight_zero2, tmp_path / "crashed"
    cfg = copy_of(assets, crashed_zero2, crash_out)
    codes, logs = launch(cfg, "--resume")
    assert codes == [0, 0], logs[0][-4000:]
    assert "warmup: already finished" in logs[0] and "resumed from" in logs[0]
    a, b = weights(ref_out / "forget" / "model"), weights(crash_out / "forget" / "model")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_corrupted_optimizer_shard_falls_back_to_the_previous_checkpoint(
    assets, straight_zero2, crashed_zero2, tmp_path
):
    """Issue 11.1 as reported: 512 garbage bytes in the middle of a ZeRO-2 optimizer shard of the newest checkpoint,
    then --resume. The shard is named, the previous checkpoint resumes, and the result is the uninterrupted one."""
    out = tmp_path / "crashed"
    cfg = copy_of(assets, crashed_zero2, out)
    rel = "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard = out / "forget" / "checkpoints" / "checkpoint-2" / rel
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 512] = random.Random(0).randbytes(512)
    shard.write_bytes(bytes(data))
    codes, logs = launch(cfg, "--resume")
    assert codes == [0, 0], logs[0][-4000:] + logs[1][-4000:]
    assert f"forget: checkpoint-2 fails verification ({rel}: sha256 differs from the manifest" in logs[0]
    assert "forget: resuming from checkpoint-1, the newest checkpoint that verifies" in logs[0]
    assert "checkpoint-1 at step 1" in logs[0] and "fails verification" not in logs[1]  # rank 0 speaks, once
    a, b = weights(straight_zero2 / "forget" / "model"), weights(out / "forget" / "model")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in (out / "forget" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "allo_train.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )


def test_cli_bad_config_key_is_named(assets, tmp_path):
    cfg = write_config(assets, tmp_path / "bad", {"stage": 0})
    r = run_cli("warmup", "--config", str(cfg), "improve.mask_fraction=1.5")
    assert r.returncode != 0 and "improve.mask_fraction" in r.stderr
    r = run_cli("warmup", "--config", str(cfg), "learning_rat=0.1")
    assert r.returncode != 0 and "learning_rat" in r.stderr


def test_cli_malformed_jsonl_names_file_and_line(assets, tmp_path):
    data = tmp_path / "broken.jsonl"
    lines = (assets / "pref.jsonl").read_text().splitlines()
    lines[2] = '{"prompt": "1+1=", "chosen": "2"'
    data.write_text("\n".join(lines) + "\n")
    cfg = write_config(assets, tmp_path / "broken", {"stage": 0}, warmup={"data_path": str(data)})
    r = run_cli("warmup", "--config", str(cfg))
    assert r.returncode != 0
    assert f"{data}:3" in r.stderr


def test_forget_with_scoring_model_weights_single_rank(assets, tmp_path):
    plain = tmp_path / "forget_plain.jsonl"
    plain.write_text(
        "".join(
            json.dumps({"prompt": json.loads(line)["prompt"], "rejected": json.loads(line)["rejected"]}) + "\n"
            for line in (assets / "forget.jsonl").read_text().splitlines()
        )
    )
    out = tmp_path / "scored"
    cfg = write_config(
        assets,
        out,
        {"stage": 0},
        pipeline={"stages": ["warmup", "locate", "forget"]},
        forget={
            "data_path": str(plain),
            "token_weight_source": "scoring_model",
            "scoring_model": str(assets / "base"),
            "sparsity": "masked",
        },
    )
    codes, logs = launch(cfg, world_size=1)
    assert codes == [0], logs[0][-4000:]
    assert "[allo-train] forget: sparsity masked: SparseAdamW over the selected parameters" in logs[0]
    check_sparse_updates(assets, out, stages=("forget",), sparsity="masked")
    rows = [json.loads(line) for line in (out / "forget" / "metrics.jsonl").read_text().splitlines()]
    weights_mean = [r["weights/mean"] for r in rows if "weights/mean" in r]
    # A random scoring model spreads probability over ~100 characters: weights 1 - p are close to, but below, 1.
    assert weights_mean and all(0.5 < w < 1.0 for w in weights_mean)


def test_sft_stage_at_zero3_trains_the_weights_of_zero0(assets, tmp_path):
    """The sft stage's loss is fused_linear_cross_entropy (gradients made in the forward, ZeRO-3's lm_head gathered
    for it and its full-size gradient reduce-scattered by DeepSpeed's hooks): 2 ranks at ZeRO-3 train the same
    weights as at ZeRO-0, and every weight moved."""
    models = {}
    for name, zero in (("zero0", {"stage": 0}), ("zero3", {"stage": 3})):
        out = tmp_path / name
        config = write_config(assets, out, zero)
        cfg = yaml.safe_load(config.read_text())
        for stage in ("warmup", "locate", "forget", "improve"):
            del cfg[stage]
        cfg["sft"] = {"data_path": str(assets / "pref.jsonl"), "completion_field": "chosen"}
        cfg["pipeline"] = {"stages": ["sft"]}
        config.write_text(yaml.safe_dump(cfg))
        codes, logs = launch(config)
        assert codes == [0, 0], logs[0][-3000:]
        models[name] = weights(out / "sft" / "model")
    base = weights(assets / "base")
    assert set(models["zero3"]) == set(models["zero0"]) == set(base)
    for name, w in models["zero3"].items():
        torch.testing.assert_close(w, models["zero0"][name], rtol=1e-4, atol=1e-5, msg=name)
        assert not torch.equal(w, base[name]), f"{name} did not move"
