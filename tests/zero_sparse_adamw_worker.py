"""Worker for tests/test_zero_sparse_adamw.py: one rank of a gloo DeepSpeed job running several ZeRO configurations.

Every configuration trains a tiny MLP with SparseAdamW (row masks, an element mask, dense biases, and one all-false
mask that zero_param_groups drops) for 4 steps with gradient clipping, and compares with a single-process plain-torch
reference: grads of the mean loss over both ranks' micro-batches, unselected grads masked_fill'ed to 0,
clip_grad_norm_, torch.optim.AdamW, unselected entries restored. It then checks checkpoint save at step 2 + resume in a
fresh engine gives bit-identical weights, and that export_state() (merged over ranks) equals the reference's Adam
state on the selected entries. Results go to <out>/rank<r>.json; with --import-from, a world-size-1 job loads an
export written by a 2-rank job and checks it against the reference state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.pop("TRITON_INTERPRET", None)

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from allo_kernels.integrations.deepspeed import binding_of
from allo_kernels.optim import SparseAdamW, zero_param_groups

CLIP = 0.05
LR = 1e-2
WD = 0.1
STEPS = 4
MICRO = 4


def make_model_and_masks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    )
    g = torch.Generator().manual_seed(1)
    masks_by_name = {
        "0.weight": torch.rand(16, generator=g) < 0.4,  # rows
        "2.weight": torch.rand(16, 16, generator=g) < 0.15,  # elements
        "4.weight": torch.tensor([True, False, True, False]),  # rows
        "2.bias": torch.zeros(16, dtype=torch.bool),  # all-false: dropped by zero_param_groups
    }
    return model, masks_by_name


def data(step, world):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(MICRO * world, 16, generator=g)
    y = torch.randn(MICRO * world, 4, generator=g)
    return x, y


def build_groups(model, masks_by_name):
    params = dict(model.named_parameters())
    decay = [params[n] for n in ("0.weight", "2.weight", "4.weight")]
    no_decay = [params[n] for n in ("0.bias", "4.bias")]
    frozen_group = [params["2.bias"]]
    masks = {params[n]: m for n, m in masks_by_name.items()}
    groups = [
        {"params": decay, "weight_decay": WD},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": frozen_group, "weight_decay": 0.0},
    ]
    return zero_param_groups(groups, masks)


def reference(world):
    model, masks_by_name = make_model_and_masks()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups, masks = build_groups(model, masks_by_name)
    opt = torch.optim.AdamW([dict(g) for g in groups], lr=LR)
    names = {id(p): n for n, p in model.named_parameters()}
    trace, norms = [], []
    for step in range(STEPS):
        x, y = data(step, world)
        loss = (
            sum(
                torch.nn.functional.mse_loss(model(x[r * MICRO : (r + 1) * MICRO]), y[r * MICRO : (r + 1) * MICRO])
                for r in range(world)
            )
            / world
        )
        opt.zero_grad()
        loss.backward()
        for p, m in masks.items():
            keep = m if m.shape == p.shape else m.view(-1, *([1] * (p.dim() - 1)))
            p.grad.masked_fill_(~keep.expand(p.shape), 0)
        norms.append(float(torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], CLIP)))
        opt.step()
        with torch.no_grad():
            for p, m in masks.items():
                keep = (m if m.shape == p.shape else m.view(-1, *([1] * (p.dim() - 1)))).expand(p.shape)
                p.copy_(torch.where(keep, p, init[names[id(p)]]))
        trace.append({n: p.detach().clone() for n, p in model.named_parameters()})
    state = {names[id(p)]: {k: v.clone() for k, v in opt.state[p].items()} for p in opt.state}
    return init, trace, state, {names[id(p)]: m for p, m in masks.items()}, norms


def ds_config(stage, offload):
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    if stage == 3:
        zero.update({"stage3_param_persistence_threshold": 0, "sub_group_size": 300})
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def make_engine(stage, offload, backend):
    import deepspeed

    model, masks_by_name = make_model_and_masks()
    groups, masks = build_groups(model, masks_by_name)
    opt = SparseAdamW(groups, lr=LR, masks=masks, backend=backend)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, offload))
    opt.bind(engine)
    return engine, opt


def full_params(engine, stage):
    import deepspeed

    params = list(engine.module.named_parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in params}


def train(engine, steps, world, rank):
    for step in steps:
        x, y = data(step, world)
        xs, ys = x[rank * MICRO : (rank + 1) * MICRO], y[rank * MICRO : (rank + 1) * MICRO]
        loss = torch.nn.functional.mse_loss(engine(xs), ys)
        engine.backward(loss)
        engine.step()


def run_config(stage, offload, backend, ref, world, rank, ckpt_root):
    import deepspeed.comm as dist

    init, trace, ref_state, ref_masks, norms = ref
    res = {"ref_grad_norms": norms}
    engine, opt = make_engine(stage, offload, backend)
    train(engine, range(2), world, rank)
    ckpt = os.path.join(ckpt_root, f"s{stage}{'o' if offload else ''}")
    engine.save_checkpoint(ckpt, tag="t2")
    train(engine, range(2, STEPS), world, rank)
    got = full_params(engine, stage)
    want = trace[-1]
    err, unselected_ok = 0.0, True
    for n, w in want.items():
        err = max(err, (got[n] - w).abs().max().item())
        if n in ref_masks:
            m = ref_masks[n]
            keep = (m if m.shape == w.shape else m.view(-1, *([1] * (w.dim() - 1)))).expand(w.shape)
            unselected_ok &= bool(torch.equal(got[n][~keep], init[n][~keep]))
    res["max_abs_err"] = err
    res["unselected_bit_identical"] = unselected_ok
    # compact state: the rows this rank holds, and all ranks together
    res["state_elems_local"] = sum(
        int(opt.state[f]["exp_avg"].numel()) for f in binding_of(opt).flat_params if "exp_avg" in opt.state.get(f, {})
    )
    exported = opt.export_state()
    st_err = 0.0
    selected_total = 0
    for n, rec in exported.items():
        rs = ref_state[n]
        for k in ("exp_avg", "exp_avg_sq"):
            st_err = max(st_err, (rec[k] - rs[k].reshape(-1)[rec["index"]]).abs().max().item() if rec[k].numel() else 0)
        res.setdefault("export_steps", []).append(rec["step"])
        if n in ref_masks:
            selected_total += int(rec["index"].numel())
    res["export_state_err"] = st_err
    res["export_masked_elems"] = selected_total
    if rank == 0 and stage == 2 and not offload:
        torch.save(exported, os.path.join(ckpt_root, "export_s2.pt"))
    # resume in a fresh engine from the step-2 checkpoint
    engine2, _opt2 = make_engine(stage, offload, backend)
    engine2.load_checkpoint(ckpt, tag="t2")
    train(engine2, range(2, STEPS), world, rank)
    got2 = full_params(engine2, stage)
    res["resume_bit_identical"] = all(torch.equal(got2[n], got[n]) for n in got)
    dist.barrier()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default="0,1,2,3,2o")
    ap.add_argument("--backend", default="native")
    ap.add_argument("--import-from", default=None)
    args = ap.parse_args()
    import deepspeed

    from allo_kernels.integrations.deepspeed import skip_shm_comm_build

    skip_shm_comm_build()  # a training job never uses it; see its docstring
    deepspeed.init_distributed(dist_backend="gloo")
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    if args.import_from:  # world-size change: import an export made by the 2-rank job
        _, _, ref_state, _, _ = reference(2)
        _engine, opt = make_engine(2, False, args.backend)
        opt.import_state(torch.load(args.import_from))
        exported = opt.export_state()
        err = 0.0
        for n, rec in exported.items():
            for k in ("exp_avg", "exp_avg_sq"):
                err = max(err, (rec[k] - ref_state[n][k].reshape(-1)[rec["index"]]).abs().max().item())
        results["import"] = {"err": err, "names": sorted(exported)}
    else:
        ref = reference(world)
        root = args.out if rank == 0 else None
        with tempfile.TemporaryDirectory():
            ckpt_root = os.path.join(args.out, "ckpt")
            for cfg in args.configs.split(","):
                stage, offload = int(cfg[0]), cfg.endswith("o")
                results[cfg] = run_config(stage, offload, args.backend, ref, world, rank, ckpt_root)
        del root
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
