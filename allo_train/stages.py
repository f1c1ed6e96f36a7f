"""The stages of allo-train in one table: what each stage reads, trains and writes.

    sft / correct   cross-entropy on responses (Aligner: on corrections of {question, answer})
    warmup          full-parameter DPO; its weight change locates the neurons
    locate          importance -> masks (element / row / layer), stats, heatmap
    ila             LoRA, then learned gates per decoder layer -> layer ranking and layer masks (allo_train.ila)
    forget          ALLO token-weighted NPO on the selected neurons (ratio N1)
    improve         ALLO DPO on the selected neurons (ratio N2), most of each rejected response's tokens dropped

A stage is one :class:`StageSpec` entry in ``STAGES`` plus its functions:

* ``section``: its config section, a dataclass (config.py); the YAML key is the stage's name;
* ``data`` and ``collator``: the data file -> tokenised features, features -> a batch; ``paired``: the batch holds
  ``[chosen; rejected]`` rows;
* ``loss``: ``(section, PolicyOutputs) -> (loss, metrics)``;
* what the training loop (trainer.py) does around them: ``needs_reference`` (per-token reference log-probs of the
  starting model, computed once and cached), ``needs_masks`` (only the neurons locate selected train; the section
  has a ``ratio``), ``starts_from`` (which model the stage trains);
* ``runner``: for a stage that is not a training run (locate, ila), the function that runs it instead of the loop.

cli.py (the commands), config.py (the sections) and trainer.py (the loop) read this table; nothing else lists the
stages. Adding a stage: write its section, data and loss functions, and one entry.

Model flow (``starts_from``): a stage starts from the output of the first stage of its ``starts_from`` that is in the
pipeline, else from ``model_name_or_path``. So warmup, locate, ila and forget start from sft's model when sft runs,
improve from forget's; each stage's reference is its own starting model; locate compares its start with the warm-up
result. Masks flow: forget and improve train the neurons of ``<output_dir>/locate/masks.safetensors`` (whatever
``locate.method`` wrote there), or of ila's masks when the pipeline runs ila and not locate.

Words: the neurons (rows or elements) a stage trains are *selected* by *masks* (locate, SparseAdamW); the tokens
the improving stage leaves out of its loss are *dropped* (its keys keep their published names, ``mask_fraction``
& co).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import (
    CorrectStageConfig,
    ForgetStageConfig,
    IlaStageConfig,
    ImproveStageConfig,
    LocateStageConfig,
    SFTStageConfig,
    TrainConfig,
    WarmupStageConfig,
)

if TYPE_CHECKING:
    import torch

    from .run import Run

# This module imports nothing heavy at the top (no torch, allo_kernels, transformers): the CLI reads the table to
# parse its command line and check the config before torch is imported. The stage functions import what they use.


@dataclass(frozen=True)
class StageSpec:
    """One stage: its config section and, for a training stage, its data, loss and what the loop does around them."""

    name: str
    section: type  # its config section (a dataclass); YAML key = name
    summary: str  # one line: what the stage does
    data: Callable[..., list[dict]] | None = None  # (cfg, section, tokenizer, device) -> features
    collator: Callable[[int], Callable] | None = None  # pad token id -> (features -> batch)
    loss: Callable[..., tuple] | None = None  # (section, PolicyOutputs) -> (loss, metrics)
    paired: bool = False  # features are preference pairs: batches hold [chosen; rejected] rows
    needs_reference: bool = False  # PolicyOutputs.ref_logprobs: the starting model's, cached on disk
    needs_masks: bool = False  # trains only the neurons locate selected (the section has `ratio`)
    starts_from: tuple[str, ...] = ()  # the first of these stages in the pipeline gives the model, else the config's
    runner: Callable[[Run, StageSpec], Path] | None = None  # not a training run: runs the stage instead of the loop
    # What `loss` computes, for plots and the end-of-run summary: formatted with the section's fields (and
    # {preference_loss}: "DPO" for loss_type sigmoid, else the loss type); see loss_label.
    loss_name: str = "loss"

    def __post_init__(self) -> None:
        training = (self.data, self.collator, self.loss)
        if self.runner is None and None in training:
            raise ValueError(f"stage {self.name!r}: a training stage needs data, collator and loss (or a runner)")
        if self.runner is not None and any(f is not None for f in training):
            raise ValueError(f"stage {self.name!r}: a stage with a runner has no data, collator or loss")


@dataclass
class PolicyOutputs:
    """One batch as a loss function sees it, every tensor on the device and aligned with ``labels`` (shifted).

    The losses run on hidden states through the fused-linear kernels: the [B, T, V] logits never exist."""

    hidden: torch.Tensor  # [B, T-1, H] final hidden states (position t predicts token t + 1)
    labels: torch.Tensor  # [B, T-1], ak.IGNORE_INDEX on prompt and padding
    lm_head_weight: torch.Tensor  # [V, H]
    lm_head_bias: torch.Tensor | None
    ref_logprobs: torch.Tensor | None  # [B, T-1] the starting model's (stages with needs_reference)
    token_weights: torch.Tensor | None  # [B, T-1] when the batch carries them (forgetting)


# ----------------------------------------------------------------------------------------------------- model flow
def model_dir(cfg: TrainConfig, stage: str) -> Path:
    """Where a training stage's final model goes: ``<output_dir>/<stage>/model``."""
    return cfg.stage_dir(stage) / "model"


def start_model_source(cfg: TrainConfig, stage: str) -> str | None:
    """The stage whose output ``stage`` starts from, or None when it starts from ``model_name_or_path``."""
    return next((earlier for earlier in STAGES[stage].starts_from if earlier in cfg.pipeline.stages), None)


def start_model_dir(cfg: TrainConfig, stage: str) -> Path:
    """The model ``stage`` starts from (see the model flow in the module docstring)."""
    earlier = start_model_source(cfg, stage)
    if earlier is not None:
        return model_dir(cfg, earlier)
    if cfg.model_name_or_path is None:
        raise ValueError("config key 'model_name_or_path' is required (a local Hugging Face model directory)")
    return Path(cfg.model_name_or_path)


def stage_masks(run: Run, stage: str) -> tuple[dict[str, torch.Tensor], str]:
    """Masks of the neurons ``stage`` trains and where they come from: the located masks (``cfg.masks_stage()``),
    re-selected from the saved importance when the stage's ratio (N1 / N2) differs from locate.ratio."""
    from .locate import IMPORTANCE_FILE, MASKS_FILE, load_importance, load_masks, select_masks

    cfg = run.cfg
    source = cfg.masks_stage()
    loc = cfg.stage_dir(source)
    ratio = cfg.section(stage).ratio
    if ratio is None or ratio == cfg.locate.ratio:  # always so with ILA's masks (config load checks it)
        return load_masks(loc), f"masks file {loc / MASKS_FILE}"
    importance = load_importance(loc / IMPORTANCE_FILE)
    masks = select_masks(
        importance, ratio=ratio, granularity=cfg.locate.granularity, scope=cfg.locate.scope, exclude=cfg.locate.exclude
    )
    return masks, f"masks re-selected at {stage}.ratio={ratio} from {loc / IMPORTANCE_FILE}"


def loss_label(spec: StageSpec, section: Any) -> str:
    """``spec.loss_name`` filled in from the stage's section (e.g. "DPO, 90% of rejected tokens dropped")."""
    fields = asdict(section) if is_dataclass(section) else {}
    loss_type = fields.get("loss_type")
    fields["preference_loss"] = "DPO" if loss_type == "sigmoid" else f"{loss_type} (DPO family)"
    return spec.loss_name.format(**fields)


# ----------------------------------------------------------------------------------------------------- data
def _lengths(args: Any) -> dict:
    return dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length)


def preference_data(cfg: TrainConfig, args: Any, tokenizer, device: torch.device) -> list[dict]:
    """{"prompt", "chosen", "rejected"} lines -> preference features."""
    from . import data as D

    return D.tokenize_preference(D.load_preference_jsonl(args.data_path), tokenizer, **_lengths(args))


def forgetting_data(cfg: TrainConfig, args: Any, tokenizer, device: torch.device) -> list[dict]:
    """{"prompt", "rejected"} lines -> features with per-token weights from ``args.token_weight_source``."""
    from . import data as D
    from .generation import scoring_model_weights

    examples = D.load_forgetting_jsonl(args.data_path, token_weight_source=args.token_weight_source)
    feats = D.tokenize_forgetting(examples, tokenizer, **_lengths(args))
    if args.token_weight_source == "scoring_model":
        feats = scoring_model_weights(args.scoring_model, tokenizer, examples, feats, device)
    return feats


def sft_data(cfg: TrainConfig, args: Any, tokenizer, device: torch.device) -> list[dict]:
    """{"prompt", "completion"} lines (or ``args.completion_field``) -> SFT features."""
    from . import data as D

    examples = D.load_sft_jsonl(args.data_path, completion_field=args.completion_field)
    return D.tokenize_sft(examples, tokenizer, **_lengths(args))


def correction_data(cfg: TrainConfig, args: Any, tokenizer, device: torch.device) -> list[dict]:
    """{"question", "answer", "correction"} lines, plus Aligner's identity warm-up share -> SFT features."""
    from . import data as D

    examples = D.load_correction_jsonl(args.data_path)
    examples = examples + D.identity_warmup_examples(examples, fraction=args.identity_warmup_fraction, seed=cfg.seed)
    return D.tokenize_correction(examples, tokenizer, **_lengths(args))


# ----------------------------------------------------------------------------------------------------- losses
def sft_loss(args: Any, out: PolicyOutputs) -> tuple[torch.Tensor, dict]:
    """Mean negative log-prob of the response tokens (``losses.sft_loss`` of the fused-linear log-probs, computed by
    ``fused_linear_cross_entropy``: its gradients are made in the forward, so no logits are recomputed)."""
    import allo_kernels as ak

    loss = ak.fused_linear_cross_entropy(out.hidden, out.lm_head_weight, out.labels, bias=out.lm_head_bias)
    return loss, {"num_tokens": (out.labels != ak.IGNORE_INDEX).sum().float().detach()}


def preference_loss(args: Any, out: PolicyOutputs, **token_drop: Any) -> tuple[torch.Tensor, dict]:
    """DPO-family loss (``args.loss_type``: any of allo_kernels.objectives.PREFERENCE_LOSS_TYPES) on every token."""
    import allo_kernels as ak

    return ak.preference_loss(
        out.hidden,
        out.labels,
        lm_head_weight=out.lm_head_weight,
        lm_head_bias=out.lm_head_bias,
        ref_logprobs=out.ref_logprobs,
        beta=args.beta,
        loss_type=args.loss_type,
        label_smoothing=args.label_smoothing,
        simpo_gamma=args.simpo_gamma,
        **token_drop,
    )


def token_dropped_preference_loss(args: Any, out: PolicyOutputs) -> tuple[torch.Tensor, dict]:
    """ALLO improving: the preference loss with ``args.mask_fraction`` of each rejected response's tokens dropped
    (those with the highest reward for ``mask_by="highest"``), chosen responses whole."""
    drop = dict(mask_fraction=args.mask_fraction, mask_by=args.mask_by, mask_scope=args.mask_scope)
    return preference_loss(args, out, mask_side="rejected", **drop)


def forgetting_loss(args: Any, out: PolicyOutputs) -> tuple[torch.Tensor, dict]:
    """ALLO forgetting: token-weighted NPO on the rejected responses."""
    import allo_kernels as ak

    return ak.forgetting_loss(
        out.hidden,
        out.labels,
        lm_head_weight=out.lm_head_weight,
        lm_head_bias=out.lm_head_bias,
        ref_logprobs=out.ref_logprobs,
        weights=out.token_weights,
        beta=args.beta,
    )


# ----------------------------------------------------------------------------------------------------- collators
# data.py's collator classes, made when a stage builds its first batch (data.py imports torch).
def sft_collator(pad_token_id: int) -> Callable:
    from .data import SFTCollator

    return SFTCollator(pad_token_id)


def preference_collator(pad_token_id: int) -> Callable:
    from .data import PreferenceCollator

    return PreferenceCollator(pad_token_id)


def forgetting_collator(pad_token_id: int) -> Callable:
    from .data import ForgettingCollator

    return ForgettingCollator(pad_token_id)


# ----------------------------------------------------------------------------------------------------- locate
def locate_stage(run: Run, spec: StageSpec) -> Path:
    """Importance of every parameter (``locate.method``: weight change of the warm-up, or accumulated gradients), then
    the masks of the top ``ratio``, with their stats and heatmap (rank 0; plain torch, no engine); or, for method
    ``ila``, the layers ILA ranks first (:func:`locate_by_ila`)."""
    from .locate import IMPORTANCE_FILE, SafetensorsState, delta_importance, locate, save_importance
    from .run import clear_stage_done, mark_stage_done

    cfg, args = run.cfg, run.cfg.section(spec.name)
    out = cfg.stage_dir(spec.name)
    clear_stage_done(run, spec.name)
    if args.method == "ila":
        return locate_by_ila(run, spec)
    if run.rank == 0:
        start = Path(args.start_model) if args.start_model else start_model_dir(cfg, spec.name)
        if args.method == "weight_delta":
            warm = Path(args.warm_model) if args.warm_model else model_dir(cfg, "warmup")
            importance = delta_importance(
                SafetensorsState(start),
                SafetensorsState(warm),
                learning_rate=cfg.warmup.learning_rate if args.divide_by_lr else None,
            )
        else:
            importance = gradient_importance(run, start)
        save_importance(importance, out / IMPORTANCE_FILE)
        result = locate(
            importance, out, ratio=args.ratio, granularity=args.granularity, scope=args.scope, exclude=args.exclude
        )
        print(f"[allo-train] {spec.name}: masks at {result.masks_path}, stats at {result.stats_path}")
        mark_stage_done(cfg, spec.name, result.masks_path)
        run.notes[spec.name] = {"trained_fraction": result.stats["total"]["fraction"], "output": result.masks_path}
    run.barrier()
    return out


def ila_stage(run: Run, spec: StageSpec) -> Path:
    """The ila stage (allo_train.ila: LoRA, then learned layer gates); imported when it runs (it imports peft)."""
    from .ila import ila_stage as run_ila

    return run_ila(run, spec)


def locate_by_ila(run: Run, spec: StageSpec) -> Path:
    """``locate.method: ila``: the ila stage runs (its section's settings, its files in ``<output_dir>/ila/``) and its
    layer masks, stats, heatmap, ranking and plot are copied into locate's directory, where forget and improve read
    them."""
    from .files import write_atomic
    from .ila import LAYER_IMPORTANCE_FILE, PLOT_FILE
    from .locate import HEATMAP_FILE, MASKS_FILE, STATS_FILE
    from .run import mark_stage_done

    cfg = run.cfg
    ila_dir = STAGES["ila"].runner(run, STAGES["ila"])
    out = cfg.stage_dir(spec.name)
    if run.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for name in (MASKS_FILE, STATS_FILE, HEATMAP_FILE, LAYER_IMPORTANCE_FILE, PLOT_FILE):
            write_atomic(out / name, lambda tmp, name=name: shutil.copyfile(ila_dir / name, tmp))
        print(f"[allo-train] {spec.name}: masks of ILA's layers at {out / MASKS_FILE}")
        mark_stage_done(cfg, spec.name, out / MASKS_FILE)
    run.barrier()
    return out


def gradient_importance(run: Run, start: Path) -> dict[str, torch.Tensor]:
    """Accumulated |grad| of the DPO loss at the start model (reference = the model itself), plain torch on rank 0."""
    import torch

    import allo_kernels as ak

    from . import data as D
    from .locate import GradImportance
    from .model import PolicyHiddenStates, load_causal_lm, load_tokenizer

    cfg, args = run.cfg, run.cfg.locate
    stage_cfg = replace(cfg.warmup, data_path=args.data_path or cfg.warmup.data_path)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or start)
    feats = D.tokenize_preference(D.load_preference_jsonl(stage_cfg.data_path), tokenizer, **_lengths(stage_cfg))
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


# ----------------------------------------------------------------------------------------------------- the table
STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            name="sft",
            section=SFTStageConfig,
            summary="supervised fine-tuning: cross-entropy on the completions",
            data=sft_data,
            collator=sft_collator,
            loss=sft_loss,
            loss_name="cross-entropy on the completions",
        ),
        StageSpec(
            name="correct",
            section=CorrectStageConfig,
            summary="Aligner corrector: cross-entropy on corrections of {question, answer}",
            data=correction_data,
            collator=sft_collator,
            loss=sft_loss,
            loss_name="cross-entropy on the corrections",
        ),
        StageSpec(
            name="warmup",
            section=WarmupStageConfig,
            summary="full-parameter DPO; its weight change locates the neurons",
            data=preference_data,
            collator=preference_collator,
            loss=preference_loss,
            loss_name="{preference_loss}",
            paired=True,
            needs_reference=True,
            starts_from=("sft",),
        ),
        StageSpec(
            name="locate",
            section=LocateStageConfig,
            summary="importance -> masks of the neurons forget and improve train",
            runner=locate_stage,
            starts_from=("sft",),
        ),
        StageSpec(
            name="ila",
            section=IlaStageConfig,
            summary="ILA: LoRA, then learned gates rank the decoder layers -> masks of the top layers",
            runner=ila_stage,
            starts_from=("sft",),
        ),
        StageSpec(
            name="forget",
            section=ForgetStageConfig,
            summary="ALLO forgetting: token-weighted NPO on the selected neurons",
            data=forgetting_data,
            collator=forgetting_collator,
            loss=forgetting_loss,
            loss_name="token-weighted NPO",
            needs_reference=True,
            needs_masks=True,
            starts_from=("sft",),
        ),
        StageSpec(
            name="improve",
            section=ImproveStageConfig,
            summary="ALLO improving: DPO on the selected neurons, most rejected tokens dropped",
            data=preference_data,
            collator=preference_collator,
            loss=token_dropped_preference_loss,
            loss_name="{preference_loss}, {mask_fraction:.0%} of rejected tokens dropped",
            paired=True,
            needs_reference=True,
            needs_masks=True,
            starts_from=("forget", "sft"),
        ),
    )
}
