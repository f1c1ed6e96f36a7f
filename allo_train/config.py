"""One config for the whole ALLO pipeline: YAML mapped onto dataclasses, command-line overrides on top.

Field names follow TRL's ``DPOConfig`` / ``TrainingArguments`` where a TRL name exists (``beta``, ``learning_rate``,
``per_device_train_batch_size``, ...), so a TRL YAML mostly loads as is. Layout::

    model_name_or_path: ...          # top level: TrainConfig (shared defaults)
    learning_rate: 5.0e-6
    pipeline: {stages: [warmup, locate, forget, improve]}
    warmup:  {data_path: pref.jsonl}
    locate:  {method: weight_delta, granularity: element, ratio: 0.05}
    forget:  {data_path: forget.jsonl, token_weight_source: corrected, learning_rate: 5.0e-7}
    improve: {data_path: pref.jsonl, mask_fraction: 0.1}

There is one section per entry of the stage table (``stages.STAGES``), named after the stage and holding that
stage's ``section`` dataclass (defined below); ``cfg.improve`` (or ``cfg.section("improve")``) is the section.
A section field left at ``None`` whose name is also a top-level field (the training fields of
:class:`StageTrainingArgs`, ``beta``, ``loss_type``, ...) takes the top-level value when the config is loaded, so
after :func:`load_config` every stage field holds a concrete value. A stage that trains only the located neurons
(``needs_masks`` in its table entry) takes ``locate.ratio`` when its ``ratio`` is ``None``.

Choices that another module owns are imported from it, never repeated here: the preference loss types
(``allo_kernels.objectives``), the token-drop options (``allo_kernels.ops.token_scores``), the LR schedules
(``engine``), granularities, scopes and the default exclusions (``locate``), the token-weight sources (``data``).

Overrides (:func:`parse_overrides`): ``--key value``, ``--key=value`` or ``key=value``; dotted keys reach into
sections (``improve.mask_fraction=0.2``). Values are parsed as YAML (``true``, ``0.2``, ``[a, b]``, ``null``).

Unknown keys and bad values raise ``ValueError`` naming the dotted key and the value received.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from allo_kernels.objectives import PREFERENCE_LOSS_TYPES
from allo_kernels.ops.token_scores import MASK_BY, MASK_SCOPES

from .data import TOKEN_WEIGHT_SOURCES
from .engine import LR_SCHEDULERS
from .errors import AlloTrainError
from .ila import ALL_LINEAR, OBJECTIVES
from .locate import DEFAULT_EXCLUDE, GRANULARITIES, IMPORTANCE_METHODS, IMPORTANCES, METHODS, SCOPES

REPORT_TO = ("jsonl", "tensorboard", "none")


def _choices(values: tuple[str, ...]) -> dict:
    return {"choices": values}  # the owner's tuple itself


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open, hi_open)}


# --------------------------------------------------------------------------------------------------------------------
# Stage sections (the ``section`` of each entry of stages.STAGES)
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StageTrainingArgs:
    """Training fields every training stage has; ``None`` means "take the top-level value"."""

    data_path: str | None = None
    learning_rate: float | None = field(default=None, metadata=_range(0, lo_open=True))
    per_device_train_batch_size: int | None = field(default=None, metadata=_range(1))
    per_device_eval_batch_size: int | None = field(default=None, metadata=_range(1))
    gradient_accumulation_steps: int | None = field(default=None, metadata=_range(1))
    num_train_epochs: float | None = field(default=None, metadata=_range(0, lo_open=True))
    max_steps: int | None = field(default=None, metadata=_range(-1))
    warmup_ratio: float | None = field(default=None, metadata=_range(0, 1))
    lr_scheduler_type: str | None = field(default=None, metadata=_choices(LR_SCHEDULERS))
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


@dataclass
class SFTStageConfig(StageTrainingArgs):
    """Supervised fine-tuning on prompt-completion JSONL (TRL format: {"prompt", "completion"})."""

    completion_field: str = "completion"  # set to "chosen" to SFT on the chosen side of a preference file


@dataclass
class CorrectStageConfig(StageTrainingArgs):
    """Aligner-style corrector training on {"question", "answer", "correction"} JSONL."""

    # Share of the examples first trained as answer -> answer identity pairs (Aligner's warm-up; the paper uses 0.2).
    identity_warmup_fraction: float = field(default=0.0, metadata=_range(0, 1))


@dataclass
class WarmupStageConfig(StageTrainingArgs):
    """Full-parameter DPO on preference JSONL; its result is theta_warm for ``locate``."""

    beta: float | None = field(default=None, metadata=_range(0, lo_open=True))
    loss_type: str | None = field(default=None, metadata=_choices(PREFERENCE_LOSS_TYPES))
    label_smoothing: float | None = field(default=None, metadata=_range(0, 0.5))
    simpo_gamma: float | None = field(default=None, metadata=_range(0))  # loss_type "simpo": the target margin


@dataclass
class LocateStageConfig:
    """Neuron location: importance per parameter, then the top ``ratio`` of it (see allo_train.locate); or, with
    ``method: ila``, whole decoder layers chosen by the ``ila`` section's learned gates."""

    method: str | None = field(default=None, metadata=_choices(METHODS))  # None: "weight_delta"
    importance: str | None = field(default=None, metadata=_choices(IMPORTANCES))  # earlier name of method
    divide_by_lr: bool = False  # "weight_delta": |theta_warm - theta_start| / learning_rate of the warm-up
    granularity: str = field(default="element", metadata=_choices(GRANULARITIES))
    ratio: float = field(default=0.05, metadata=_range(0, 1, lo_open=True))
    scope: str = field(default="global", metadata=_choices(SCOPES))
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    start_model: str | None = None  # None: model_name_or_path
    warm_model: str | None = None  # None: the warm-up stage's output
    data_path: str | None = None  # "grad": preference data whose DPO gradients are accumulated; None: warmup's
    grad_num_batches: int = field(default=16, metadata=_range(1))

    def check(self, stage: str) -> None:
        _check_patterns(f"{stage}.exclude", self.exclude)
        if self.importance is not None:  # the earlier key: delta -> weight_delta, grad -> grad
            meant = IMPORTANCE_METHODS[self.importance]
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
    learning_rate: float | None = field(default=1e-4, metadata=_range(0, lo_open=True))
    objective: str = field(default="dpo", metadata=_choices(OBJECTIVES))
    completion_field: str = "completion"  # objective "sft": the completion key of the data
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])  # module names in each decoder layer
    lora_r: int = field(default=8, metadata=_range(1))
    lora_alpha: float = field(default=16.0, metadata=_range(0, lo_open=True))
    lora_dropout: float = field(default=0.0, metadata=_range(0, 1, hi_open=True))
    lora_steps: int | None = field(default=None, metadata=_range(1))  # phase 1; None: max_steps / num_train_epochs
    gate_steps: int = field(default=100, metadata=_range(1))  # phase 2
    gate_learning_rate: float = field(default=0.1, metadata=_range(0, lo_open=True))  # Adam on the gate logits
    gate_per_module: bool = False  # one gate per (layer, module) instead of per layer
    gate_penalty: float = field(default=0.1, metadata=_range(0))  # lambda of the sparsity term
    gate_target_layers: int | float | None = None  # None: lambda * mean(gate); else lambda * (mean(gate) - k/n)^2
    keep_layers: int | float = 0.25  # the layers the masks select, by learned gate
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))  # frozen even in selected layers

    def check(self, stage: str) -> None:
        super().check(stage)
        _check_patterns(f"{stage}.exclude", self.exclude)
        _check_layer_share(f"{stage}.keep_layers", self.keep_layers)
        if self.gate_target_layers is not None:
            _check_layer_share(f"{stage}.gate_target_layers", self.gate_target_layers)
        if not self.target_modules:
            raise ValueError(f"config key '{stage}.target_modules' must name at least one module, got []")


@dataclass
class ForgetStageConfig(StageTrainingArgs):
    """ALLO forgetting: token-weighted NPO on the rejected responses, updating only the located neurons."""

    ratio: float | None = field(default=None, metadata=_range(0, 1, lo_open=True))  # N1; None: locate.ratio
    token_weight_source: str = field(default="token_weights", metadata=_choices(TOKEN_WEIGHT_SOURCES))
    scoring_model: str | None = None  # required when token_weight_source == "scoring_model"
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

    ratio: float | None = field(default=None, metadata=_range(0, 1, lo_open=True))  # N2; None: locate.ratio
    mask_fraction: float = field(default=0.1, metadata=_range(0, 1, hi_open=True))  # share of tokens dropped
    mask_by: str = field(default="highest", metadata=_choices(MASK_BY))  # drop the highest- or lowest-reward ones
    mask_scope: str = field(default="sequence", metadata=_choices(MASK_SCOPES))
    beta: float | None = field(default=None, metadata=_range(0, lo_open=True))
    loss_type: str | None = field(default=None, metadata=_choices(PREFERENCE_LOSS_TYPES))
    label_smoothing: float | None = field(default=None, metadata=_range(0, 0.5))
    simpo_gamma: float | None = field(default=None, metadata=_range(0))  # loss_type "simpo": the target margin


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: ["warmup", "locate", "forget", "improve"])


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
    model_name_or_path: str | None = None
    tokenizer_name_or_path: str | None = None  # None: model_name_or_path
    trust_remote_code: bool = False
    output_dir: str = "outputs"
    seed: int = 42

    # Shared training defaults (TRL names); stage sections inherit them.
    beta: float = field(default=0.1, metadata=_range(0, lo_open=True))
    loss_type: str = field(default="sigmoid", metadata=_choices(PREFERENCE_LOSS_TYPES))
    label_smoothing: float = field(default=0.0, metadata=_range(0, 0.5))
    simpo_gamma: float = field(default=1.0, metadata=_range(0))  # loss_type "simpo" only
    learning_rate: float = field(default=5e-6, metadata=_range(0, lo_open=True))
    per_device_train_batch_size: int = field(default=1, metadata=_range(1))
    per_device_eval_batch_size: int | None = field(default=None, metadata=_range(1))  # None: the train batch size
    gradient_accumulation_steps: int = field(default=1, metadata=_range(1))
    num_train_epochs: float = field(default=1.0, metadata=_range(0, lo_open=True))
    max_steps: int = field(default=-1, metadata=_range(-1))  # -1: run num_train_epochs
    warmup_ratio: float = field(default=0.0, metadata=_range(0, 1))
    lr_scheduler_type: str = field(default="linear", metadata=_choices(LR_SCHEDULERS))
    weight_decay: float = field(default=0.0, metadata=_range(0))
    max_grad_norm: float = field(default=1.0, metadata=_range(0))  # 0: no clipping
    max_length: int = field(default=1024, metadata=_range(2))
    max_prompt_length: int = field(default=512, metadata=_range(1))
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed: str | dict | None = None  # path to a DeepSpeed JSON/YAML, or the config inline
    logging_steps: int = field(default=10, metadata=_range(1))
    save_steps: int = field(default=500, metadata=_range(1))
    save_total_limit: int | None = field(default=2, metadata=_range(1))
    eval_fraction: float = field(default=0.0, metadata=_range(0, 1, hi_open=True))  # held-out share, split by seed
    eval_steps: int | None = field(default=None, metadata=_range(1))  # None: logging_steps
    report_to: list[str] = field(default_factory=lambda: ["jsonl"], metadata=_choices(REPORT_TO))
    resume_from_checkpoint: bool | str = False  # True: the newest verified checkpoint in the stage dir
    allow_config_change: bool = False  # resume a checkpoint whose training settings differ (see training_settings)

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
    cfg = _build(TrainConfig, raw, prefix="")
    _resolve_and_check(cfg)
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
    starting model, the masks' digest). ``section``: the stage's section as the stage resolved it (default: the
    config's)."""
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


def _build(cls: type, raw: Any, *, prefix: str) -> Any:
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
            kwargs[name] = _build(tp, value, prefix=dotted + ".")
        else:
            kwargs[name] = _check_value(dotted, _coerce(dotted, value, tp), fields[name].metadata)
    if sections:
        kwargs["sections"] = {
            name: _build(spec.section, raw.get(name), prefix=f"{name}.") for name, spec in sections.items()
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


def _check_value(dotted: str, value: Any, meta: Any) -> Any:
    if value is None:
        return value
    if isinstance(value, list):  # the metadata applies to each item
        return [_check_value(f"{dotted}[{i}]", v, meta) for i, v in enumerate(value)]
    if "choices" in meta and value not in meta["choices"]:
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


def _resolve_and_check(cfg: TrainConfig) -> None:
    top_level = {f.name for f in dataclasses.fields(TrainConfig)}
    table = _stage_table()
    for stage, section in cfg.sections.items():
        for f in dataclasses.fields(section):  # None: the top-level value of the same name
            if f.name in top_level and getattr(section, f.name) is None:
                setattr(section, f.name, getattr(cfg, f.name))
        if table[stage].needs_masks and section.ratio is None:
            section.ratio = cfg.locate.ratio

    for i, stage in enumerate(cfg.pipeline.stages):
        if stage not in table:
            raise ValueError(f"config key 'pipeline.stages[{i}]' must be one of {list(table)}, got {stage!r}")
    if len(set(cfg.pipeline.stages)) != len(cfg.pipeline.stages):
        raise ValueError(f"config key 'pipeline.stages' lists a stage twice: {cfg.pipeline.stages!r}")
    _check_lengths("", cfg)
    for stage, section in cfg.sections.items():
        if hasattr(section, "check"):
            section.check(stage)
