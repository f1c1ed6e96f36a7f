"""ILA (arXiv 2410.17875, "Understanding Layer Significance in LLM Alignment"): which decoder layers matter for an
alignment objective, learned as gates on LoRA increments; then masks that train only those layers.

The model is W_i = W_i^0 + gamma_i * dW_i for every decoder layer i, dW_i its LoRA increments:

* **Phase 1** (``lora_steps``): PEFT LoRA (``peft.LoraConfig`` / ``get_peft_model``) on ``target_modules`` of every
  decoder layer, trained with the stage's ``objective`` (``sft`` or ``dpo``: the data function, collator and loss of
  the ``sft`` / ``warmup`` entries of the stage table) through the same loop as every stage: DeepSpeed at any ZeRO
  stage, reference log-probs cached, checkpoints and ``--resume``. The increments start at zero (LoRA's B = 0), so
  the reference is the starting model, which is also the model with every gate closed.
* **Phase 2** (``gate_steps``): the LoRA weights frozen, one gate gamma = sigmoid(s) per layer (``gate_per_module``:
  per layer and module) scales that layer's increments; s starts at ``GATE_INIT`` (gamma 0.95, nearly the phase-1
  model) and Adam trains it on ``objective + gate_penalty * mean(gamma)`` (with ``gate_target_layers`` = k:
  ``gate_penalty * (mean(gamma) - k/n)^2``). A layer whose increments lower the loss holds its gate open against
  the penalty; a layer whose increments do not matter sees the penalty alone and closes fastest.
* **Output** (``<output_dir>/ila/``): ``layer_importance.json`` (per layer its score = final gate, the mean of its
  modules' gates with ``gate_per_module``; per module its gate and the size of its phase-1 increment
  ``||scaling * B A||_F``; the ranking, the chosen layers, losses with no / all / only the chosen layers' increments,
  the gate history, the settings), ``layer_importance.png`` (scores and gate trajectories), ``masks.safetensors`` +
  ``mask_stats.json`` + ``mask_heatmap.png`` in locate's format at layer granularity, selecting the top
  ``keep_layers`` layers (their parameters but ``exclude``), and ``lora/``, the phase-1 adapter as PEFT saves it.

How the gate reaches PEFT's LoRA: a forward hook on each adapted module's ``lora_B`` multiplies its output by gamma.
PEFT's LoRA layer adds ``lora_B(lora_A(dropout(x))) * scaling`` to the base output, so scaling ``lora_B``'s output
scales exactly that layer's increment, differentiably, without touching PEFT's state. The alternative, putting a
tensor into the layer's ``scaling`` dict, would rely on an undocumented type (PEFT keeps floats there and does
arithmetic on them in ``set_scale`` / merging) and would have to be refreshed before every forward. Forward hooks are
torch's public API and PEFT uses them itself; the hooks are removed when phase 2 ends. Only plain LoRA is supported
(no DoRA or other variants: they do not go through ``lora_B``'s output alone).

Where it runs: phase 1 trains under DeepSpeed like every stage, because LoRA on a 7B model wants ZeRO and data
parallelism; phase 2 trains a few dozen scalars, so it runs as plain torch on rank 0 (like locate's gradient
importance) on the full model rebuilt from the starting weights and the gathered LoRA weights (under ZeRO-3 rank 0
needs the whole model in memory for it, without gradients for its weights); the other ranks wait. On one CPU
process both phases are plain and fast.

``allo-train compare-layers A.json B.json [--top K]`` prints the overlap (count and Jaccard index) of two
selections, the figure ILA reports across datasets.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import data as D
from .config import ALL_LINEAR
from .files import write_atomic
from .locate import layer_index, layer_masks, mask_stats, module_type, save_masks
from .model import PolicyHiddenStates, load_causal_lm, save_pretrained_atomic

if TYPE_CHECKING:
    from .run import Run
    from .stages import StageSpec

# ila.objective -> the stage of the table whose data function, collator and loss phase 1 and 2 use.
OBJECTIVE_STAGES = {"sft": "sft", "dpo": "warmup"}
OBJECTIVES = tuple(OBJECTIVE_STAGES)
LAYER_IMPORTANCE_FILE = "layer_importance.json"
PLOT_FILE = "layer_importance.png"
LORA_DIR = "lora"
GATE_INIT = 3.0  # initial gate logit: sigmoid(3) = 0.95, phase 2 starts next to the phase-1 model
EVAL_BATCHES = 8  # batches the losses with no / all / the chosen layers' increments are measured on
ADAPTER = "default"  # PEFT's adapter name


# ----------------------------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class LoraTarget:
    name: str  # module name in the model, e.g. "model.layers.3.self_attn.q_proj"
    layer: int
    module: str  # its module type within the layer, e.g. "self_attn.q_proj"


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2 style linear layers, which PEFT's LoRA supports too

    return isinstance(module, (nn.Linear, Conv1D))


def lora_targets(model: nn.Module, target_modules: Sequence[str], *, key: str, model_key: str) -> list[LoraTarget]:
    """The linear modules of the decoder layers that ``target_modules`` name: a name matches a module type or its
    last part (``q_proj`` matches ``self_attn.q_proj``), ``"all-linear"`` every linear module. ValueError naming
    ``key`` for a name that matches no linear module of any layer, or a layer without any target, and naming
    ``model_key`` for a model without numbered decoder layers."""
    in_layers = [(name, m) for name, m in model.named_modules() if name and layer_index(name + ".") is not None]
    layers = sorted({layer_index(name + ".") for name, _ in in_layers})
    if not layers:
        raise ValueError(
            f"config key {model_key!r}: the model has no numbered decoder layers (module names like "
            "'model.layers.0.self_attn'), so ILA has no layers to rank"
        )
    linear = [(name, layer_index(name + "."), module_type(name)) for name, m in in_layers if _is_linear(m)]
    types = sorted({t for _, _, t in linear})
    wanted = list(target_modules)

    def named(mtype: str, target: str) -> bool:
        return target == ALL_LINEAR or mtype == target or mtype.endswith("." + target)

    for target in wanted:
        if not any(named(t, target) for t in types):
            raise ValueError(
                f"config key {key!r} names {target!r}, which is no linear module of the decoder layers; they have "
                f"{', '.join(types) or 'none'} (or use {ALL_LINEAR!r})"
            )
    targets = [LoraTarget(n, i, t) for n, i, t in linear if any(named(t, w) for w in wanted)]
    bare = [i for i in layers if not any(t.layer == i for t in targets)]
    if bare:
        raise ValueError(f"config key {key!r}: {wanted} names no module of decoder layer(s) {bare}")
    return targets


def layer_count(value: int | float, n_layers: int, *, key: str) -> int:
    """An integer is a number of layers (at most ``n_layers``), a float a fraction of them rounded up (on its decimal
    value: 0.3 of 10 layers is 3)."""
    if isinstance(value, int):
        if not 1 <= value <= n_layers:
            raise ValueError(f"config key {key!r} must be in [1, {n_layers}] (the model's layers), got {value!r}")
        return value
    return max(1, math.ceil(Fraction(repr(float(value))) * n_layers))


def attach_lora(model: nn.Module, targets: Sequence[LoraTarget], args: Any):
    """PEFT LoRA on exactly the ``targets`` (full module names, so nothing else matches); freezes every other
    parameter. Returns the PeftModel (``model`` itself is changed in place and keeps working as before)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=[t.name for t in targets],
        bias="none",
    )
    return get_peft_model(model, config, adapter_name=ADAPTER)


def _is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


# ----------------------------------------------------------------------------------------------------- gates
class LayerGates(nn.Module):
    """gamma = sigmoid(logits), one per layer (or per layer and module), each scaling its modules' LoRA increments
    through a forward hook on their ``lora_B`` (see the module docstring). ``remove()`` takes the hooks off."""

    def __init__(self, model: nn.Module, targets: Sequence[LoraTarget], *, per_module: bool) -> None:
        super().__init__()
        self.keys = sorted({(t.layer, t.module) if per_module else (t.layer, "") for t in targets})
        index = {k: i for i, k in enumerate(self.keys)}
        self.logits = nn.Parameter(torch.full((len(self.keys),), GATE_INIT))
        self._fixed: torch.Tensor | None = None
        self._handles = []
        for t in targets:
            lora_b = model.get_submodule(t.name).lora_B[ADAPTER]
            i = index[(t.layer, t.module if per_module else "")]
            self._handles.append(lora_b.register_forward_hook(partial(self._scale, i)))

    def _scale(self, i: int, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        gamma = self.values() if self._fixed is None else self._fixed
        return output * gamma[i].to(output.dtype)

    def values(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @contextmanager
    def fixed(self, values: torch.Tensor) -> Iterator[None]:
        """Gates held at ``values`` inside the block (to measure a loss with chosen increments on or off)."""
        self._fixed = values.to(self.logits.device)
        try:
            yield
        finally:
            self._fixed = None

    def layer_scores(self, values: torch.Tensor | None = None) -> dict[int, float]:
        """Per layer the mean of its gates."""
        values = (self.values() if values is None else values).detach().double().cpu()
        sums: dict[int, list[float]] = {}
        for (layer, _), v in zip(self.keys, values.tolist()):
            sums.setdefault(layer, []).append(v)
        return {layer: sum(vs) / len(vs) for layer, vs in sums.items()}

    def for_layers(self, layers: set[int]) -> torch.Tensor:
        """Gate values 1 for the gates of ``layers``, 0 elsewhere."""
        return torch.tensor([float(layer in layers) for layer, _ in self.keys])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def gate_penalty(gamma: torch.Tensor, *, weight: float, target: float | None) -> torch.Tensor:
    """``weight * mean(gamma)``, or ``weight * (mean(gamma) - target)^2`` with a target share of open gates."""
    mean = gamma.mean()
    return weight * (mean if target is None else (mean - target) ** 2)


def lora_increment_norms(model: nn.Module, targets: Sequence[LoraTarget]) -> dict[str, float]:
    """``||scaling * B A||_F`` per target, from r x r products: ||BA||_F^2 = trace(B^T B A A^T)."""
    out = {}
    with torch.no_grad():
        for t in targets:
            m = model.get_submodule(t.name)
            a = m.lora_A[ADAPTER].weight.double()
            b = m.lora_B[ADAPTER].weight.double()
            sq = ((b.T @ b) * (a @ a.T)).sum().clamp(min=0)
            out[t.name] = float(sq.sqrt()) * float(m.scaling[ADAPTER])
    return out


# ----------------------------------------------------------------------------------------------------- the stage
@dataclass
class _LoraPhase:
    """What phase 1 leaves for phase 2 (the engine and its model are gone by then)."""

    spec: StageSpec  # the objective's entry under the ila stage's name
    args: Any  # the ila section as resolved (data path, phase-1 steps)
    in_dir: Path
    train: list[dict]
    held_out: list[dict]
    collator: Any
    refs: Any  # trainer.References
    lora_state: dict[str, torch.Tensor] | None  # rank 0: the trained LoRA weights
    lora_steps: int


def ila_stage(run: Run, spec: StageSpec) -> Path:
    """The ``ila`` stage (its runner in the stage table): phase 1 on every rank, phase 2 and the outputs on rank 0.
    Returns the stage's directory."""
    from .run import mark_stage_done

    cfg = run.cfg
    out = cfg.stage_dir(spec.name)
    phase1, targets = _train_lora(run, spec)
    if run.rank == 0:
        report = _learn_gates(run, phase1, targets, out)
        print(
            f"[allo-train] {spec.name}: layers by learned gate {report['ranking']}; kept {report['selected_layers']}"
            f" -> {out / LAYER_IMPORTANCE_FILE}, {out / 'masks.safetensors'}",
            flush=True,
        )
        mark_stage_done(cfg, spec.name, out / "masks.safetensors")
    run.barrier()
    return out


def _train_lora(run: Run, spec: StageSpec) -> tuple[_LoraPhase, list[LoraTarget]]:
    from . import trainer as T  # the trainer imports the stage table, which lists this stage
    from .engine import full_state_dict
    from .stages import STAGES

    cfg, args = run.cfg, run.cfg.section(spec.name)
    objective = STAGES[OBJECTIVE_STAGES[args.objective]]
    args = replace(
        args,
        data_path=args.data_path or cfg.section(objective.name).data_path,
        max_steps=args.lora_steps or args.max_steps,
    )
    lora_spec = replace(objective, name=spec.name, section=spec.section, summary=spec.summary)
    plan = T.prepare_stage(run, lora_spec, args=args)
    targets = lora_targets(
        plan.lm, args.target_modules, key=f"{spec.name}.target_modules", model_key=_model_key(cfg, spec.name)
    )
    n_layers = len({t.layer for t in targets})
    layer_count(args.keep_layers, n_layers, key=f"{spec.name}.keep_layers")  # errors before any training
    if args.gate_target_layers is not None:
        layer_count(args.gate_target_layers, n_layers, key=f"{spec.name}.gate_target_layers")
    attach_lora(plan.lm, targets, args)
    if cfg.gradient_checkpointing:
        plan.lm.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need an input with grad
    engine = T.build_engine(run, plan)
    refs = T.reference_logprobs(run, plan, engine)
    T.train_loop(run, plan, engine, refs)
    state = full_state_dict(engine)  # collective under ZeRO-3
    lora_state = None if state is None else {k: v.clone() for k, v in state.items() if _is_lora_key(k)}
    phase1 = _LoraPhase(
        spec=lora_spec,
        args=args,
        in_dir=plan.in_dir,
        train=plan.train,
        held_out=plan.held_out,
        collator=plan.collator,
        refs=refs,
        lora_state=lora_state,
        lora_steps=plan.total_steps,
    )
    del engine, plan, state
    gc.collect()
    return phase1, targets


def _model_key(cfg: Any, stage: str) -> str:
    from .stages import start_model_source

    earlier = start_model_source(cfg, stage)
    return "model_name_or_path" if earlier is None else f"model_name_or_path (through {earlier}'s output)"


def _learn_gates(run: Run, p: _LoraPhase, targets: list[LoraTarget], out: Path) -> dict:
    """Phase 2 on rank 0, then every output file. Returns the report written to layer_importance.json."""
    from . import trainer as T
    from .metrics import MetricsLogger, ProgressLines, plot_loss_curves, progress_bars

    cfg, args, stage = run.cfg, p.args, p.spec.name
    lm = load_causal_lm(p.in_dir, dtype=run.dtype, trust_remote_code=cfg.trust_remote_code).to(run.device)
    shapes = {name: tuple(w.shape) for name, w in lm.named_parameters()}  # before PEFT renames the adapted weights
    peft_model = attach_lora(lm, targets, args)
    result = lm.load_state_dict(p.lora_state, strict=False)
    missing = [k for k in result.missing_keys if _is_lora_key(k)]
    if result.unexpected_keys or missing:
        raise RuntimeError(
            f"internal: LoRA weights do not fit (missing {missing[:3]}, extra {result.unexpected_keys[:3]})"
        )
    save_pretrained_atomic(peft_model, None, out / LORA_DIR)  # as PEFT saves it: PeftModel.from_pretrained loads it
    norms = lora_increment_norms(lm, targets)
    lm.requires_grad_(False)
    lm.eval()  # no LoRA dropout: the gates see the increments phase 1 learned
    gates = LayerGates(lm, targets, per_module=args.gate_per_module).to(run.device)
    module = PolicyHiddenStates(lm)
    layers = sorted({t.layer for t in targets})
    n = len(layers)
    target = None if args.gate_target_layers is None else layer_count(args.gate_target_layers, n, key="") / n

    def loss_of(batch: dict) -> tuple[torch.Tensor, dict]:
        return p.spec.loss(args, T.policy_outputs(module, batch, run.device))

    torch.manual_seed(cfg.seed)
    sampler = D.ResumableSampler(len(p.train), seed=cfg.seed)
    bs, ga = args.per_device_train_batch_size, args.gradient_accumulation_steps
    loader = T.batch_loader(p.train, p.collator, p.refs.train, paired=p.spec.paired, batch_size=bs, sampler=sampler)
    batches = T.endless_batches(loader)
    opt = torch.optim.Adam(gates.parameters(), lr=args.gate_learning_rate)
    history: list[list[float]] = [list(gates.layer_scores().values())]
    logger = MetricsLogger(cfg.stage_dir(stage), stage=stage, tensorboard="tensorboard" in cfg.report_to)
    from tqdm.auto import tqdm

    bars = progress_bars()  # without a terminal: log lines, as the training loop prints them
    lines = ProgressLines(f"{stage}: gates", args.gate_steps, 0, run.say)
    try:
        steps = range(1, args.gate_steps + 1)
        for step in tqdm(steps, desc=f"{stage}: gates", disable=not bars, dynamic_ncols=True):
            sums: dict[str, float] = {}
            for _ in range(ga):
                loss, _ = loss_of(next(batches))
                penalty = gate_penalty(gates.values(), weight=args.gate_penalty, target=target)
                ((loss + penalty) / ga).backward()
                sums["loss"] = sums.get("loss", 0.0) + loss.item() / ga
                sums["gates/penalty"] = sums.get("gates/penalty", 0.0) + penalty.item() / ga
            opt.step()
            opt.zero_grad(set_to_none=True)
            history.append(list(gates.layer_scores().values()))
            if step % args.logging_steps == 0 or step == args.gate_steps:
                gamma = gates.values().detach()
                logged = {**sums, "gates/mean": float(gamma.mean()), "gates/open": int((gamma > 0.5).sum())}
                logger.log(p.lora_steps + step, logged)
                if not bars:
                    lines.update(step, logged)
    finally:
        logger.close()

    scores = gates.layer_scores()
    ranking = sorted(layers, key=lambda i: (-scores[i], i))  # ties: the lower layer first
    kept = sorted(ranking[: layer_count(args.keep_layers, n, key=f"{stage}.keep_layers")])
    losses = _losses(gates, loss_of, p, set(kept), bs)
    gates.remove()

    gamma = gates.values().detach().cpu().tolist()
    gate_of = dict(zip(gates.keys, gamma))
    modules: dict[str, dict] = {}
    for t in targets:
        g = gate_of[(t.layer, t.module if args.gate_per_module else "")]
        modules.setdefault(str(t.layer), {})[t.module] = {"gate": g, "lora_norm": norms[t.name]}
    report = {
        "method": "ila",
        "objective": args.objective,
        "num_layers": n,
        "keep_layers": args.keep_layers,
        "selected_layers": kept,
        "ranking": ranking,
        "scores": {str(i): scores[i] for i in layers},
        "modules": modules,
        "losses": losses,
        "gate_history": {"layers": layers, "steps": list(range(len(history))), "scores": history},
        "lora_steps": p.lora_steps,
        "start_model": str(p.in_dir),
        "lora_adapter": LORA_DIR,
        "settings": json.loads(json.dumps(asdict(args), default=str)),
    }
    text = json.dumps(report, indent=2)
    write_atomic(out / LAYER_IMPORTANCE_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    plot_layer_importance(report, out / PLOT_FILE)
    masks = layer_masks(shapes, kept, exclude=args.exclude)
    stats = mask_stats(
        masks,
        shapes,
        exclude=args.exclude,
        method="ila",
        granularity="layer",
        selected_layers=kept,
        keep_layers=args.keep_layers,
    )
    save_masks(masks, out, stats=stats)
    plot_loss_curves(cfg.stage_dir(stage) / "metrics.jsonl", cfg.stage_dir(stage))
    return report


def _losses(gates: LayerGates, loss_of, p: _LoraPhase, kept: set[int], batch_size: int) -> dict:
    """The objective's mean loss with the increments of no layer, of every layer, of the kept layers only, and under
    the learned gates, on up to EVAL_BATCHES batches of the held-out split (else of the training data)."""
    from . import trainer as T

    feats, rows = (p.held_out, p.refs.held_out) if p.held_out else (p.train, p.refs.train)
    sampler = D.ResumableSampler(len(feats), shuffle=False)
    loader = T.batch_loader(feats, p.collator, rows, paired=p.spec.paired, batch_size=batch_size, sampler=sampler)
    settings = {
        "no_layers": gates.for_layers(set()),
        "all_layers": gates.for_layers({layer for layer, _ in gates.keys}),
        "selected_layers": gates.for_layers(kept),
        "learned_gates": gates.values().detach(),
    }
    sums = dict.fromkeys(settings, 0.0)
    count = 0
    with torch.no_grad():
        for b, batch in enumerate(loader):
            if b == EVAL_BATCHES:
                break
            for name, values in settings.items():
                with gates.fixed(values):
                    sums[name] += float(loss_of(batch)[0])
            count += 1
    return {"split": "held_out" if p.held_out else "train", "batches": count} | {
        k: v / max(count, 1) for k, v in sums.items()
    }


# ----------------------------------------------------------------------------------------------------- plot
def plot_layer_importance(report: dict, path: Path) -> Path:
    """Left: the score of every layer, chosen layers coloured. Right: each layer's score over the gate steps."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    layers = report["gate_history"]["layers"]
    scores = [report["scores"][str(i)] for i in layers]
    chosen = set(report["selected_layers"])
    fig = Figure(figsize=(11, 4))
    ax = fig.add_subplot(1, 2, 1)
    ax.bar(range(len(layers)), scores, color=["#1f77b4" if i in chosen else "#bbbbbb" for i in layers])
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([str(i) for i in layers], fontsize=7 if len(layers) > 16 else 9)
    ax.set_ylim(0, 1)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("learned gate (score)")
    ax.set_title(f"ILA ({report['objective']}): {len(chosen)} of {len(layers)} layers kept (blue)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    history = torch.tensor(report["gate_history"]["scores"])
    cmap = colormaps["viridis"]
    for j, layer in enumerate(layers):
        ax.plot(
            report["gate_history"]["steps"],
            history[:, j].tolist(),
            color=cmap(j / max(len(layers) - 1, 1)),
            linestyle="-" if layer in chosen else "--",
            label=f"layer {layer}" if len(layers) <= 12 else None,
        )
    ax.set_ylim(0, 1)
    ax.set_xlabel("gate step")
    ax.set_ylabel("gate")
    ax.set_title("gates during phase 2 (solid: kept)", fontsize=10)
    ax.grid(True, alpha=0.3)
    if len(layers) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


# ----------------------------------------------------------------------------------------------------- compare
@dataclass(frozen=True)
class LayerOverlap:
    a: list[int]
    b: list[int]
    common: list[int]

    @property
    def jaccard(self) -> float:
        union = len(set(self.a) | set(self.b))
        return len(self.common) / union if union else 1.0


def read_selection(path: str | Path, *, top: int | None = None) -> list[int]:
    """The layers a ``layer_importance.json`` chose, or its ``top`` ranked ones. ValueError naming the file."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        ranking, chosen = list(report["ranking"]), list(report["selected_layers"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable {LAYER_IMPORTANCE_FILE} ({type(e).__name__}: {e})") from None
    if top is None:
        return sorted(chosen)
    if not 1 <= top <= len(ranking):
        raise ValueError(f"--top must be in [1, {len(ranking)}] (the layers ranked in {path}), got {top}")
    return sorted(ranking[:top])


def layer_overlap(a: Sequence[int], b: Sequence[int]) -> LayerOverlap:
    return LayerOverlap(sorted(a), sorted(b), sorted(set(a) & set(b)))


def compare_layers_main(argv: list[str]) -> int:
    """``allo-train compare-layers A.json B.json [--top K]``."""
    parser = argparse.ArgumentParser(
        prog="allo-train compare-layers",
        description="Overlap of two ILA layer selections (layer_importance.json files): the layers both chose, their "
        "count and the Jaccard index |A & B| / |A | B|.",
    )
    parser.add_argument("a", help="layer_importance.json of one run")
    parser.add_argument("b", help="layer_importance.json of another run")
    parser.add_argument("--top", type=int, help="compare each run's K top-ranked layers instead of its kept layers")
    args = parser.parse_args(argv)
    try:
        a, b = read_selection(args.a, top=args.top), read_selection(args.b, top=args.top)
    except ValueError as e:
        parser.error(str(e))
    o = layer_overlap(a, b)
    print(f"A: {args.a}: layers {a}")
    print(f"B: {args.b}: layers {b}")
    print(f"common layers: {o.common} ({len(o.common)}); Jaccard {o.jaccard:.2f}")
    sys.stdout.flush()
    return 0
