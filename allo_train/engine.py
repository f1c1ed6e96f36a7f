"""Everything allo_train does with DeepSpeed: the process group, the engine's config, the engine with SparseAdamW
bound to it, the LR schedule, the final full weights and loading a checkpoint into the engine.

Launch with the ``deepspeed`` launcher or ``torchrun`` (they set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT); a
plain ``allo-train`` call runs as a single rank on 127.0.0.1. Without CUDA the gloo backend and DeepSpeed's CPU
accelerator are used.
"""

from __future__ import annotations

import copy
import math
import os

import torch

from allo_kernels.integrations.deepspeed import skip_shm_comm_build

from .checkpoint import CheckpointError

_DS_OWNED_KEYS = ("optimizer", "scheduler")
# Learning-rate schedules (HF names); every one starts with the linear warm-up of ``warmup_ratio`` when it is > 0.
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise the process group once; return (rank, world_size, device)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    alone = "MASTER_ADDR" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1"
    if alone:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "gloo":
            skip_shm_comm_build()  # serves inference only; its JIT build can hang on a stale lock file
        if alone:
            # A plain single-process run (no launcher): an in-memory store, so no port to race for and no
            # rendezvous file left in /tmp. DeepSpeed adopts an initialised default group as it is.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            verbose=False,
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def deepspeed_config(
    user: dict | None, *, micro_batch_size: int, gradient_accumulation_steps: int, max_grad_norm: float, bf16: bool
) -> dict:
    """The user's DeepSpeed config with the training fields that allo_train owns filled in.

    allo_train passes its own optimizer (SparseAdamW) and schedule, so an "optimizer"/"scheduler" section in the
    user's file is an error rather than something silently ignored; "auto" values (HF style) are replaced.
    """
    ds = copy.deepcopy(user or {})
    for key in _DS_OWNED_KEYS:
        if key in ds:
            raise ValueError(
                f"deepspeed.{key} is not supported: allo_train uses SparseAdamW and its own LR schedule "
                "(set learning_rate / lr_scheduler_type / weight_decay in the allo config instead)"
            )
    ds.setdefault("zero_optimization", {"stage": 0})
    if bf16 and int(ds["zero_optimization"].get("stage", 0)) == 0:
        raise ValueError(
            "config key 'deepspeed.zero_optimization.stage' must be >= 1 with bf16: SparseAdamW binds to "
            "ZeRO's fp32 partitions (DeepSpeed's stage-0 bf16 wrapper is not supported), got stage 0"
        )
    ds.pop("train_batch_size", None)
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds["gradient_accumulation_steps"] = gradient_accumulation_steps
    ds["gradient_clipping"] = float(max_grad_norm)
    if bf16:
        ds["bf16"] = {**(ds.get("bf16") if isinstance(ds.get("bf16"), dict) else {}), "enabled": True}
    elif isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") == "auto":
        ds["bf16"]["enabled"] = False
    if isinstance(ds.get("fp16"), dict) and ds["fp16"].get("enabled") == "auto":
        ds["fp16"]["enabled"] = False
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def lr_lambda(kind: str, *, total_steps: int, warmup_steps: int):
    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear

    return fn


def initialize(
    module: torch.nn.Module,
    *,
    ds_config: dict,
    learning_rate: float,
    weight_decay: float,
    masks: dict[str, torch.Tensor] | None,
    lr_scheduler_type: str,
    total_steps: int,
    warmup_steps: int,
):
    """deepspeed.initialize with SparseAdamW over the trainable parameters, bound to the engine (through
    ``allo_kernels.integrations.deepspeed.initialize``).

    masks: {parameter name: bool mask} (names as in ``module.named_parameters()``), or None to train every parameter
    densely. With masks, a parameter whose mask selects nothing, or that has no mask at all, is frozen
    (requires_grad=False), so ZeRO keeps no fp32 master, gradient or state for it; a mask whose shape is neither the
    parameter's nor ``(rows,)`` is a ValueError (checked before anything reads the mask). Returns the engine.
    """
    from allo_kernels.integrations import deepspeed as ak_deepspeed

    from .locate import check_mask_shape

    if masks is not None:
        trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
        for name, mask in masks.items():
            if name in trainable:
                check_mask_shape(name, mask, tuple(trainable[name].shape))
        if not any(bool(mask.any()) for name, mask in masks.items() if name in trainable):
            raise ValueError("the masks select no parameter at all: nothing to train (check locate.ratio / exclude)")
    schedule = lr_lambda(lr_scheduler_type, total_steps=total_steps, warmup_steps=warmup_steps)
    engine, _ = ak_deepspeed.initialize(
        module,
        config=ds_config,
        masks=masks,
        lr=learning_rate,
        weight_decay=weight_decay,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    return engine


def full_state_dict(engine) -> dict | None:
    """Full weights of the wrapped causal LM on rank 0 (ZeRO-3 partitions are gathered); None on other ranks."""
    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict() if torch.distributed.get_rank() == 0 else None
    if sd is None:
        return None
    return {k[len("lm.") :]: v.detach().cpu() for k, v in sd.items() if k.startswith("lm.")}


def load_engine_checkpoint(engine, ckpt) -> None:
    """``engine.load_checkpoint`` on the checkpoint's ``deepspeed/`` directory; a failure names the checkpoint (and
    DeepSpeed's silent "nothing loaded" becomes an error)."""
    where = ckpt.path / "deepspeed"
    try:
        loaded, _ = engine.load_checkpoint(str(where), tag="state")
    except Exception as e:
        raise CheckpointError(f"{where}: DeepSpeed could not load the checkpoint ({type(e).__name__}: {e})") from e
    if loaded is None:
        raise CheckpointError(f"{where}: DeepSpeed found no checkpoint 'state' to load")
