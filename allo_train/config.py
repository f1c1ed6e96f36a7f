"""One config for the whole ALLO pipeline: YAML mapped onto dataclasses, command-line overrides on top.

Field names follow TRL's ``DPOConfig`` / ``TrainingArguments`` where a TRL name exists (``beta``, ``learning_rate``,
``per_device_train_batch_size``, ...), so a TRL YAML mostly loads as is. Layout::

    model_name_or_path: ...          # top level: TrainConfig (shared defaults)
    learning_rate: 5.0e-6
    pipeline: {stages: [warmup, locate, forget, improve]}
    warmup:  {data_path: pref.jsonl}
    locate:  {method: weight_delta, granularity: element, ratio: 0.05}
    forget:  {data_path: forget.jsonl, token_weight_source: corrected}
    improve: {data_path: pref.jsonl, mask_fraction: 0.9}

There is one section per entry of the stage table (``stages.STAGES``), named after the stage and holding that
stage's ``section`` dataclass (defined below); ``cfg.improve`` (or ``cfg.section("improve")``) is the section.
A section field whose name is also a top-level field (the training fields of :class:`StageTrainingArgs`, ``beta``,
``loss_type``, ...) is resolved when the config is loaded: the section's own value when the YAML (or an override)
sets it, else the top-level value when that is set, else the stage's own default where it has one (ALLO's published
settings: the warm-up, forgetting and improving learning rates and schedules, Aligner's for ``correct``), else the
top-level default. A stage that trains only the located neurons (``needs_masks`` in its table entry) takes
``locate.ratio`` when its ``ratio`` is ``None``; its ``sparsity`` left at ``None`` is decided by the stage from its
masks (``sparsity.py``: ``delta`` for row and layer masks, ``masked`` for element masks), and ``delta`` set with
``locate.granularity: element`` is an error. After :func:`load_config` every stage field holds a concrete value.

Choices that another module owns are named here as ``"module:NAME"`` and read from the owner, never repeated: the
preference loss types (``allo_kernels.objectives``), the token-drop options (``allo_kernels.ops.token_scores``), the
LR schedules (``engine``), granularities, scopes and the default exclusions (``locate``), the token-weight sources
(``data``). The owners import torch, this module does not: :func:`load_config` checks every key, type, range and
cross-field rule first and reads the owners' lists last, so a config error is reported in a fraction of a second
(``allo-train`` checks the config before it imports torch). Keep it so: import no heavy module at the top here.

Every field carries a one-line ``doc`` in its metadata; ``allo-train config`` prints the whole config with them
(:func:`render_config`).

Overrides (:func:`parse_overrides`): ``--key value``, ``--key=value`` or ``key=value``; dotted keys reach into
sections (``improve.mask_fraction=0.2``). Values are parsed as YAML (``true``, ``0.2``, ``[a, b]``, ``null``).

Unknown keys and bad values raise ``ValueError`` naming the dotted key and the value received.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import AlloTrainError

REPORT_TO = ("jsonl", "tensorboard", "none")

# Where the choice lists live ("module:NAME"); choices_of() reads them when a value is checked.
_LOSS_TYPES_REF = "allo_kernels.objectives:PREFERENCE_LOSS_TYPES"
_MASK_BY_REF = "allo_kernels.ops.token_scores:MASK_BY"
_MASK_SCOPES_REF = "allo_kernels.ops.token_scores:MASK_SCOPES"
_LR_SCHEDULERS_REF = "allo_train.engine:LR_SCHEDULERS"
_TOKEN_WEIGHT_SOURCES_REF = "allo_train.data:TOKEN_WEIGHT_SOURCES"
_IMPORTANCES_REF = "allo_train.locate:IMPORTANCES"
_GRANULARITIES_REF = "allo_train.locate:GRANULARITIES"
_SCOPES_REF = "allo_train.locate:SCOPES"
_DEFAULT_EXCLUDE_REF = "allo_train.locate:DEFAULT_EXCLUDE"
_SPARSITY_MODES_REF = "allo_train.sparsity:SPARSITY_MODES"
_METHODS_REF = "allo_train.locate:METHODS"
_IMPORTANCE_METHODS_REF = "allo_train.locate:IMPORTANCE_METHODS"
_OBJECTIVES_REF = "allo_train.ila:OBJECTIVES"


def __getattr__(name: str) -> Any:
    # PEP 562: the default exclusions are locate's (which imports torch); read on first use, for older imports.
    if name == "DEFAULT_EXCLUDE":
        return owner_value(_DEFAULT_EXCLUDE_REF)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def owner_value(ref: str) -> Any:
    """``"module:NAME"`` -> the object the module owns (imports the module)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _choices(values: tuple[str, ...] | str, doc: str = "") -> dict:
    return {"choices": values, "doc": doc}  # the owner's tuple itself, or "module:NAME" of it


def choices_of(meta: typing.Mapping) -> tuple | None:
    """The allowed values of a field (its metadata), read from their owner."""
    values = meta.get("choices")
    return owner_value(values) if isinstance(values, str) else values


def _range(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    doc: str = "",
) -> dict:
    return {"range": (lo, hi, lo_open, hi_open), "doc": doc}


def _doc(doc: str) -> dict:
    return {"doc": doc}


# --------------------------------------------------------------------------------------------------------------------
# Stage sections (the ``section`` of each entry of stages.STAGES)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StageTrainingArgs:
    """Training fields every training stage has; ``None`` means "take the top-level value" (whose ``doc`` describes
    the field)."""

    data_path: str | None = field(default=None, metadata=_doc("JSONL file of this stage's examples"))
    learning_rate: float | None = field(default=None, metadata=_range(0, lo_open=True))
    per_device_train_batch_size: int | None = field(default=None, metadata=_range(1))
    per_device_eval_batch_size: int | None = field(default=None, metadata=_range(1))
    gradient_accumulation_steps: int | None = field(default=None, metadata=_range(1))
    num_train_epochs: float | None = field(default=None, metadata=_range(0, lo_open=True))
    max_steps: int | None = field(default=None, metadata=_range(-1))
    warmup_ratio: float | None = field(default=None, metadata=_range(0, 1))
    lr_scheduler_type: str | None = field(default=None, metadata=_choices(_LR_SCHEDULERS_REF))
    weight_decay: float | None = field(default=None, metadata=_range(0))
    max_grad_norm: float | None = field(default=None, metadata=_range(0))
    max_length: int | None = field(default=None, metadata=_range(2))
    max_prompt_length: int | None = field(default=None, metadata=_range(1))
    logging_steps: int | None = field(default=None, metadata=_range(1))
    save_steps: int | None = field(default=None, metadata=_range(1))
    eval_fraction: float | None = field(default=None, metadata=_range(0, 1, hi_open=True))
    eval_steps: int | None = field(default=None, metadata=_range(1))

    def check(self, stage: str) -> None:
        """Checks across fields, after the top-level values were filled in; ValueError naming the keys."""
        _check_lengths(f"{stage}.", self)


def _stage_default(name: str, value: Any, source: str) -> Any:
    """A :class:`StageTrainingArgs` field with this stage's own default (used when neither the section nor the top
    level sets it); its checks stay the inherited field's, ``source`` says where the value comes from."""
    inherited = StageTrainingArgs.__dataclass_fields__[name].metadata
    return field(default=value, metadata={**inherited, "stage_default": source})


# Sources of the stages' own defaults (the README's defaults table lists them, a test compares it with these classes).
ALLO_CODE = "ALLO official code"
ALIGNER_PAPER = "Aligner paper"
ILA_LORA = "LoRA's usual rate (ILA trains LoRA first)"
# ILA target_modules value: every linear module of the decoder layers (PEFT's word for it).
ALL_LINEAR = "all-linear"


@dataclass
class SFTStageConfig(StageTrainingArgs):
    """Supervised fine-tuning on prompt-completion JSONL (TRL format: {"prompt", "completion"})."""

    completion_field: str = field(
        default="completion", metadata=_doc('the response field; "chosen" to SFT on a preference file\'s chosen side')
    )


@dataclass
class CorrectStageConfig(StageTrainingArgs):
    """Aligner-style corrector training on {"question", "answer", "correction"} JSONL."""

    learning_rate: float | None = _stage_default("learning_rate", 2e-5, ALIGNER_PAPER)
    num_train_epochs: float | None = _stage_default("num_train_epochs", 3.0, ALIGNER_PAPER)
    identity_warmup_fraction: float = field(
        default=0.2,
        metadata={
            **_range(0, 1, doc="share of the examples first trained as answer -> answer identity pairs"),
            "stage_default": ALIGNER_PAPER,
        },
    )


@dataclass
class WarmupStageConfig(StageTrainingArgs):
    """Full-parameter DPO on preference JSONL; its result is theta_warm for ``locate``."""

    learning_rate: float | None = _stage_default("learning_rate", 1e-6, ALLO_CODE)
    lr_scheduler_type: str | None = _stage_default("lr_scheduler_type", "cosine", ALLO_CODE)
    warmup_ratio: float | None = _stage_default("warmup_ratio", 0.1, ALLO_CODE)
    beta: float | None = field(default=None, metadata=_range(0, lo_open=True))
    loss_type: str | None = field(default=None, metadata=_choices(_LOSS_TYPES_REF))
    label_smoothing: float | None = field(default=None, metadata=_range(0, 0.5))
    simpo_gamma: float | None = field(default=None, metadata=_range(0))


@dataclass
class LocateStageConfig:
    """Neuron location: importance per parameter, then the top ``ratio`` of it (see allo_train.locate); or, with
    ``method: ila``, whole decoder layers chosen by the ``ila`` section's learned gates."""

    method: str | None = field(
        default=None,
        metadata=_choices(
            _METHODS_REF,
            "weight_delta: |theta_warm - theta_start|; grad: accumulated |DPO gradient|; ila: the ila stage's "
            "learned layer gates; null: weight_delta",
        ),
    )
    importance: str | None = field(
        default=None, metadata=_choices(_IMPORTANCES_REF, "earlier name of method (delta = weight_delta)")
    )
    divide_by_lr: bool = field(default=False, metadata=_doc("weight_delta: divide by the warm-up's learning rate"))
    granularity: str = field(
        default="element",
        metadata=_choices(_GRANULARITIES_REF, "what is selected: single weights, rows (neurons) or whole layers"),
    )
    ratio: float = field(
        default=0.05, metadata=_range(0, 1, lo_open=True, doc="share of the candidate weights selected")
    )
    scope: str = field(
        default="global", metadata=_choices(_SCOPES_REF, "rank across all matrices, or within each matrix")
    )
    exclude: list[str] | None = field(
        default=None,
        metadata=_doc("parameters never selected (glob, or re:regex); null: locate.DEFAULT_EXCLUDE"),
    )
    start_model: str | None = field(
        default=None, metadata=_doc("the model before the warm-up; null: the stage's start")
    )
    warm_model: str | None = field(default=None, metadata=_doc("the warmed-up model; null: the warmup stage's output"))
    data_path: str | None = field(default=None, metadata=_doc("method grad: preference JSONL; null: warmup.data_path"))
    grad_num_batches: int = field(default=16, metadata=_range(1, doc="method grad: batches accumulated"))

    def check(self, stage: str) -> None:
        _check_patterns(f"{stage}.exclude", self.exclude or ())

    def resolve_method(self, stage: str) -> None:
        """``method`` from the earlier key ``importance`` (delta -> weight_delta, grad -> grad), default
        weight_delta. Runs once the owned choices are checked, so ``importance`` is a known value by then."""
        if self.importance is not None:  # the earlier key: delta -> weight_delta, grad -> grad
            meant = owner_value(_IMPORTANCE_METHODS_REF)[self.importance]
            if self.method not in (None, meant):
                raise ValueError(
                    f"config keys '{stage}.method' ({self.method!r}) and '{stage}.importance' (its earlier name, "
                    f"{self.importance!r} = {meant!r}) disagree; set only {stage}.method"
                )
            self.method = meant
        self.method = self.method or "weight_delta"


@dataclass
class IlaStageConfig(WarmupStageConfig):
    """ILA (allo_train.ila): LoRA on the decoder layers trained with ``objective`` (phase 1), then one learned gate
    per layer on the LoRA increments (phase 2); writes the layer ranking and masks of the top ``keep_layers``.

    The training keys (learning rate, batch size, lengths, ...) are phase 1's; ``beta``/``loss_type``/... apply to
    the "dpo" objective, ``completion_field`` to "sft". ``data_path`` None: the objective's stage's (warmup's for
    "dpo", sft's for "sft"). Layer shares (``keep_layers``, ``gate_target_layers``): an integer is a count of
    layers, a float in (0, 1] a fraction of them, rounded up (0.25 of 2 layers is 1 layer)."""

    # LoRA's own default: not the top-level rate, which is sized for full-parameter training.
    learning_rate: float | None = _stage_default("learning_rate", 1e-4, ILA_LORA)
    objective: str = field(default="dpo", metadata=_choices(_OBJECTIVES_REF, "phase 1's objective"))
    completion_field: str = field(default="completion", metadata=_doc("objective sft: the completion key of the data"))
    target_modules: list[str] = field(
        default_factory=lambda: [ALL_LINEAR],
        metadata=_doc(f"module names in each decoder layer that get LoRA; {ALL_LINEAR!r}: every linear module"),
    )
    lora_r: int = field(default=8, metadata=_range(1, doc="LoRA rank"))
    lora_alpha: float = field(default=16.0, metadata=_range(0, lo_open=True, doc="LoRA alpha"))
    lora_dropout: float = field(default=0.0, metadata=_range(0, 1, hi_open=True, doc="LoRA dropout"))
    lora_steps: int | None = field(
        default=None, metadata=_range(1, doc="phase 1 steps; null: max_steps / num_train_epochs")
    )
    gate_steps: int = field(default=100, metadata=_range(1, doc="phase 2 steps (gates only)"))
    gate_learning_rate: float = field(
        default=0.1, metadata=_range(0, lo_open=True, doc="Adam's learning rate on the gate logits")
    )
    gate_per_module: bool = field(default=False, metadata=_doc("one gate per (layer, module) instead of per layer"))
    gate_penalty: float = field(default=0.1, metadata=_range(0, doc="lambda of the sparsity term"))
    gate_target_layers: int | float | None = field(
        default=None,
        metadata=_doc("null: lambda * mean(gate); else lambda * (mean(gate) - k/n)^2 (a count or a fraction)"),
    )
    keep_layers: int | float = field(
        default=0.25, metadata=_doc("the layers the masks select, by learned gate (a count or a fraction)")
    )
    exclude: list[str] | None = field(
        default=None, metadata=_doc("frozen even in selected layers (glob, or re:regex); null: locate.DEFAULT_EXCLUDE")
    )

    def check(self, stage: str) -> None:
        super().check(stage)
        _check_patterns(f"{stage}.exclude", self.exclude or ())
        _check_layer_share(f"{stage}.keep_layers", self.keep_layers)
        if self.gate_target_layers is not None:
            _check_layer_share(f"{stage}.gate_target_layers", self.gate_target_layers)
        if not self.target_modules:
            raise ValueError(f"config key '{stage}.target_modules' must name at least one module, got []")


def _sparsity_field() -> Any:
    """forget's and improve's ``sparsity`` key: how the located neurons are trained."""
    return field(
        default=None,
        metadata=_choices(
            _SPARSITY_MODES_REF,
            "delta: compact row deltas, the rest frozen; masked: SparseAdamW; null: delta for row/layer masks",
        ),
    )


@dataclass
class ForgetStageConfig(StageTrainingArgs):
    """ALLO forgetting: token-weighted NPO on the rejected responses, updating only the located neurons."""

    learning_rate: float | None = _stage_default("learning_rate", 5e-7, ALLO_CODE)
    lr_scheduler_type: str | None = _stage_default("lr_scheduler_type", "cosine", ALLO_CODE)
    warmup_ratio: float | None = _stage_default("warmup_ratio", 0.03, ALLO_CODE)
    ratio: float | None = field(
        default=None, metadata=_range(0, 1, lo_open=True, doc="N1: share of neurons trained; null: locate.ratio")
    )
    sparsity: str | None = _sparsity_field()
    token_weight_source: str = field(
        default="token_weights",
        metadata=_choices(_TOKEN_WEIGHT_SOURCES_REF, "where each rejected token's weight comes from"),
    )
    scoring_model: str | None = field(
        default=None, metadata=_doc("token_weight_source scoring_model: the rewriting model's directory")
    )
    beta: float | None = field(default=None, metadata=_range(0, lo_open=True))

    def check(self, stage: str) -> None:
        super().check(stage)
        if self.token_weight_source == "scoring_model" and not self.scoring_model:
            raise ValueError(
                f"config key '{stage}.scoring_model' must name a model when {stage}.token_weight_source is "
                f"'scoring_model', got {self.scoring_model!r}"
            )


@dataclass
class ImproveStageConfig(StageTrainingArgs):
    """ALLO improving: DPO on the located neurons; a fraction of each rejected response's tokens is dropped from it."""

    learning_rate: float | None = _stage_default("learning_rate", 5e-6, ALLO_CODE)
    lr_scheduler_type: str | None = _stage_default("lr_scheduler_type", "cosine", ALLO_CODE)
    warmup_ratio: float | None = _stage_default("warmup_ratio", 0.1, ALLO_CODE)
    ratio: float | None = field(
        default=None, metadata=_range(0, 1, lo_open=True, doc="N2: share of neurons trained; null: locate.ratio")
    )
    sparsity: str | None = _sparsity_field()
    mask_fraction: float = field(
        default=0.9,
        metadata={
            **_range(0, 1, hi_open=True, doc="share of each rejected response's tokens dropped from the loss"),
            "stage_default": ALLO_CODE,
        },
    )
    mask_by: str = field(
        default="highest",
        metadata={
            **_choices(_MASK_BY_REF, "drop the highest- or the lowest-reward tokens"),
            "stage_default": ALLO_CODE,
        },
    )
    mask_scope: str = field(
        default="sequence",
        metadata={
            **_choices(_MASK_SCOPES_REF, "rank tokens within each response or the whole batch"),
            "stage_default": ALLO_CODE,
        },
    )
    beta: float | None = field(default=None, metadata=_range(0, lo_open=True))
    loss_type: str | None = field(default=None, metadata=_choices(_LOSS_TYPES_REF))
    label_smoothing: float | None = field(default=None, metadata=_range(0, 0.5))
    simpo_gamma: float | None = field(default=None, metadata=_range(0))


@dataclass
class PipelineConfig:
    stages: list[str] = field(
        default_factory=lambda: ["warmup", "locate", "forget", "improve"],
        metadata=_doc("the stages `allo-train pipeline` runs, in order"),
    )


# --------------------------------------------------------------------------------------------------------------------
# Top level
# --------------------------------------------------------------------------------------------------------------------


def _stage_table() -> dict:
    """``stages.STAGES``: which sections a config has. Imported when needed, not at the top of this module, because
    stages.py imports this module for the section classes."""
    from .stages import STAGES

    return STAGES


def _default_sections() -> dict[str, Any]:
    return {name: spec.section() for name, spec in _stage_table().items()}


@dataclass
class TrainConfig:
    model_name_or_path: str | None = field(
        default=None, metadata=_doc("the starting model: a local Hugging Face model directory")
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata=_doc("null: the starting model's tokenizer"))
    trust_remote_code: bool = field(default=False, metadata=_doc("let transformers run the model's own code"))
    output_dir: str = field(default="outputs", metadata=_doc("each stage writes <output_dir>/<stage>/"))
    seed: int = field(default=42, metadata=_doc("data order, held-out split, initialisation"))

    # Shared training defaults (TRL names); stage sections inherit them.
    beta: float = field(default=0.1, metadata=_range(0, lo_open=True, doc="DPO / NPO temperature of the log-ratio"))
    loss_type: str = field(default="sigmoid", metadata=_choices(_LOSS_TYPES_REF, "preference loss (sigmoid = DPO)"))
    label_smoothing: float = field(default=0.0, metadata=_range(0, 0.5, doc="conservative DPO's label noise"))
    simpo_gamma: float = field(default=1.0, metadata=_range(0, doc="loss_type simpo: the target margin"))
    learning_rate: float = field(default=5e-6, metadata=_range(0, lo_open=True, doc="peak learning rate (AdamW)"))
    per_device_train_batch_size: int = field(default=1, metadata=_range(1, doc="examples (pairs) per GPU per step"))
    per_device_eval_batch_size: int | None = field(
        default=None, metadata=_range(1, doc="held-out batch size; null: the train batch size")
    )
    gradient_accumulation_steps: int = field(default=1, metadata=_range(1, doc="micro-batches per optimizer step"))
    num_train_epochs: float = field(default=1.0, metadata=_range(0, lo_open=True, doc="passes over the data"))
    max_steps: int = field(default=-1, metadata=_range(-1, doc="optimizer steps; -1: run num_train_epochs"))
    warmup_ratio: float = field(default=0.0, metadata=_range(0, 1, doc="share of the steps with a linear LR warm-up"))
    lr_scheduler_type: str = field(default="linear", metadata=_choices(_LR_SCHEDULERS_REF, "LR schedule"))
    weight_decay: float = field(default=0.0, metadata=_range(0, doc="AdamW's decoupled weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=_range(0, doc="gradient clipping norm; 0: no clipping"))
    max_length: int = field(default=1024, metadata=_range(2, doc="tokens per sequence (prompt + response)"))
    max_prompt_length: int = field(default=512, metadata=_range(1, doc="prompt tokens kept (its end)"))
    bf16: bool = field(default=False, metadata=_doc("train in bfloat16 (DeepSpeed keeps fp32 master weights)"))
    gradient_checkpointing: bool = field(default=False, metadata=_doc("recompute activations in the backward"))
    deepspeed: str | dict | None = field(
        default=None, metadata=_doc("DeepSpeed config: a JSON/YAML path or inline; null: ZeRO stage 0")
    )
    logging_steps: int = field(default=10, metadata=_range(1, doc="metrics every N optimizer steps"))
    save_steps: int = field(default=500, metadata=_range(1, doc="a checkpoint every N optimizer steps"))
    save_total_limit: int | None = field(default=2, metadata=_range(1, doc="checkpoints kept; null: all"))
    eval_fraction: float = field(
        default=0.0, metadata=_range(0, 1, hi_open=True, doc="held-out share of the data, split by seed")
    )
    eval_steps: int | None = field(
        default=None, metadata=_range(1, doc="held-out evaluation every N steps; null: logging_steps")
    )
    report_to: list[str] = field(
        default_factory=lambda: ["jsonl"], metadata=_choices(REPORT_TO, "metric sinks (metrics.jsonl always)")
    )
    resume_from_checkpoint: bool | str = field(
        default=False, metadata=_doc("true: the newest verified checkpoint; or a checkpoint directory (--resume)")
    )
    allow_config_change: bool = field(
        default=False, metadata=_doc("resume a checkpoint whose training settings differ (--allow-config-change)")
    )

    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # One section per entry of the stage table, keyed by stage name; read them as cfg.<stage> or cfg.section(stage).
    # In YAML and in config_to_dict they are top-level keys named after the stage (there is no "sections" key).
    sections: dict[str, Any] = field(default_factory=_default_sections)

    def __getattr__(self, name: str) -> Any:
        # Called only when ordinary lookup fails: a stage name gives its section (cfg.improve).
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute or stage section {name!r}")

    def section(self, stage: str) -> Any:
        """The config section of ``stage``; ValueError for a stage the table does not have."""
        if stage not in self.sections:
            raise ValueError(f"stage must be one of {list(self.sections)}, got {stage!r}")
        return self.sections[stage]

    def stage_dir(self, stage: str) -> Path:
        """Where a stage writes its outputs (checkpoints, final model, masks, metrics): ``output_dir/<stage>``."""
        self.section(stage)
        return Path(self.output_dir) / stage

    def masks_stage(self) -> str:
        """The stage whose masks forget and improve train: ila when the pipeline runs ila and not locate, else
        locate."""
        stages = self.pipeline.stages
        return "ila" if "ila" in stages and "locate" not in stages else "locate"


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


_KEY_VALUE = re.compile(r"^[A-Za-z_][\w.-]*=")  # a "key=value" token is never the value of a preceding "--flag"


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``["--lr", "1e-5", "improve.mask_fraction=0.2", "--bf16"]`` -> ``{"lr": 1e-5, "improve.mask_fraction": 0.2,
    "bf16": True}``. Values are YAML-parsed; a ``--flag`` followed by another option, a ``key=value`` token or
    nothing means ``true``.
    Dashes inside keys become underscores (``--max-length`` == ``--max_length``)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, raw = body.split("=", 1)
                i += 1
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and not _KEY_VALUE.match(argv[i + 1]):
                key, raw = body, argv[i + 1]
                i += 2
            else:
                key, raw = body, "true"
                i += 1
        elif "=" in arg:
            key, raw = arg.split("=", 1)
            i += 1
        else:
            raise ValueError(f"override {arg!r} is neither '--key value', '--key=value' nor 'key=value'")
        key = key.strip().replace("-", "_")
        if not key:
            raise ValueError(f"override {arg!r} has an empty key")
        out[key] = _parse_scalar(raw)
    return out


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        return raw


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> TrainConfig:
    """Read ``path`` (YAML or JSON; None: all defaults), apply ``overrides`` (argv-style list or {dotted key: value}),
    validate, and fill each stage's unset training fields from the top level."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                loaded = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping at the top, got {type(loaded).__name__}")
        raw = loaded
    if overrides:
        pairs = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        for dotted, value in pairs.items():
            _set_dotted(raw, dotted, value)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build and check the config. Keys, types, ranges and cross-field rules are checked first; the values whose
    choices another module owns are checked last, when their owners are imported (see the module docstring)."""
    owned: list[tuple[str, Any, str]] = []  # (dotted key, value, "module:NAME") checked once the structure is right
    cfg = _build(TrainConfig, raw, prefix="", owned=owned)
    _resolve_and_check(cfg, raw)
    for dotted, value, ref in owned:
        _check_value(dotted, value, {"choices": owner_value(ref)})
    if "locate" in cfg.sections:
        cfg.locate.resolve_method("locate")
    for name in ("locate", "ila"):
        section = cfg.sections.get(name)
        if section is not None and section.exclude is None:
            section.exclude = list(owner_value(_DEFAULT_EXCLUDE_REF))
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain data, laid out as the YAML is: the stage sections are top-level keys."""
    out = dataclasses.asdict(cfg)
    sections = out.pop("sections")
    return {**out, **sections}


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (reloads to an equal config)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def render_config(cfg: TrainConfig | None = None, *, stage: str | None = None) -> str:
    """``cfg`` (None: the defaults) as YAML with a one-line comment on every key: what it is, its choices or range,
    and for a stage's key where its value comes from when the section leaves it unset. Generated from the dataclasses
    and the stage table, so a new key or stage shows up by itself. ``stage``: that section only.
    ``yaml.safe_load`` of the text equals :func:`config_to_dict` of the config (of its section for ``stage``)."""
    cfg = load_config() if cfg is None else cfg
    table = _stage_table()
    if stage is not None and stage not in table:
        raise ValueError(f"stage must be one of {list(table)}, got {stage!r}")
    top = {f.name: f for f in dataclasses.fields(TrainConfig)}
    blocks: list[list[tuple[str, str]]] = []  # (YAML text, comment) lines, aligned per block

    def block(header: tuple[str, str] | None, obj: Any, indent: str, section: str | None) -> None:
        lines = [header] if header else []
        nested = []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name == "sections":
                continue
            if dataclasses.is_dataclass(value):
                nested.append((f.name, value))
                continue
            lines.append((f"{indent}{f.name}: {_flow_yaml(value)}", _key_comment(f, top, section)))
        blocks.append(lines)
        for name, value in nested:
            block((f"{indent}{name}:", ""), value, indent + "  ", name)

    if stage is None:
        blocks.append(
            [
                ("# allo-train config: every key and its value. A key a stage section does not set takes the", ""),
                ("# top-level key's value when the config sets that, else the stage's own default.", ""),
            ]
        )
        block(None, cfg, "", None)
    for name, spec in table.items():
        if stage is None or stage == name:
            block((f"{name}:", spec.summary), cfg.section(name), "  ", name)
    out = []
    for lines in blocks:
        width = min(40, max((len(text) for text, comment in lines if comment), default=0))
        out += [f"{text:<{width}}  # {comment}" if comment else text for text, comment in lines]
    return "\n".join(out) + "\n"


def _flow_yaml(value: Any) -> str:
    """One value as inline YAML (``5.0e-06``, ``null``, ``[a, b]``, ``{stage: 3}``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False).strip()
    return text.removesuffix("\n...").strip()


def _key_comment(f: dataclasses.Field, top: dict[str, dataclasses.Field], section: str | None) -> str:
    """doc; choices or range; for a stage key shared with the top level, what an unset value becomes."""
    meta = f.metadata
    shared = section is not None and f.name in top and section != "pipeline"
    doc = meta.get("doc") or (top[f.name].metadata.get("doc", "") if shared else "")
    parts = [doc or str(f.type)]  # a key nobody described still says what it holds
    choices = choices_of(meta)
    if choices:
        parts.append("one of " + ", ".join(map(str, choices)))
    elif "range" in meta:
        lo, hi, lo_open, hi_open = meta["range"]
        parts.append(
            f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}"
            f"{')' if hi_open or hi is None else ']'}"
        )
    if shared and "stage_default" in meta:
        parts.append(f"unset: the top level's if set, else {_flow_yaml(f.default)} ({meta['stage_default']})")
    elif shared:
        parts.append("unset: the top level's")
    elif "stage_default" in meta:
        parts.append(f"default from {meta['stage_default']}")
    return "; ".join(p for p in parts if p)


# Stage fields that set when or how things are logged, saved or evaluated, not what is trained: they may change on
# resume.
SCHEDULE_ONLY_KEYS = ("logging_steps", "save_steps", "eval_steps", "per_device_eval_batch_size")


class ConfigChangedError(AlloTrainError):
    """A checkpoint was written under other training settings than the config of the run that resumes it."""


def training_settings(cfg: TrainConfig, stage: str, section: Any = None) -> dict[str, Any]:
    """The settings that decide what a training stage computes, as ``{dotted key: value}`` (JSON values).

    The stage section as resolved (its own values and the top-level ones it inherits: learning rate, schedule,
    batch size, steps, lengths, beta, data path, held-out share, ratio, ...) except ``SCHEDULE_ONLY_KEYS``, plus the
    top-level ``seed``, ``bf16``, ``tokenizer_name_or_path`` and ``deepspeed.zero_optimization``. Not included:
    logging/saving/evaluation cadence, ``output_dir``, ``report_to``, ``save_total_limit``,
    ``gradient_checkpointing`` (same math), ``trust_remote_code``. The caller adds what it resolves itself (the
    starting model, the masks' digest, and ``<stage>.sparsity`` as the stage decided it when the key is unset).
    ``section``: the stage's section as the stage resolved it (default: the config's)."""
    section = cfg.section(stage) if section is None else section
    out = {f"{stage}.{k}": v for k, v in dataclasses.asdict(section).items() if k not in SCHEDULE_ONLY_KEYS}
    ds = resolve_deepspeed_config(cfg) or {}
    out.update(
        {
            "seed": cfg.seed,
            "bf16": cfg.bf16,
            "tokenizer_name_or_path": cfg.tokenizer_name_or_path,
            "deepspeed.zero_optimization": ds.get("zero_optimization", {"stage": 0}),
        }
    )
    return json.loads(json.dumps(out, default=str))


def settings_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"<key>: <saved> (checkpoint) -> <current> (now)"`` for every key whose value differs or is only on one side."""
    missing = object()
    lines = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, missing), current.get(key, missing)
        if a != b:
            show = lambda v: "(not set)" if v is missing else json.dumps(v)  # noqa: E731
            lines.append(f"{key}: {show(a)} (checkpoint) -> {show(b)} (now)")
    return lines


def resolve_deepspeed_config(cfg: TrainConfig) -> dict | None:
    """The ``deepspeed`` field as a dict: read from its JSON/YAML file when it is a path."""
    ds = cfg.deepspeed
    if ds is None or isinstance(ds, dict):
        return ds
    p = Path(ds)
    if not p.is_file():
        raise ValueError(f"config key 'deepspeed' names a file that does not exist: {ds!r}")
    text = p.read_text(encoding="utf-8")
    try:
        out = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"config key 'deepspeed': {ds!r} is not valid JSON/YAML: {e}") from None
    if not isinstance(out, dict):
        raise ValueError(f"config key 'deepspeed': {ds!r} must hold a mapping, got {type(out).__name__}")
    return out


# --------------------------------------------------------------------------------------------------------------------
# Internals: dict -> dataclass with type checks
# --------------------------------------------------------------------------------------------------------------------


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"config key {'.'.join(parts[: i + 1])!r} is not a section, cannot set {dotted!r}")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, *, prefix: str, owned: list) -> Any:
    where = prefix.rstrip(".") or "<top level>"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"config key {where!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # TrainConfig: the stage table's sections are keys of their own; "sections" itself is not a key.
    sections = _stage_table() if cls is TrainConfig else {}
    if sections:
        del fields["sections"]
    for key in raw:
        if key not in fields and key not in sections:
            known = ", ".join(sorted([*fields, *sections]))
            raise ValueError(
                f"unknown config key {prefix + str(key)!r} (value {raw[key]!r}); known keys in {where}: {known}"
            )
    kwargs = {}
    for name, value in raw.items():
        if name in sections:
            continue
        dotted = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, prefix=dotted + ".", owned=owned)
        else:
            kwargs[name] = _check_value(dotted, _coerce(dotted, value, tp), fields[name].metadata, owned)
    if sections:
        kwargs["sections"] = {
            name: _build(spec.section, raw.get(name), prefix=f"{name}.", owned=owned) for name, spec in sections.items()
        }
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(dotted: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ValueError(f"config key {dotted!r} must not be null")
        # Exact type matches first so a bool stays a bool in Union[bool, str].
        for opt in sorted((o for o in options if o is not type(None)), key=lambda o: not _exact(value, o)):
            try:
                return _coerce(dotted, value, opt)
            except ValueError:
                pass
        raise ValueError(f"config key {dotted!r} must be {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # a single string where a list is expected: accept as one item
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {dotted!r} must be a list, got {value!r}")
        return [_coerce(f"{dotted}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {dotted!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"config key {dotted!r} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                out = float(value)
            except ValueError:
                raise ValueError(f"config key {dotted!r} must be a number, got {value!r}") from None
        else:
            raise ValueError(f"config key {dotted!r} must be a number, got {value!r}")
        if not math.isfinite(out):
            raise ValueError(f"config key {dotted!r} must be finite, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"config key {dotted!r} must be a string, got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise ValueError(f"config key {dotted!r} must be a mapping, got {value!r}")
    raise TypeError(f"internal: no coercion for type {tp!r} of {dotted!r}")


def _exact(value: Any, tp: Any) -> bool:
    return isinstance(tp, type) and type(value) is tp


def _check_value(dotted: str, value: Any, meta: Any, owned: list | None = None) -> Any:
    """Range and choices of one value. Choices named as "module:NAME" are appended to ``owned`` (checked later by
    config_from_dict, when the owner may be imported)."""
    if value is None:
        return value
    if isinstance(value, list):  # the metadata applies to each item
        return [_check_value(f"{dotted}[{i}]", v, meta, owned) for i, v in enumerate(value)]
    if isinstance(meta.get("choices"), str):
        if owned is None:
            meta = {**meta, "choices": choices_of(meta)}
        else:
            owned.append((dotted, value, meta["choices"]))
    if "choices" in meta and not isinstance(meta["choices"], str) and value not in meta["choices"]:
        raise ValueError(f"config key {dotted!r} must be one of {list(meta['choices'])}, got {value!r}")
    if "range" in meta:
        lo, hi, lo_open, hi_open = meta["range"]
        bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (
            hi is not None and (value > hi or (hi_open and value == hi))
        )
        if bad:
            lo_s = "-inf" if lo is None else lo
            hi_s = "inf" if hi is None else hi
            interval = f"{'(' if lo_open else '['}{lo_s}, {hi_s}{')' if hi_open or hi is None else ']'}"
            raise ValueError(f"config key {dotted!r} must be in {interval}, got {value!r}")
    return value


def _check_patterns(key: str, patterns: list[str]) -> None:
    for i, pattern in enumerate(patterns):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise ValueError(f"config key '{key}[{i}]' is not a valid regex: {pattern!r} ({e})") from None


def _check_layer_share(key: str, value: int | float) -> None:
    """A number of layers (an integer >= 1) or a fraction of them (a float in (0, 1])."""
    if (isinstance(value, int) and value < 1) or (isinstance(value, float) and not 0 < value <= 1):
        raise ValueError(
            f"config key {key!r} must be a number of layers (an integer >= 1) or a fraction of them (a float in "
            f"(0, 1]), got {value!r}"
        )


def _check_lengths(prefix: str, section: Any) -> None:
    if section.max_prompt_length >= section.max_length:
        raise ValueError(
            f"config key {prefix + 'max_prompt_length'!r} must be < {prefix + 'max_length'} "
            f"({section.max_length}), got {section.max_prompt_length}"
        )


def _resolve_and_check(cfg: TrainConfig, raw: dict[str, Any]) -> None:
    """Fill each section's fields from the top level (see the module docstring for the order), then the checks
    across keys. ``raw``: the mapping the config was built from (which keys were set)."""
    top_level = {f.name for f in dataclasses.fields(TrainConfig)}
    table = _stage_table()
    for stage, section in cfg.sections.items():
        set_here = raw.get(stage) or {}
        for f in dataclasses.fields(section):
            if f.name not in top_level or f.name in set_here:
                continue
            if f.name in raw or getattr(section, f.name) is None:  # the top level's value, set or default
                setattr(section, f.name, getattr(cfg, f.name))
        if table[stage].needs_masks and section.ratio is None:
            section.ratio = cfg.locate.ratio
        # ILA's masks (locate.method ila, or a pipeline that runs ila and not locate) are whole layers.
        ila_masks = cfg.locate.method == "ila" or cfg.masks_stage() == "ila"
        if table[stage].needs_masks and ila_masks and section.ratio != cfg.locate.ratio:
            raise ValueError(
                f"config key '{stage}.ratio' ({section.ratio}) differs from locate.ratio ({cfg.locate.ratio}), which "
                "re-selects neurons from locate's importance; ILA selects whole layers (ila.keep_layers): leave "
                f"{stage}.ratio unset"
            )
        located_elements = cfg.locate.granularity == "element" and cfg.locate.method != "ila"
        if getattr(section, "sparsity", None) == "delta" and located_elements and cfg.masks_stage() == "locate":
            raise ValueError(
                f"config key '{stage}.sparsity' is 'delta' but locate.granularity is 'element': element masks cannot "
                f"be made compact (row deltas train whole rows); set {stage}.sparsity: masked, or locate.granularity: "
                "row or layer"
            )

    for i, stage in enumerate(cfg.pipeline.stages):
        if stage not in table:
            raise ValueError(f"config key 'pipeline.stages[{i}]' must be one of {list(table)}, got {stage!r}")
    if len(set(cfg.pipeline.stages)) != len(cfg.pipeline.stages):
        raise ValueError(f"config key 'pipeline.stages' lists a stage twice: {cfg.pipeline.stages!r}")
    _check_lengths("", cfg)
    for stage, section in cfg.sections.items():
        if hasattr(section, "check"):
            section.check(stage)
