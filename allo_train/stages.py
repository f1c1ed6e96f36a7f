"""The stages of the pipeline, each one readable top to bottom.

    sft / correct   cross-entropy on responses (Aligner: on corrections of {question, answer})
    warmup          full-parameter DPO; its weight change locates the neurons
    locate          importance -> masks (element / row / layer), stats, heatmap
    forget          ALLO token-weighted NPO on the selected neurons (ratio N1)
    improve         ALLO masked DPO on the selected neurons (ratio N2), top-percentile token masking

Every training stage reads a model directory, trains it with DeepSpeed (SparseAdamW bound to the engine, losses on
hidden states through the fused-linear kernels, reference log-probs from the on-disk cache), checkpoints atomically
every ``save_steps`` and writes ``<output_dir>/<stage>/model`` (weights, tokenizer, the masks it trained) at the end;
then, and only then, ``<output_dir>/<stage>/stage_done.json`` marks the stage finished (a resumed pipeline skips it).

A run holds ``<output_dir>/.allo-train.lock`` (see ``lock.py``) from start to end; on ``--resume`` a stage picks the
newest checkpoint that verifies against its manifest and whose training settings match the config (see
``resume_checkpoint``).

Model flow: ``base`` = the sft output when sft is in the pipeline, else ``model_name_or_path``. warmup trains
``base``; locate compares ``base`` with the warm-up result; forget trains ``base`` on the located neurons; improve
trains the forget result (or ``base``) on its neurons. Each stage's reference is its own starting model.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import allo_kernels as ak

from . import data as D
from .checkpoint import Checkpoint, CheckpointError, CheckpointManager
from .config import (
    ConfigChangedError,
    TrainConfig,
    config_to_dict,
    resolve_deepspeed_config,
    settings_differences,
    training_settings,
)
from .engine import deepspeed_config, init_distributed, initialize
from .files import write_durable
from .locate import (
    MASKS_FILE,
    SafetensorsState,
    check_masks_match_model,
    delta_importance,
    load_importance,
    locate,
    masks_digest,
    save_importance,
    save_masks,
    select_masks,
)
from .lock import hold_output_dir
from .metrics import MetricsLogger, plot_loss_curves
from .model import PolicyHiddenStates, load_causal_lm, save_pretrained_atomic
from .refcache import cache_key, compute_or_load

TRAINING_STAGES = ("sft", "correct", "warmup", "forget", "improve")
CRASH_ENV = "ALLO_TRAIN_CRASH_AFTER"  # test hook "<stage>:<step>": hard-exit after that optimizer step (a kill)
STAGE_DONE_FILE = "stage_done.json"


@dataclass
class Run:
    cfg: TrainConfig
    rank: int
    world_size: int
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.bf16 else torch.float32

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def say(self, message: str) -> None:
        if self.rank == 0:
            print(f"[allo-train] {message}", flush=True)


def rank0_decides(run: Run, fn: Callable[[], object]) -> object:
    """``fn()`` on rank 0; its result, or the exception it raised, reaches every rank (so a decision that reads the
    disk is made once, and a refusal stops every rank instead of leaving the others waiting in a collective)."""
    out: list = [None]
    if run.rank == 0:
        try:
            out[0] = ("ok", fn())
        except Exception as e:
            out[0] = ("error", e)
    if run.world_size > 1:
        try:
            torch.distributed.broadcast_object_list(out, src=0)
        except Exception:  # an unpicklable exception on rank 0: send its text
            if run.rank == 0:
                out[0] = ("error", CheckpointError(f"{type(out[0][1]).__name__}: {out[0][1]}"))
            torch.distributed.broadcast_object_list(out, src=0)
    kind, value = out[0]
    if kind == "error":
        raise value
    return value


@contextmanager
def output_dir_lock(run: Run) -> Iterator[None]:
    """Rank 0 holds ``cfg.output_dir``'s lock for the block (one lock per run); every rank stops when it is taken."""
    with ExitStack() as stack:
        rank0_decides(run, lambda: stack.enter_context(hold_output_dir(run.cfg.output_dir)) and None)
        yield


# ----------------------------------------------------------------------------------------------------- model flow
def model_dir(cfg: TrainConfig, stage: str) -> Path:
    return cfg.stage_dir(stage) / "model"


def base_model_dir(cfg: TrainConfig) -> Path:
    if "sft" in cfg.pipeline.stages:
        return model_dir(cfg, "sft")
    if cfg.model_name_or_path is None:
        raise ValueError("config key 'model_name_or_path' is required (a local Hugging Face model directory)")
    return Path(cfg.model_name_or_path)


def input_model_dir(cfg: TrainConfig, stage: str) -> Path:
    if stage in ("sft", "correct"):
        if cfg.model_name_or_path is None:
            raise ValueError("config key 'model_name_or_path' is required (a local Hugging Face model directory)")
        return Path(cfg.model_name_or_path)
    if stage == "improve" and "forget" in cfg.pipeline.stages:
        return model_dir(cfg, "forget")
    return base_model_dir(cfg)


def load_tokenizer(cfg: TrainConfig, model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(cfg.tokenizer_name_or_path or model_path))


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


def _rows_of(features: list[dict], paired: bool) -> list[dict]:
    """One {input_ids, labels} per sequence (chosen, rejected interleaved for preference features)."""
    if not paired:
        return [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
    rows = []
    for f in features:
        rows.append({"input_ids": f["chosen_input_ids"], "labels": f["chosen_labels"]})
        rows.append({"input_ids": f["rejected_input_ids"], "labels": f["rejected_labels"]})
    return rows


# ----------------------------------------------------------------------------------------------------- losses
def _policy(engine, batch: dict, device: torch.device):
    ids = batch["input_ids"].to(device)
    hidden = engine(ids, batch["attention_mask"].to(device))
    head = engine.module.lm_head
    return hidden[:, :-1], head.weight, head.bias, batch["labels"][:, 1:].to(device)


def sequence_logprobs(engine, batch: dict, device: torch.device) -> torch.Tensor:
    hidden, weight, bias, labels = _policy(engine, batch, device)
    return ak.fused_linear_token_logprobs(hidden, weight, labels, bias=bias)


def make_loss(stage: str, cfg: TrainConfig, device: torch.device) -> Callable:
    args = getattr(cfg, stage)

    def sft(engine, batch):
        hidden, weight, bias, labels = _policy(engine, batch, device)
        logp = ak.fused_linear_token_logprobs(hidden, weight, labels, bias=bias)
        return ak.losses.sft_loss(logp, labels != -100)

    def preference(engine, batch):
        hidden, weight, bias, labels = _policy(engine, batch, device)
        masking = {}
        if stage == "improve":
            masking = dict(
                mask_fraction=args.mask_fraction, mask_by=args.mask_by, mask_scope=args.mask_scope, mask_side="rejected"
            )
        return ak.preference_loss(
            hidden,
            labels,
            lm_head_weight=weight,
            lm_head_bias=bias,
            ref_logprobs=batch["ref_logprobs"].to(device),
            beta=args.beta,
            loss_type=args.loss_type,
            label_smoothing=args.label_smoothing,
            **masking,
        )

    def forget(engine, batch):
        hidden, weight, bias, labels = _policy(engine, batch, device)
        return ak.forgetting_loss(
            hidden,
            labels,
            lm_head_weight=weight,
            lm_head_bias=bias,
            ref_logprobs=batch["ref_logprobs"].to(device),
            weights=batch["token_weights"][:, 1:].to(device),
            beta=args.beta,
        )

    return {"sft": sft, "correct": sft, "warmup": preference, "improve": preference, "forget": forget}[stage]


# ----------------------------------------------------------------------------------------------------- data
def load_stage_features(stage: str, cfg: TrainConfig, tokenizer, *, device: torch.device | None = None):
    """Tokenised (train, eval) features, the collator and whether rows are [chosen; rejected] pairs."""
    args = getattr(cfg, stage)
    if args.data_path is None:
        raise ValueError(f"config key '{stage}.data_path' is required for the {stage} stage")
    lengths = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    pad = D.pad_token_id_of(tokenizer)
    if stage in ("warmup", "improve"):
        feats = D.tokenize_preference(D.load_preference_jsonl(args.data_path), tokenizer, **lengths)
        collator, paired = D.PreferenceCollator(pad), True
    elif stage == "forget":
        examples = D.load_forgetting_jsonl(args.data_path, token_weight_source=args.token_weight_source)
        feats = D.tokenize_forgetting(examples, tokenizer, **lengths)
        if args.token_weight_source == "scoring_model":
            feats = scoring_model_weights(cfg, tokenizer, examples, feats, device or torch.device("cpu"))
        collator, paired = D.ForgettingCollator(pad), False
    elif stage == "sft":
        feats = D.tokenize_sft(
            D.load_sft_jsonl(args.data_path, completion_field=args.completion_field), tokenizer, **lengths
        )
        collator, paired = D.SFTCollator(pad), False
    elif stage == "correct":
        examples = D.load_correction_jsonl(args.data_path)
        examples = examples + D.identity_warmup_examples(
            examples, fraction=args.identity_warmup_fraction, seed=cfg.seed
        )
        feats = D.tokenize_correction(examples, tokenizer, **lengths)
        collator, paired = D.SFTCollator(pad), False
    else:
        raise ValueError(f"unknown training stage {stage!r}")
    train, held_out = D.train_eval_split(feats, eval_fraction=args.eval_fraction, seed=cfg.seed)
    return train, held_out, collator, paired


REWRITE_TEMPLATE = "##Question: {prompt}\n##Answer: {answer}\n##Rewrite: "


def scoring_model_weights(cfg: TrainConfig, tokenizer, examples, feats: list[dict], device: torch.device) -> list[dict]:
    """ALLO/RLMEC-style token weights from a rewriting (scoring) model: ``w_t = 1 - p(y_t | rewrite prompt, y_<t)``.

    The scoring model reads ``REWRITE_TEMPLATE`` (question and the rejected answer) and is teacher-forced on the
    rejected response; a token the rewriter would copy (p near 1) is aligned and gets weight near 0, a token it would
    change gets weight near 1 (forgotten). The scoring model must share the policy's tokenizer. Every rank scores
    every example (plain torch, no engine): the forgetting sets ALLO uses are small.
    """
    scorer = load_causal_lm(cfg.forget.scoring_model, dtype=torch.float32).to(device).eval()
    if scorer.get_output_embeddings().weight.shape[0] < len(tokenizer):
        raise ValueError(
            f"forget.scoring_model {cfg.forget.scoring_model!r} has a smaller vocabulary than the "
            f"policy's tokenizer ({len(tokenizer)}): it must share the policy's tokenizer"
        )
    out = []
    for ex, feat in zip(examples, feats):
        labels = torch.tensor(feat["labels"])
        response = torch.tensor(feat["input_ids"])[labels != -100]
        prompt = D._plain_messages(ex.prompt) if isinstance(ex.prompt, list) else ex.prompt
        answer = D._plain_messages(ex.rejected) if isinstance(ex.rejected, list) else ex.rejected
        head = tokenizer(REWRITE_TEMPLATE.format(prompt=prompt, answer=answer)).input_ids
        ids = torch.tensor([head + response.tolist()], device=device)
        with torch.no_grad():
            logits = scorer(ids).logits[0, len(head) - 1 : -1]
            p = ak.token_logprobs(logits, response.to(device)).exp().cpu()
        weights = torch.zeros(len(feat["input_ids"]))
        weights[labels != -100] = 1.0 - p
        out.append({**feat, "token_weights": weights.tolist()})
    return out


# ----------------------------------------------------------------------------------------------------- training
def _final_state_dict(engine) -> dict | None:
    """Full weights of the wrapped causal LM on rank 0 (ZeRO-3 partitions are gathered); None on other ranks."""
    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict() if torch.distributed.get_rank() == 0 else None
    if sd is None:
        return None
    return {k[len("lm.") :]: v.detach().cpu() for k, v in sd.items() if k.startswith("lm.")}


def _reduce_metrics(sums: dict[str, float], count: int, world_size: int, device: torch.device) -> dict[str, float]:
    """Mean over every counted batch of every rank (sums and counts are all-reduced; keys agree across ranks)."""
    keys = sorted(sums)
    vec = torch.tensor([sums[k] for k in keys] + [float(count)], dtype=torch.float64, device=device)
    if world_size > 1:
        torch.distributed.all_reduce(vec)
    total = max(vec[-1].item(), 1.0)
    return {k: v / total for k, v in zip(keys, vec[:-1].tolist())}


def train_stage(
    run: Run, stage: str, *, masks: dict[str, torch.Tensor] | None = None, masks_source: str = "masks"
) -> Path:
    cfg, args = run.cfg, getattr(run.cfg, stage)
    in_dir, out_dir, stage_dir = input_model_dir(cfg, stage), model_dir(cfg, stage), cfg.stage_dir(stage)
    clear_stage_done(run, stage)
    tokenizer = load_tokenizer(cfg, in_dir)
    train, held_out, collator, paired = load_stage_features(stage, cfg, tokenizer, device=run.device)
    if not train:
        raise ValueError(f"{stage}.data_path {args.data_path!r} holds no training example")

    lm = load_causal_lm(in_dir, dtype=run.dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    if masks is not None:
        check_masks_match_model(masks, lm, source=masks_source)
    module = PolicyHiddenStates(lm)
    named_masks = None if masks is None else {f"lm.{k}": v for k, v in masks.items()}

    settings = training_settings(cfg, stage)
    settings["input_model"] = str(in_dir)
    if masks is not None:
        settings["masks_sha256"] = masks_digest(masks)
    ckpts = CheckpointManager(stage_dir / "checkpoints", save_total_limit=cfg.save_total_limit)
    ckpt = resume_checkpoint(run, stage, ckpts, settings) if cfg.resume_from_checkpoint else None

    bs, ga = args.per_device_train_batch_size, args.gradient_accumulation_steps
    sampler = D.ResumableSampler(len(train), seed=cfg.seed, rank=run.rank, world_size=run.world_size)
    steps_per_epoch = max(1, math.ceil(len(sampler) / bs / ga))
    total = (
        args.max_steps if args.max_steps and args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    )
    ds = deepspeed_config(
        resolve_deepspeed_config(cfg),
        micro_batch_size=bs,
        gradient_accumulation_steps=ga,
        max_grad_norm=args.max_grad_norm,
        bf16=cfg.bf16,
    )
    engine = initialize(
        module,
        ds_config=ds,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        masks=named_masks,
        lr_scheduler_type=args.lr_scheduler_type,
        total_steps=total,
        warmup_steps=int(args.warmup_ratio * total),
    )

    # Reference per-token log-probs of the starting policy, cached on disk (none for SFT).
    ref_rows = held_ref = None
    if stage in ("warmup", "improve", "forget"):
        rows = _rows_of(train + held_out, paired)
        row_collator = D.SFTCollator(D.pad_token_id_of(tokenizer))

        def score(batch_rows: list[dict]) -> list[torch.Tensor]:
            batch = row_collator(batch_rows)
            with torch.no_grad():
                logp = sequence_logprobs(engine, batch, run.device)  # noqa: F821  (ruff: closure + later `del`)
            return [logp[i, : len(r["input_ids"]) - 1] for i, r in enumerate(batch_rows)]

        key = cache_key(
            data_path=args.data_path,
            model_dir=in_dir,
            settings={
                "stage": stage,
                "max_length": args.max_length,
                "eval_fraction": args.eval_fraction,
                "max_prompt_length": args.max_prompt_length,
                "seed": cfg.seed,
                "dtype": str(run.dtype),
            },
        )
        all_rows = compute_or_load(
            stage_dir / "ref_cache",
            key,
            rows,
            score,
            batch_size=bs,
            rank=run.rank,
            world_size=run.world_size,
            desc=f"{stage}: reference log-probs",
        )
        per = 2 if paired else 1
        ref_rows, held_ref = all_rows[: per * len(train)], all_rows[per * len(train) :]

    loader = torch.utils.data.DataLoader(
        _Indexed(train), batch_size=bs, sampler=sampler, collate_fn=_Collate(collator, ref_rows, paired)
    )
    loss_fn = make_loss(stage, cfg, run.device)

    step = 0
    if ckpt is not None:
        load_engine_checkpoint(engine, ckpt)
        ckpt.restore_rng(run.rank)
        sampler.load_state_dict(ckpt.data_state)
        step = ckpt.step
        run.say(f"{stage}: resumed from {ckpt.path} at step {step}")

    logger = MetricsLogger(stage_dir, stage=stage, tensorboard="tensorboard" in cfg.report_to, start_step=step)
    crash_stage, _, crash_step = os.environ.get(CRASH_ENV, "").partition(":")
    crash_after = int(crash_step) if crash_stage == stage and crash_step else 0
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc=stage, disable=run.rank != 0, dynamic_ncols=True)
    batches = iter(loader)
    sums: dict[str, float] = {}
    count = 0
    try:
        while step < total:
            engine.train()
            for _ in range(ga):
                try:
                    batch = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    batch = next(batches)
                loss, metrics = loss_fn(engine, batch)
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
                sums, count = {}, 0
            if held_out and (step % (args.eval_steps or args.logging_steps) == 0 or step == total):
                logger.log(step, evaluate(run, engine, loss_fn, held_out, collator, held_ref, paired, bs))
            if step % args.save_steps == 0 and step < total:
                ckpts.save(
                    step,
                    stage=stage,
                    write_fn=lambda d: engine.save_checkpoint(str(d / "deepspeed"), tag="state"),  # noqa: F821
                    data_state=sampler.state_dict(),
                    extra={"training_settings": settings, "config": config_to_dict(cfg)},
                    is_main=run.rank == 0,
                    barrier=run.barrier,
                    rank=run.rank,
                )
            if crash_after and step == crash_after:
                os._exit(17)
    finally:  # on an error, end the bar's line first so the error message starts a line of its own
        bar.close()
        logger.close()

    sd = _final_state_dict(engine)
    if run.rank == 0:
        # The masks this stage trained (a stage may re-select its own from the importance), beside the weights.
        write_masks = None if masks is None else lambda d: save_masks(masks, d, stats=None)
        save_pretrained_atomic(lm, tokenizer, out_dir, state_dict=sd, write_extra=write_masks)
        plot_loss_curves(stage_dir / "metrics.jsonl", stage_dir)
        mark_stage_done(cfg, stage, out_dir)
    run.barrier()
    del engine
    return out_dir


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


def load_engine_checkpoint(engine, ckpt: Checkpoint) -> None:
    """``engine.load_checkpoint`` on the checkpoint's ``deepspeed/`` directory; a failure names the checkpoint (and
    DeepSpeed's silent "nothing loaded" becomes an error)."""
    where = ckpt.path / "deepspeed"
    try:
        loaded, _ = engine.load_checkpoint(str(where), tag="state")
    except Exception as e:
        raise CheckpointError(f"{where}: DeepSpeed could not load the checkpoint ({type(e).__name__}: {e})") from e
    if loaded is None:
        raise CheckpointError(f"{where}: DeepSpeed found no checkpoint 'state' to load")


def evaluate(run: Run, engine, loss_fn, held_out, collator, held_ref, paired, batch_size) -> dict[str, float]:
    """Loss and metrics (preference accuracy for DPO stages) on the held-out split, reported as eval/<name>.

    Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively); a rank whose shard is
    exhausted repeats a batch without counting it.
    """
    engine.eval()
    collate = _Collate(collator, held_ref, paired)
    mine = list(range(run.rank, len(held_out), run.world_size))
    n_batches = math.ceil(math.ceil(len(held_out) / run.world_size) / batch_size)
    sums: dict[str, float] = {}
    count = 0
    with torch.no_grad():
        for b in range(n_batches):
            idx = mine[b * batch_size : (b + 1) * batch_size]
            loss, metrics = loss_fn(engine, collate([(i, held_out[i]) for i in (idx or [0])]))
            if not idx:  # keep the metric keys identical on every rank for the all-reduce
                for k in ("loss", *metrics):
                    sums.setdefault(k, 0.0)
                continue
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
    engine.train()
    return {f"eval/{k}": v for k, v in _reduce_metrics(sums, count, run.world_size, run.device).items()}


# ----------------------------------------------------------------------------------------------------- locate
def locate_stage(run: Run) -> Path:
    cfg, args = run.cfg, run.cfg.locate
    out = cfg.stage_dir("locate")
    clear_stage_done(run, "locate")
    if run.rank == 0:
        start = Path(args.start_model) if args.start_model else base_model_dir(cfg)
        if args.importance == "delta":
            warm = Path(args.warm_model) if args.warm_model else model_dir(cfg, "warmup")
            importance = delta_importance(
                SafetensorsState(start),
                SafetensorsState(warm),
                learning_rate=cfg.warmup.learning_rate if args.divide_by_lr else None,
            )
        else:
            importance = gradient_importance(run, start)
        save_importance(importance, out / "importance.safetensors")
        result = locate(
            importance, out, ratio=args.ratio, granularity=args.granularity, scope=args.scope, exclude=args.exclude
        )
        print(f"[allo-train] locate: masks at {result.masks_path}, stats at {result.stats_path}")
        mark_stage_done(cfg, "locate", result.masks_path)
    run.barrier()
    return out


def gradient_importance(run: Run, start: Path) -> dict[str, torch.Tensor]:
    """Accumulated |grad| of the DPO loss at the start model (reference = the model itself), plain torch on rank 0."""
    from .locate import GradImportance

    cfg, args = run.cfg, run.cfg.locate
    stage_cfg = replace(cfg.warmup, data_path=args.data_path or cfg.warmup.data_path)
    tokenizer = load_tokenizer(cfg, start)
    feats = D.tokenize_preference(
        D.load_preference_jsonl(stage_cfg.data_path),
        tokenizer,
        max_length=stage_cfg.max_length,
        max_prompt_length=stage_cfg.max_prompt_length,
    )
    lm = load_causal_lm(start, dtype=torch.float32).to(run.device)
    module = PolicyHiddenStates(lm)
    collate = D.PreferenceCollator(D.pad_token_id_of(tokenizer))
    acc = GradImportance(device=run.device)
    bs = stage_cfg.per_device_train_batch_size
    for b in range(min(args.grad_num_batches, math.ceil(len(feats) / bs))):
        batch = collate(feats[b * bs : (b + 1) * bs])
        hidden = module(batch["input_ids"].to(run.device), batch["attention_mask"].to(run.device))[:, :-1]
        labels = batch["labels"][:, 1:].to(run.device)
        with torch.no_grad():
            ref = ak.fused_linear_token_logprobs(hidden, lm.get_output_embeddings().weight, labels)
        loss, _ = ak.preference_loss(
            hidden, labels, lm_head_weight=lm.get_output_embeddings().weight, ref_logprobs=ref, beta=stage_cfg.beta
        )
        lm.zero_grad(set_to_none=True)
        loss.backward()
        acc.add_model(lm)
    return acc.importance


def stage_masks(run: Run, stage: str) -> tuple[dict[str, torch.Tensor], str]:
    """Masks for forget/improve and where they come from: the located masks, re-selected from the saved importance
    when the stage's ratio (N1 / N2) differs from locate.ratio."""
    cfg = run.cfg
    loc = cfg.stage_dir("locate")
    ratio = getattr(cfg, stage).ratio
    if ratio is None or ratio == cfg.locate.ratio:
        from .locate import load_masks

        return load_masks(loc), f"masks file {loc / MASKS_FILE}"
    importance = load_importance(loc / "importance.safetensors")
    masks = select_masks(
        importance, ratio=ratio, granularity=cfg.locate.granularity, scope=cfg.locate.scope, exclude=cfg.locate.exclude
    )
    return masks, f"masks re-selected at {stage}.ratio={ratio} from {loc / 'importance.safetensors'}"


# ----------------------------------------------------------------------------------------------------- entry points
def start_run(cfg: TrainConfig) -> Run:
    rank, world, device = init_distributed()
    if rank != 0:  # data warnings and notes once per run, from rank 0
        logging.getLogger("allo_train").setLevel(logging.ERROR)
    return Run(cfg, rank, world, device)


def run_stage(cfg: TrainConfig, stage: str) -> Path:
    run = start_run(cfg)
    with output_dir_lock(run):
        return _run_stage(run, stage)


def _run_stage(run: Run, stage: str) -> Path:
    torch.manual_seed(run.cfg.seed)
    if stage == "locate":
        return locate_stage(run)
    if stage in ("forget", "improve"):
        masks, source = stage_masks(run, stage)
        return train_stage(run, stage, masks=masks, masks_source=source)
    return train_stage(run, stage)


def clear_stage_done(run: Run, stage: str) -> None:
    """A stage that (re)starts is not finished until it marks itself done again."""
    if run.rank == 0:
        (run.cfg.stage_dir(stage) / STAGE_DONE_FILE).unlink(missing_ok=True)
    run.barrier()


def mark_stage_done(cfg: TrainConfig, stage: str, output: Path) -> None:
    """Written (atomically) after the stage's output is complete and in place; the output is named relative to the
    stage directory, so an output directory can be moved."""
    done = cfg.stage_dir(stage) / STAGE_DONE_FILE
    tmp = done.with_name(f".{done.name}.tmp-{os.getpid()}")
    relative = os.path.relpath(output, done.parent)
    write_durable(tmp, json.dumps({"stage": stage, "output": relative}).encode())
    os.replace(tmp, done)


def stage_done(cfg: TrainConfig, stage: str) -> Path | None:
    """The stage's output when the stage finished (its ``stage_done.json`` exists and the output is there)."""
    done = cfg.stage_dir(stage) / STAGE_DONE_FILE
    try:
        output = done.parent / json.loads(done.read_bytes())["output"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return output if output.exists() else None


def run_pipeline(cfg: TrainConfig) -> list[Path]:
    """Run cfg.pipeline.stages in order; with resume_from_checkpoint, finished stages are skipped."""
    run = start_run(cfg)
    outputs = []
    with output_dir_lock(run):
        for stage in cfg.pipeline.stages:
            done = stage_done(cfg, stage) if cfg.resume_from_checkpoint else None
            if done is not None:
                run.say(f"{stage}: already finished ({done}), skipped")
                outputs.append(done)
                continue
            outputs.append(_run_stage(run, stage))
        if run.rank == 0:
            summary = {s: str(p) for s, p in zip(cfg.pipeline.stages, outputs)}
            write_durable(Path(cfg.output_dir) / "pipeline.json", json.dumps(summary, indent=2).encode())
    return outputs
