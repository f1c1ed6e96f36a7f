"""The training loop: one stage of the table (stages.py) trained with DeepSpeed, and the pipeline of stages.

Every training stage reads its starting model, trains it with DeepSpeed (the selected neurons as row deltas with a
stock AdamW, or SparseAdamW bound to the engine: the stage's ``sparsity``, see sparsity.py; losses on hidden states
through the fused-linear kernels; reference log-probs from the on-disk cache), checkpoints atomically every
``save_steps`` and writes ``<output_dir>/<stage>/model`` (weights, tokenizer, the masks it trained, the row deltas)
at the end; then, and only then, ``<output_dir>/<stage>/stage_done.json`` marks the stage finished (a resumed
pipeline skips it). :func:`train_stage` is five named steps:

    prepare_stage       tokenizer, data (train / held-out), starting model, masks and sparsity (row deltas attached),
                        settings, the checkpoint to resume
    build_engine        the DeepSpeed engine with the optimizer over the trainable parameters, LR schedule
    reference_logprobs  per-token log-probs of the starting policy, computed once and cached (needs_reference)
    train_loop          batch -> policy outputs -> the stage's loss -> backward -> step; logs, evaluation, checkpoints
    finish_stage        final weights (deltas merged) saved atomically with the tokenizer, masks and deltas, curves
                        plotted, stage marked done with its sparsity and training-state bytes

On ``--resume`` a stage picks the newest checkpoint that verifies against its manifest and whose training settings
match the config (see :func:`resume_checkpoint`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import allo_kernels as ak

from . import data as D
from .checkpoint import Checkpoint, CheckpointManager
from .config import (
    ConfigChangedError,
    TrainConfig,
    config_to_dict,
    resolve_deepspeed_config,
    settings_differences,
    training_settings,
)
from .engine import deepspeed_config, full_state_dict, initialize, load_engine_checkpoint, training_state_bytes
from .errors import InputError, input_errors
from .files import write_durable
from .locate import check_masks_match_model, masks_digest, save_masks
from .metrics import MetricsLogger, ProgressLines, format_seconds, plot_loss_curves, progress_bars
from .model import PolicyHiddenStates, load_causal_lm, load_tokenizer, save_pretrained_atomic
from .refcache import cache_key, compute_or_load
from .run import Run, clear_stage_done, mark_stage_done, output_dir_lock, rank0_decides, stage_done, start_run
from .sparsity import DELTAS_FILE, DeltaPlan, apply_delta_mode, attached_copy, plan_deltas
from .stages import (
    STAGES,
    PolicyOutputs,
    StageSpec,
    loss_label,
    model_dir,
    stage_masks,
    start_model_dir,
    start_model_source,
)

CRASH_ENV = "ALLO_TRAIN_CRASH_AFTER"  # test hook "<stage>:<step>": hard-exit after that optimizer step (a kill)


@dataclass
class StagePlan:
    """What :func:`prepare_stage` worked out for one training stage; the later steps read it."""

    spec: StageSpec
    args: Any  # the stage's config section
    in_dir: Path  # the starting model (and reference)
    out_dir: Path  # where the final model goes
    tokenizer: Any
    train: list[dict]
    held_out: list[dict]
    lm: torch.nn.Module
    module: PolicyHiddenStates  # what the engine wraps: input ids -> hidden states
    masks: dict[str, torch.Tensor] | None  # {parameter name in lm: mask}; None: every parameter trains
    sparsity: str | None  # how the masks train: "delta" (deltas: plan, attached to lm) or "masked"; None without masks
    deltas: DeltaPlan | None
    settings: dict  # training settings stored in (and compared against) checkpoints
    checkpoints: CheckpointManager
    resume_from: Checkpoint | None
    sampler: D.ResumableSampler
    total_steps: int

    @property
    def stage(self) -> str:
        return self.spec.name

    @property
    def collator(self) -> Callable:
        return self.spec.collator(D.pad_token_id_of(self.tokenizer))


@dataclass
class References:
    """Cached reference log-probs per sequence (chosen and rejected interleaved for pairs), train and held-out."""

    train: list[torch.Tensor] | None = None
    held_out: list[torch.Tensor] | None = None


# ----------------------------------------------------------------------------------------------------- batches
def _pad_rows(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    out = torch.zeros(len(rows), length, dtype=torch.float32)
    for i, r in enumerate(rows):
        n = min(length, r.numel())
        out[i, :n] = r[:n]
    return out


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> tuple[int, dict]:
        return i, self.features[i]


@dataclass
class _Collate:
    """The stage's collator plus the cached per-row reference log-probs ([B, T-1], aligned with labels[:, 1:])."""

    collator: Callable
    ref_rows: list[torch.Tensor] | None
    paired: bool  # preference rows: [chosen; rejected]

    def __call__(self, items: list[tuple[int, dict]]) -> dict:
        idx = [i for i, _ in items]
        batch = self.collator([f for _, f in items])
        if self.ref_rows is not None:
            order = [2 * i for i in idx] + [2 * i + 1 for i in idx] if self.paired else idx
            batch["ref_logprobs"] = _pad_rows([self.ref_rows[j] for j in order], batch["input_ids"].shape[1] - 1)
        return batch


def batch_loader(
    features: list[dict],
    collator: Callable,
    ref_rows: list[torch.Tensor] | None,
    *,
    paired: bool,
    batch_size: int,
    sampler: torch.utils.data.Sampler,
) -> torch.utils.data.DataLoader:
    """Batches of ``features`` in ``sampler``'s order through the stage's collator, each with its cached reference
    rows (``ref_rows``: one per sequence, chosen and rejected interleaved for pairs; None: none)."""
    return torch.utils.data.DataLoader(
        _Indexed(features), batch_size=batch_size, sampler=sampler, collate_fn=_Collate(collator, ref_rows, paired)
    )


def endless_batches(loader: Iterable) -> Iterator:
    """``loader``'s batches pass after pass (each pass draws the sampler's next order); ends if a pass is empty."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return


def _rows_of(features: list[dict], paired: bool) -> list[dict]:
    """One {input_ids, labels} per sequence (chosen, rejected interleaved for preference features)."""
    if not paired:
        return [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
    rows = []
    for f in features:
        rows.append({"input_ids": f["chosen_input_ids"], "labels": f["chosen_labels"]})
        rows.append({"input_ids": f["rejected_input_ids"], "labels": f["rejected_labels"]})
    return rows


def policy_outputs(engine, batch: dict, device: torch.device) -> PolicyOutputs:
    """Run the policy on a batch: hidden states and labels shifted into alignment, the per-token extras beside.
    ``engine``: the DeepSpeed engine, or the PolicyHiddenStates module itself (a plain torch loop)."""
    hidden = engine(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    head = (engine if isinstance(engine, PolicyHiddenStates) else engine.module).lm_head
    ref, weights = batch.get("ref_logprobs"), batch.get("token_weights")
    return PolicyOutputs(
        hidden=hidden[:, :-1],
        labels=batch["labels"][:, 1:].to(device),
        lm_head_weight=head.weight,
        lm_head_bias=head.bias,
        ref_logprobs=None if ref is None else ref.to(device),
        token_weights=None if weights is None else weights[:, 1:].to(device),
    )


def policy_token_logprobs(engine, batch: dict, device: torch.device) -> torch.Tensor:
    """Per-token log-probs [B, T-1] of the labels under the engine's policy."""
    out = policy_outputs(engine, batch, device)
    return ak.fused_linear_token_logprobs(out.hidden, out.lm_head_weight, out.labels, bias=out.lm_head_bias)


def _reduce_metrics(sums: dict[str, float], count: int, world_size: int, device: torch.device) -> dict[str, float]:
    """Mean over every counted batch of every rank (sums and counts are all-reduced; keys agree across ranks)."""
    keys = sorted(sums)
    vec = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64, device=device)
    if world_size > 1:
        torch.distributed.all_reduce(vec)
    total = max(vec[-1].item(), 1.0)
    return {k: v / total for k, v in zip(keys, vec[:-1].tolist())}


# ----------------------------------------------------------------------------------------------------- the steps
def train_stage(run: Run, spec: StageSpec) -> Path:
    """Train one stage of the table end to end (the steps are this module's functions of the same names)."""
    plan = prepare_stage(run, spec)
    trained = trained_fraction(plan.lm, plan.masks)  # before the engine partitions the parameters (ZeRO-3)
    engine = build_engine(run, plan)
    refs = reference_logprobs(run, plan, engine)
    last = train_loop(run, plan, engine, refs)
    out = finish_stage(run, plan, engine)
    run.notes[spec.name] = {"steps": plan.total_steps, "metrics": last, "trained_fraction": trained, "output": out}
    return out


def prepare_stage(run: Run, spec: StageSpec, *, args: Any = None) -> StagePlan:
    """Everything before the engine: masks (checked against the model), data split, model, settings, resume point,
    data order and the number of optimizer steps. ``args``: the stage's section as a runner resolved it (default:
    the config's)."""
    cfg, stage = run.cfg, spec.name
    args = cfg.section(stage) if args is None else args
    with input_errors():  # bad masks or data are the user's to fix: one line from the CLI
        masks, masks_source = stage_masks(run, stage) if spec.needs_masks else (None, "")
        in_dir = start_model_dir(cfg, stage)
    clear_stage_done(run, stage)
    if args.data_path is None:
        raise InputError(f"config key '{stage}.data_path' is required for the {stage} stage")
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or in_dir)
    with input_errors():
        features = spec.data(cfg, args, tokenizer, run.device)
    train, held_out = D.train_eval_split(features, eval_fraction=args.eval_fraction, seed=cfg.seed)
    if not train:
        raise InputError(f"{stage}.data_path {args.data_path!r} holds no training example")

    lm = load_causal_lm(in_dir, dtype=run.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    sparsity, deltas = None, None
    if masks is not None:
        with input_errors():
            check_masks_match_model(masks, lm, source=masks_source)
        sparsity, deltas = choose_sparsity(run, stage, lm, masks)

    settings = training_settings(cfg, stage, args)
    settings["input_model"] = str(in_dir)
    if masks is not None:
        settings["masks_sha256"] = masks_digest(masks)
        settings[f"{stage}.sparsity"] = sparsity
    checkpoints = CheckpointManager(cfg.stage_dir(stage) / "checkpoints", save_total_limit=cfg.save_total_limit)
    resume_from = resume_checkpoint(run, stage, checkpoints, settings) if cfg.resume_from_checkpoint else None

    sampler = D.ResumableSampler(len(train), seed=cfg.seed, rank=run.rank, world_size=run.world_size)
    bs, ga = args.per_device_train_batch_size, args.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(len(sampler) / bs / ga))
    total = (
        args.max_steps if args.max_steps and args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    )
    return StagePlan(
        spec=spec,
        args=args,
        in_dir=in_dir,
        out_dir=model_dir(cfg, stage),
        tokenizer=tokenizer,
        train=train,
        held_out=held_out,
        lm=lm,
        module=PolicyHiddenStates(lm),
        masks=masks,
        sparsity=sparsity,
        deltas=deltas,
        settings=settings,
        checkpoints=checkpoints,
        resume_from=resume_from,
        sampler=sampler,
        total_steps=total,
    )


def choose_sparsity(run: Run, stage: str, lm: torch.nn.Module, masks: dict) -> tuple[str, DeltaPlan | None]:
    """The stage's ``sparsity`` (sparsity.py) and, in delta mode, the deltas attached to ``lm`` with everything else
    frozen. Unset: delta when the masks allow it, else masked, said on one line; ``delta`` set for masks that cannot
    be compact is a ValueError naming the key and the mask."""
    wanted = getattr(run.cfg.section(stage), "sparsity", None)
    if wanted == "masked":
        run.say(f"{stage}: sparsity masked: SparseAdamW over the selected parameters")
        return "masked", None
    try:
        plan = plan_deltas(lm, masks)
        apply_delta_mode(lm, plan)  # checks every name before it changes anything
    except ValueError as e:
        if wanted == "delta":
            raise ValueError(
                f"config key '{stage}.sparsity' is 'delta', but {e}; set {stage}.sparsity: masked to train these "
                "masks with SparseAdamW"
            ) from None
        run.say(f"{stage}: sparsity masked (SparseAdamW), the masks cannot be row deltas: {e}")
        return "masked", None
    run.say(f"{stage}: sparsity delta: {plan.describe()}")
    return "delta", plan


def build_engine(run: Run, plan: StagePlan):
    """The DeepSpeed engine over the policy: a stock AdamW over the row deltas (and whole selected parameters) in
    delta mode, else SparseAdamW on the parameters the masks select (all without masks)."""
    args = plan.args
    ds = deepspeed_config(
        resolve_deepspeed_config(run.cfg),
        micro_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        bf16=run.cfg.bf16,
    )
    return initialize(
        plan.module,
        ds_config=ds,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        masks=None if plan.masks is None or plan.deltas else {f"lm.{k}": v for k, v in plan.masks.items()},
        stock_optimizer=plan.deltas is not None,
        lr_scheduler_type=args.lr_scheduler_type,
        total_steps=plan.total_steps,
        warmup_steps=int(args.warmup_ratio * plan.total_steps),
    )


def reference_logprobs(run: Run, plan: StagePlan, engine) -> References:
    """Per-token log-probs of the starting policy for every training and held-out sequence, scored by the engine
    before its first step and cached on disk (keyed by the data file, the model and the tokenisation settings), so
    no second model sits in memory. Nothing for a stage without ``needs_reference``."""
    if not plan.spec.needs_reference:
        return References()
    args, stage = plan.args, plan.stage
    rows = _rows_of(plan.train + plan.held_out, plan.spec.paired)
    row_collator = D.SFTCollator(D.pad_token_id_of(plan.tokenizer))

    def score(batch_rows: list[dict]) -> list[torch.Tensor]:
        batch = row_collator(batch_rows)
        with torch.no_grad():
            logp = policy_token_logprobs(engine, batch, run.device)
        return [logp[i, : len(r["input_ids"]) - 1] for i, r in enumerate(batch_rows)]

    key = cache_key(
        data_path=args.data_path,
        model_dir=plan.in_dir,
        settings={
            "stage": stage,
            "max_length": args.max_length,
            "eval_fraction": args.eval_fraction,
            "max_prompt_length": args.max_prompt_length,
            "seed": run.cfg.seed,
            "dtype": str(run.dtype),
        },
    )
    all_rows = compute_or_load(
        run.cfg.stage_dir(stage) / "ref_cache",
        key,
        rows,
        score,
        batch_size=args.per_device_train_batch_size,
        rank=run.rank,
        world_size=run.world_size,
        desc=f"{stage}: reference log-probs",
    )
    n_train = (2 if plan.spec.paired else 1) * len(plan.train)
    return References(train=all_rows[:n_train], held_out=all_rows[n_train:])


def train_loop(run: Run, plan: StagePlan, engine, refs: References) -> dict[str, float]:
    """Optimizer steps from the resume point (or 0) to ``total_steps``: each one ``gradient_accumulation_steps``
    micro-batches through the stage's loss; metrics every ``logging_steps``, held-out evaluation every
    ``eval_steps``, a checkpoint every ``save_steps``. Progress: a tqdm bar on a terminal, else a log line at every
    logging step. Returns the last logged metrics (with the last held-out ones), {} when no step ran."""
    cfg, args, stage, sampler, total = run.cfg, plan.args, plan.stage, plan.sampler, plan.total_steps
    collator = plan.collator
    loader = batch_loader(
        plan.train,
        collator,
        refs.train,
        paired=plan.spec.paired,
        batch_size=args.per_device_train_batch_size,
        sampler=sampler,
    )

    def loss_of(batch: dict):
        return plan.spec.loss(args, policy_outputs(engine, batch, run.device))

    step = 0
    if plan.resume_from is not None:
        ckpt = plan.resume_from
        load_engine_checkpoint(engine, ckpt)
        ckpt.restore_rng(run.rank)
        sampler.load_state_dict(ckpt.data_state)
        step = ckpt.step
        run.say(f"{stage}: resumed from {ckpt.path} at step {step}")

    logger = MetricsLogger(
        cfg.stage_dir(stage), stage=stage, tensorboard="tensorboard" in cfg.report_to, start_step=step
    )
    crash_stage, _, crash_step = os.environ.get(CRASH_ENV, "").partition(":")
    crash_after = int(crash_step) if crash_stage == stage and crash_step else 0
    from tqdm.auto import tqdm

    bars = progress_bars()
    bar = tqdm(total=total, initial=step, desc=stage, disable=run.rank != 0 or not bars, dynamic_ncols=True)
    batches = endless_batches(loader)
    sums: dict[str, float] = {}
    count = 0
    last: dict[str, float] = {}
    lines = ProgressLines(stage, total, step, run.say)
    try:
        while step < total:
            engine.train()
            for _ in range(args.gradient_accumulation_steps):
                batch = next(batches)
                loss, metrics = loss_of(batch)
                engine.backward(loss)
                engine.step()
                for k, v in {"loss": loss.detach(), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
            step += 1
            bar.update(1)
            if step % args.logging_steps == 0 or step == total:
                logged = _reduce_metrics(sums, count, run.world_size, run.device)
                grad_norm = engine.get_global_grad_norm()
                logged.update(
                    learning_rate=engine.get_lr()[0], epoch=sampler.epoch + sampler.position / max(1, len(sampler))
                )
                if grad_norm is not None:
                    logged["grad_norm"] = float(grad_norm)
                logger.log(step, logged)
                bar.set_postfix(loss=f"{logged['loss']:.4f}")
                if not bars:
                    lines.update(step, logged)
                last.update(logged)
                sums, count = {}, 0
            if plan.held_out and (step % (args.eval_steps or args.logging_steps) == 0 or step == total):
                held = evaluate(run, plan, engine, loss_of, collator, refs.held_out)
                logger.log(step, held)
                last.update(held)
            if step % args.save_steps == 0 and step < total:
                plan.checkpoints.save(
                    step,
                    stage=stage,
                    write_fn=lambda d: engine.save_checkpoint(str(d / "deepspeed"), tag="state"),
                    data_state=sampler.state_dict(),
                    extra={"training_settings": plan.settings, "config": config_to_dict(cfg)},
                    is_main=run.rank == 0,
                    barrier=run.barrier,
                    rank=run.rank,
                )
            if crash_after and step == crash_after:
                os._exit(17)
    finally:  # on an error, end the bar's line first so the error message starts a line of its own
        bar.close()
        logger.close()
    return last


def finish_stage(run: Run, plan: StagePlan, engine) -> Path:
    """Save the trained weights (gathered under ZeRO-3) beside the tokenizer and the masks the stage trained, swap
    them in atomically, plot the curves, then mark the stage done (with its sparsity and rank 0's bytes of training
    state). Row deltas are merged into the weights (a plain Hugging Face model) and saved alone beside them."""
    sd = full_state_dict(engine)
    state_bytes = training_state_bytes(engine)
    if run.rank == 0:
        # The masks this stage trained (a stage may re-select its own from the importance), beside the weights.
        write_masks = None if plan.masks is None else lambda d: save_masks(plan.masks, d, stats=None)
        model, before_save = plan.lm, None
        if plan.deltas is not None and plan.deltas.rows:
            model, sd = attached_copy(plan.lm, sd, plan.deltas.rows), None

            def before_save(d: Path) -> None:
                ak.save_row_deltas(model, d / DELTAS_FILE)
                ak.merge_row_deltas(model)

        save_pretrained_atomic(
            model, plan.tokenizer, plan.out_dir, state_dict=sd, before_save=before_save, write_extra=write_masks
        )
        stage_dir = run.cfg.stage_dir(plan.stage)
        plot_loss_curves(stage_dir / "metrics.jsonl", stage_dir, loss_name=loss_label(plan.spec, plan.args))
        info = {"trainable_state_bytes": state_bytes}
        if plan.sparsity is not None:
            info["sparsity"] = plan.sparsity
        mark_stage_done(run.cfg, plan.stage, plan.out_dir, info=info)
    run.barrier()
    return plan.out_dir


def resume_checkpoint(run: Run, stage: str, ckpts: CheckpointManager, settings: dict) -> Checkpoint | None:
    """The checkpoint ``--resume`` continues from, or None (said on one line) when there is no complete one.

    Rank 0 verifies manifests and shares the choice; a newer checkpoint that fails verification is named with its
    problems and skipped; none verifying stops the run (:class:`CheckpointError`). The checkpoint's stored training
    settings must equal ``settings`` unless ``allow_config_change`` (then the differences are printed)."""
    cfg = run.cfg
    explicit = None if cfg.resume_from_checkpoint is True else cfg.resume_from_checkpoint
    chosen = rank0_decides(run, lambda: ckpts.select(explicit))
    for path, problems in chosen.rejected:
        run.say(f"{stage}: {path.name} fails verification ({'; '.join(problems)}); skipped")
    if chosen.path is None:
        tmp = sorted(p.name for p in ckpts.root.glob(".tmp-checkpoint-*")) if ckpts.root.is_dir() else []
        partial = f" (incomplete, ignored: {', '.join(tmp)})" if tmp else ""
        run.say(f"{stage}: --resume: no complete checkpoint in {ckpts.root}{partial}; training from step 0")
        return None
    if chosen.rejected:
        run.say(f"{stage}: resuming from {chosen.path.name}, the newest checkpoint that verifies")
    ckpt = ckpts.load(chosen.path, restore_rng=False, verify=False)
    saved = ckpt.extra.get("training_settings")
    diff = ["the checkpoint stores no training settings"] if saved is None else settings_differences(saved, settings)
    if diff and not cfg.allow_config_change:
        raise ConfigChangedError(
            f"{ckpt.path} was written under other training settings than this run's config: {'; '.join(diff)}. "
            "Resume with the checkpoint's values, or pass --allow-config-change to continue under the new ones"
        )
    if diff:
        run.say(f"{stage}: resuming {ckpt.path.name} under a changed config (--allow-config-change): {'; '.join(diff)}")
    return ckpt


def evaluate(run: Run, plan: StagePlan, engine, loss_of, collator, held_ref) -> dict[str, float]:
    """Loss and metrics (preference accuracy for DPO stages) on the held-out split, reported as eval/<name>.

    Batches of ``per_device_eval_batch_size`` (None: the train batch size). Every rank runs the same number of
    forwards (ZeRO-3 gathers parameters collectively); a rank whose shard is exhausted repeats a batch without
    counting it.
    """
    held_out = plan.held_out
    batch_size = plan.args.per_device_eval_batch_size or plan.args.per_device_train_batch_size
    engine.eval()
    collate = _Collate(collator, held_ref, plan.spec.paired)
    mine = list(range(run.rank, len(held_out), run.world_size))
    n_batches = math.ceil(math.ceil(len(held_out) / run.world_size) / batch_size)
    sums: dict[str, float] = {}
    count = 0
    with torch.no_grad():
        for b in range(n_batches):
            idx = mine[b * batch_size : (b + 1) * batch_size]
            loss, metrics = loss_of(collate([(i, held_out[i]) for i in (idx or [0])]))
            if not idx:  # keep the metric keys identical on every rank for the all-reduce
                for k in ("loss", *metrics):
                    sums.setdefault(k, 0.0)
                continue
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
    engine.train()
    return {f"eval/{k}": v for k, v in _reduce_metrics(sums, count, run.world_size, run.device).items()}


# ----------------------------------------------------------------------------------------------------- entry points
def run_stage(cfg: TrainConfig, stage: str) -> Path:
    check_inputs(cfg, [stage])
    run = start_run(cfg)
    with output_dir_lock(run):
        out = _run_stage(run, stage)
        run.say(summary_table(run, [stage]))
        return out


def _run_stage(run: Run, stage: str) -> Path:
    torch.manual_seed(run.cfg.seed)
    spec = STAGES[stage]
    started = time.perf_counter()
    out = (spec.runner or train_stage)(run, spec)
    note = run.notes.setdefault(stage, {})
    note["seconds"] = time.perf_counter() - started
    note.setdefault("output", out)
    return out


def run_pipeline(cfg: TrainConfig) -> list[Path]:
    """Run cfg.pipeline.stages in order; with resume_from_checkpoint, finished stages are skipped."""
    finished = {s: stage_done(cfg, s) for s in cfg.pipeline.stages} if cfg.resume_from_checkpoint else {}
    done_before = [s for s, done in finished.items() if done is not None]
    check_inputs(cfg, [s for s in cfg.pipeline.stages if s not in done_before], finished=done_before)
    run = start_run(cfg)
    outputs = []
    with output_dir_lock(run):
        for stage in cfg.pipeline.stages:
            done = stage_done(cfg, stage) if cfg.resume_from_checkpoint else None
            if done is not None:
                run.say(f"{stage}: already finished ({done}), skipped")
                run.notes[stage] = {"output": done, "skipped": True}
                outputs.append(done)
                continue
            outputs.append(_run_stage(run, stage))
        if run.rank == 0:
            summary = {s: str(p) for s, p in zip(cfg.pipeline.stages, outputs)}
            write_durable(Path(cfg.output_dir) / "pipeline.json", json.dumps(summary, indent=2).encode())
        run.say(summary_table(run, cfg.pipeline.stages))
    return outputs


# ----------------------------------------------------------------------------------------------------- before, after
def check_inputs(cfg: TrainConfig, stages: list[str], *, finished: list[str] = ()) -> None:
    """What a run reads, checked before it starts (no process group, no model, no engine yet), so a wrong path or a
    broken data file stops it at once, not after hours of an earlier stage: the starting model of each stage (unless
    an earlier stage of this run writes it), the tokenizer, locate's models, the scoring model, the DeepSpeed config
    and every data file (it exists, is not empty, and each non-blank line is a JSON object; the first bad line is
    named). ``finished``: stages whose outputs exist already. Fields inside the lines are checked when each stage
    loads its data (before its engine). Raises :class:`InputError` (one line from the CLI, exit 2)."""
    written = set(finished)
    read: set[Path] = set()
    with input_errors():
        resolve_deepspeed_config(cfg)
        if cfg.tokenizer_name_or_path is not None:
            _check_model_dir(cfg.tokenizer_name_or_path, "config key 'tokenizer_name_or_path'", file="")
        for stage in stages:
            for path, what, hint in _models_read(cfg, stage, written):
                _check_model_dir(path, what, hint=hint)
            data_path, key = _data_read(cfg, stage)
            if data_path is not None and Path(data_path) not in read:
                _check_data_file(data_path, key)
                read.add(Path(data_path))
            written.add(stage)


def _models_read(cfg: TrainConfig, stage: str, written: set[str]) -> list[tuple[Path, str, str]]:
    """(directory, what it is, a hint) of each model ``stage`` reads that no stage in ``written`` writes."""
    section = cfg.section(stage)
    out = []

    def stage_output(source: str, why: str) -> None:
        if source not in written:
            out.append((model_dir(cfg, source), f"{stage} {why} {source}'s output", f"; run {source} first"))

    start = getattr(section, "start_model", None) if stage == "locate" else None
    source = start_model_source(cfg, stage)
    if start:
        out.append((Path(start), f"config key '{stage}.start_model'", ""))
    elif source is not None:
        stage_output(source, "starts from")
    else:
        out.append((start_model_dir(cfg, stage), "config key 'model_name_or_path'", ""))
    if stage == "locate" and section.method == "weight_delta":
        if section.warm_model:
            out.append((Path(section.warm_model), f"config key '{stage}.warm_model'", ""))
        else:
            stage_output("warmup", "compares with")
    if getattr(section, "token_weight_source", None) == "scoring_model":
        out.append((Path(section.scoring_model), f"config key '{stage}.scoring_model'", ""))
    return out


def _data_read(cfg: TrainConfig, stage: str) -> tuple[str | None, str]:
    """(the data file ``stage`` reads or None, its config key); InputError when a stage that needs one has none."""
    section = cfg.section(stage)
    if stage == "locate":
        if section.method != "grad":
            return None, ""
        key = "locate.data_path" if section.data_path else "warmup.data_path"
        path = section.data_path or cfg.warmup.data_path
        if path is None:
            raise InputError("config key 'locate.data_path' (or warmup.data_path) is required for method 'grad'")
        return path, key
    path = getattr(section, "data_path", None)
    if path is None and STAGES[stage].runner is None:
        raise InputError(f"config key '{stage}.data_path' is required for the {stage} stage")
    return path, f"{stage}.data_path"


def _check_model_dir(path: str | Path, what: str, *, file: str = "config.json", hint: str = "") -> None:
    path = Path(path)
    if not path.is_dir():
        problem = "does not exist" if not path.exists() else "is not a directory"
        raise InputError(f"{what}: {str(path)!r} {problem} (expected a local Hugging Face model directory){hint}")
    if file and not (path / file).is_file():
        raise InputError(f"{what}: {str(path)!r} has no {file}, so it is not a Hugging Face model directory{hint}")


def _check_data_file(path: str | Path, key: str) -> None:
    path = Path(path)
    if not path.is_file():
        problem = "does not exist" if not path.exists() else "is not a file"
        raise InputError(f"config key '{key}': data file {str(path)!r} {problem}")
    if sum(1 for _ in D.read_jsonl(path)) == 0:  # every line parsed: a ValueError names the first bad one
        raise InputError(f"config key '{key}': data file {str(path)!r} is empty (no JSON line)")


def trained_fraction(lm: torch.nn.Module, masks: dict[str, torch.Tensor] | None) -> float:
    """Share of the model's weights a stage may change: 1.0 without masks, else what the masks select (a row mask
    selects whole rows). Attached row deltas are not weights of the model: they are left out of the count."""
    import allo_kernels as ak

    if masks is None:
        return 1.0
    deltas = {id(d) for d in ak.row_delta_parameters(lm).values()}
    params = {n: p for n, p in lm.named_parameters() if id(p) not in deltas}
    total = sum(p.numel() for p in params.values())
    selected = sum(int(m.sum()) * (params[n].numel() // max(m.numel(), 1)) for n, m in masks.items() if n in params)
    return selected / max(total, 1)


def _number(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return f"{value:.4f}" if isinstance(value, float) else "-"


def summary_table(run: Run, stages: list[str]) -> str:
    """What each stage of this run did, one line per stage: the loss it trained and its final value (the last
    logged step), the final reward margin of preference stages, the share of weights trained, the time, the output."""
    head = ("stage", "steps", "objective", "final loss", "reward margin", "trained", "time", "output")
    rows = [head]
    for stage in stages:
        note = run.notes.get(stage, {})
        metrics = note.get("metrics", {})
        spec = STAGES[stage]
        trained = note.get("trained_fraction")
        rows.append(
            (
                stage,
                str(note.get("steps", "-")),
                loss_label(spec, run.cfg.section(stage)) if spec.runner is None else "-",
                _number(metrics, "loss"),
                _number(metrics, "rewards/margins"),
                "-" if trained is None else f"{100 * trained:.1f}%",
                "finished earlier" if note.get("skipped") else format_seconds(note.get("seconds", 0.0)),
                str(note.get("output", "-")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "summary:\n" + "\n".join("  " + line for line in lines)
