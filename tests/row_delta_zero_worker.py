"""Worker for tests/test_row_delta_zero.py: one rank of a 2-rank gloo DeepSpeed job training row deltas.

A tiny MLP gets row deltas on two layers and column deltas on the last one (its bias stays trainable, the other
biases frozen), and a stock ``torch.optim.AdamW`` trains them under ZeRO-0, 1, 2, 3 and ZeRO-2 with optimizer offload
(``CONFIGS``), with gradient clipping; and DeepSpeed's own C++ ``DeepSpeedCPUAdam`` (AdamW mode) under ZeRO-2 with
offload, built by ``allo_kernels.integrations.deepspeed.initialize(optimizer=DeepSpeedCPUAdam)``. Modes:

* ``crash``: per configuration, 2 steps and ``save_checkpoint`` (tag t2); then every engine keeps training (and
  writes ``<out>/ready<rank>`` after its first step past the checkpoints) until the test kills the processes.
* ``resume``: per configuration, an uninterrupted 4-step run, compared with a single-process plain-torch reference
  (the mean loss over both ranks' micro-batches, ``clip_grad_norm_``, torch's AdamW) and with the same reference at
  a slightly wrong learning rate (which every configuration must be far from); frozen weights checked
  bit-identical, then the merged model's unselected rows; and a fresh engine resumed from the crashed job's
  checkpoint for steps 3-4, compared bit for bit with the uninterrupted run (DeepSpeedCPUAdam: after
  :func:`replay_cpu_adam_steps`, and also without it, as a user resumes). Results: ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.pop("TRITON_INTERPRET", None)

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import allo_kernels as ak

OFFLOAD = {"stage": 2, "offload_optimizer": {"device": "cpu"}}
CONFIGS = {
    "0": {"stage": 0},
    "1": {"stage": 1},
    "2": {"stage": 2},
    "3": {"stage": 3},
    "2o": OFFLOAD,
    "2o-cpuadam": OFFLOAD,
}
# Configurations whose optimizer is DeepSpeed's C++ DeepSpeedCPUAdam (built through the adapter's initialize, as a
# user would); the others get a stock torch AdamW.
CPU_ADAM = {"2o-cpuadam"}
CLIP, LR, WD, STEPS, MICRO, CKPT_STEP = 0.05, 1e-2, 0.01, 4, 4, 2
WRONG_LR = 1e-4  # relative: the reference with lr * (1 + WRONG_LR), which every configuration must be far from


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 4))
    model.requires_grad_(False)
    model[4].bias.requires_grad_(True)  # a trainable parameter that is not a delta
    g = torch.Generator().manual_seed(1)
    rows = {"0.weight": torch.rand(24, generator=g) < 0.3, "2.weight": torch.rand(24, generator=g) < 0.3}
    cols = {"4.weight": torch.rand(24, generator=g) < 0.3}
    deltas = ak.attach_row_deltas(model, rows) | ak.attach_row_deltas(model, cols, axis=1)
    trainable = [*deltas.values(), model[4].bias]
    return model, trainable, rows | cols


def batch(step: int, world: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(MICRO * world, 16, generator=g), torch.randn(MICRO * world, 4, generator=g)


def make_optimizer(params, lr: float = LR):
    return torch.optim.AdamW(params, lr=lr, weight_decay=WD)


def reference(world: int, lr: float = LR) -> tuple[dict[str, torch.Tensor], list[float]]:
    model, params, _ = make_model()
    opt = make_optimizer(params, lr)
    norms = []
    for step in range(STEPS):
        x, y = batch(step, world)
        parts = [slice(r * MICRO, (r + 1) * MICRO) for r in range(world)]
        loss = sum(nn.functional.mse_loss(model(x[s]), y[s]) for s in parts) / world
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
        opt.step()
    return {n: t.clone() for n, t in model.state_dict().items()}, norms


def make_engine(cfg: str):
    import deepspeed

    model, params, masks = make_model()
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "zero_optimization": dict(CONFIGS[cfg], **({"stage3_param_persistence_threshold": 0} if cfg == "3" else {})),
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    if cfg in CPU_ADAM:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        from allo_kernels.integrations.deepspeed import initialize

        engine, _ = initialize(
            model, config=config, optimizer=DeepSpeedCPUAdam, lr=LR, weight_decay=WD, adamw_mode=True
        )
    else:
        engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(params), config=config)
    return engine, masks


def replay_cpu_adam_steps(engine) -> None:
    """Bring a freshly loaded DeepSpeedCPUAdam's C++ bias-correction state to where an uninterrupted run has it.

    The C++ optimizer keeps beta1**t and beta2**t itself: it multiplies them by beta at each step, but when its step
    jumps (the first step after a checkpoint load) it computes them with pow, which can differ in the last bit
    (float32 0.999**3 does), so the first resumed update differs from the uninterrupted one by a rounding error.
    Stepping its counter through 1..t on empty tensors (no element is touched) makes it multiply as the
    uninterrupted run did; everything else comes from the checkpoint. DeepSpeed-internal (``ds_opt_adam``)."""
    opt = engine.optimizer.optimizer
    (step,) = {int(state["step"]) for state in opt.state.values()}  # every partition was stepped together
    (group,) = opt.param_groups  # the C++ state is per optimizer: one group here, so one set of betas
    empty = torch.empty(0)
    for t in range(1, step + 1):
        hyper = (group["lr"], *group["betas"], group["eps"], group["weight_decay"], group["bias_correction"])
        opt.ds_opt_adam.adam_update(opt.opt_id, t, *hyper, empty, empty, empty, empty)


def resumed_run(args, cfg: str, world: int, rank: int, *, replay: bool) -> tuple[bool, dict[str, torch.Tensor]]:
    """A fresh engine loaded from the crashed job's checkpoint, trained for steps 3-4: (loaded, full state)."""
    engine, _ = make_engine(cfg)
    path, _ = engine.load_checkpoint(os.path.join(args.ckpt_from, "ckpt", cfg), tag=f"t{CKPT_STEP}")
    if replay:
        replay_cpu_adam_steps(engine)
    train(engine, range(CKPT_STEP, STEPS), world, rank)
    return path is not None, full_state(engine)


def train(engine, steps, world: int, rank: int) -> None:
    for step in steps:
        x, y = batch(step, world)
        part = slice(rank * MICRO, (rank + 1) * MICRO)
        engine.backward(nn.functional.mse_loss(engine(x[part]), y[part]))
        engine.step()


def full_state(engine) -> dict[str, torch.Tensor]:
    """The whole module state on every rank (ZeRO-3 parameters gathered)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return {n: t.detach().clone() for n, t in engine.module.state_dict().items()}


def crash(args, world: int, rank: int) -> None:
    engines = []
    for cfg in args.configs.split(","):
        engine, _ = make_engine(cfg)
        train(engine, range(CKPT_STEP), world, rank)
        engine.save_checkpoint(os.path.join(args.out, "ckpt", cfg), tag=f"t{CKPT_STEP}")
        engines.append(engine)
    step = CKPT_STEP
    while True:  # mid-run after the checkpoints, until killed
        for engine in engines:
            train(engine, [step], world, rank)
        if step == CKPT_STEP:
            Path(args.out, f"ready{rank}").write_text("ready")
        step += 1
        time.sleep(0.05)


def resume(args, world: int, rank: int) -> None:
    init_model, _, _ = make_model()
    init = {n: t.clone() for n, t in init_model.state_dict().items()}
    want, norms = reference(world)
    wrong, _ = reference(world, lr=LR * (1 + WRONG_LR))
    results = {}
    for cfg in args.configs.split(","):
        engine, masks = make_engine(cfg)
        train(engine, range(STEPS), world, rank)
        got = full_state(engine)
        res = {"max_err_vs_reference": max(float((got[n] - w).abs().max()) for n, w in want.items())}
        res["max_err_vs_wrong_lr_reference"] = max(float((got[n] - w).abs().max()) for n, w in wrong.items())
        res["reference_grad_norms"] = norms
        frozen = [n for n, p in init_model.named_parameters() if not p.requires_grad]
        res["frozen_bit_identical"] = all(torch.equal(got[n], init[n]) for n in frozen)
        merged, _, _ = make_model()
        merged.load_state_dict(got)
        ak.merge_row_deltas(merged)
        final = merged.state_dict()
        unselected_ok, changed = True, 0
        for name, m in masks.items():
            keep = m.view(-1, 1) if name != "4.weight" else m.view(1, -1)
            keep = keep.expand_as(init[name])
            unselected_ok &= torch.equal(final[name][~keep], init[name][~keep])
            changed += int((final[name][keep] != init[name][keep]).sum())
        res["unselected_bit_identical_after_merge"] = unselected_ok
        res["selected_changed"] = changed
        res["selected_total"] = sum(int(m.sum()) * (24 if n != "4.weight" else 4) for n, m in masks.items())
        res["loaded"], again = resumed_run(args, cfg, world, rank, replay=cfg in CPU_ADAM)
        res["resume_bit_identical"] = all(torch.equal(again[n], got[n]) for n in got)
        if cfg in CPU_ADAM:  # as a user resumes: only DeepSpeedCPUAdam's own bias-correction rounding may differ
            loaded, plain = resumed_run(args, cfg, world, rank, replay=False)
            res["loaded"] &= loaded
            res["resume_max_err_without_replay"] = max(float((plain[n] - got[n]).abs().max()) for n in got)
        results[cfg] = res
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(results))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("crash", "resume"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt-from", help="resume: the crashed job's --out")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    import deepspeed

    from allo_kernels.integrations.deepspeed import skip_shm_comm_build

    skip_shm_comm_build()  # a training job never uses it; see its docstring
    deepspeed.init_distributed(dist_backend="gloo")
    import deepspeed.comm as dist

    (crash if args.mode == "crash" else resume)(args, dist.get_world_size(), dist.get_rank())


if __name__ == "__main__":
    main()
