"""``allo-train demo``: the whole ALLO recipe on a task whose answers can be checked exactly, in a few CPU minutes.

Everything is made by the program, nothing is downloaded:

1. **Task**: two-digit addition, ``"47+38="`` -> ``"85"``. Operands are 10..99, so every prompt has the same length
   (no padding when sampling) and an answer is right or wrong, nothing in between. A fixed set of problems is held
   out and never appears in any training file.
2. **Tokenizer and model**: a character-level tokenizer over ``0-9 + =`` saved as a real Hugging Face tokenizer
   (``AutoTokenizer.from_pretrained`` reloads it) and a tiny Llama built from a config with random weights.
3. **SFT** on the ground-truth answers of a few hundred problems with a short budget, kept small on purpose so the
   model is right only part of the time.
4. **Self-generated alignment data**: the SFT model answers fresh training problems (greedy and sampled at
   temperature 1). Each wrong answer becomes a preference pair (chosen = the correct answer, which is also what a
   correct own sample reads, rejected = the model's own wrong answer) and a forgetting example whose ``corrected``
   field is the ground truth: a minimal edit of the wrong answer, so only the wrong digits get token weight 1.
5. **ALLO**: warmup (dense DPO) -> locate (row neurons in the decoder layers) -> forget (token-weighted NPO on the
   located rows) -> improve (DPO with rejected-side token masking on the located rows), through ``run_pipeline``:
   the same DeepSpeed engine and fused kernels as any other run; forget and improve train the located rows as row
   deltas (``sparsity: delta``) with a stock AdamW. **ALLO on ILA layers**: the same
   forget -> improve, but on the top ``ila_keep_layers`` of the decoder layers ranked by the ``ila`` stage (LoRA
   trained with DPO for the warm-up's steps in place of the dense warm-up, then learned layer gates); ILA runs once
   more with the next data seed (data order, held-out split, LoRA initialisation) and the overlap of the two
   selections (common layers, Jaccard, as ``allo-train compare-layers`` prints it) is reported.
6. **Baselines at the same budget** (optimizer steps after SFT = warmup + forget + improve steps of ALLO):
   full DPO on all parameters from the SFT model (the warmup stage's code run for the whole budget, same learning
   rate and beta), and SFT-only, i.e. SFT continued on its own ground-truth problems for the same number of extra
   steps (a fresh cosine schedule at the SFT learning rate). The SFT model itself is a row of the table too.
7. **Evaluation**: held-out exact match with greedy decoding for every model; a markdown table printed and saved as
   ``results.md`` / ``results.json``, plus plots (accuracy per model, loss curves, the located rows' heatmap). The
   table also gives each training run's trainable state: the bytes of gradients, master copies and optimizer state
   its engine held, counted from the tensors (``stage_done.json``'s ``trainable_state_bytes``).

Seeds are fixed (``seed`` drives data, initialisation, data order and sampling), so a run repeats itself on the same
machine and library versions. ``quick=True`` is a much smaller variant for tests.

Output directory (:func:`prepare_output_dir`): the demo writes only the entries in ``DEMO_ENTRIES`` and marks a
directory it made with ``.allo-demo``. A rerun replaces those entries and nothing else; a non-empty directory without
the marker is refused unless ``overwrite=True`` (``--overwrite``), which still replaces only the demo's entries and is
refused for the current directory or any directory above it, the home directory, and a directory holding ``.git``.
The demo holds the directory's ``.allo-train.lock`` (``lock.py``) while it runs.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import generation
from .errors import AlloTrainError
from .lock import LOCK_FILE, hold_output_dir

CHARS = "0123456789+="
DEMO_MARKER = ".allo-demo"
# Everything the demo writes at the top of its output directory; nothing else there is ever touched.
DEMO_ENTRIES = (
    "data",
    "tokenizer",
    "base",
    "sft",
    "allo",
    "allo_ila",
    "ila_second_seed",
    "full_dpo",
    "sft_only",
    "results.md",
    "results.json",
    "accuracy.png",
    "loss_curves.png",
    "mask_heatmap.png",
)
MAX_NEW_TOKENS = 4  # at most three digits and <eos>


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets; ``FULL`` is what ``make demo`` runs, ``QUICK`` the test variant."""

    held_out: int  # problems never trained on
    sft_examples: int
    align_prompts: int  # fresh problems the SFT model answers to make preference / forgetting data
    samples_per_prompt: int  # temperature samples per prompt (plus one greedy answer)
    hidden_size: int
    num_layers: int
    num_heads: int
    sft_steps: int
    sft_lr: float
    batch_size: int
    warmup_steps: int
    forget_steps: int
    improve_steps: int
    dpo_lr: float  # warmup and the full-DPO baseline
    allo_lr: float  # forget and improve on the located rows (few rows: a larger step); on ILA's layers: dpo_lr
    beta: float
    locate_ratio: float  # share of the decoder layers' rows that forget/improve may update
    mask_fraction: float  # improve: share of each rejected answer's tokens masked out (highest reward first)
    ila_lr: float  # ILA's LoRA phase (as many steps as the warm-up, which it replaces in the "ALLO on ILA layers" row)
    ila_gate_steps: int  # ILA's gate phase: Adam on one scalar per layer, not counted as steps of the model
    ila_keep_layers: float  # share of the decoder layers ILA's masks select

    @property
    def align_budget(self) -> int:
        return self.warmup_steps + self.forget_steps + self.improve_steps


# Tuned on seed 0 (a small sweep of learning rates, beta, steps and locate ratio; see the module docstring for what
# each row means). beta is large because with beta=0.1 DPO drove this tiny model's chosen log-probs down with the
# rejected ones and greedy accuracy fell below the SFT model's.
FULL = DemoSettings(
    held_out=400,
    sft_examples=600,
    align_prompts=3000,
    samples_per_prompt=3,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    sft_steps=700,
    sft_lr=3e-3,
    batch_size=64,
    warmup_steps=30,
    forget_steps=30,
    improve_steps=240,
    dpo_lr=3e-4,
    allo_lr=1e-3,
    beta=2.0,
    locate_ratio=0.25,
    mask_fraction=0.4,
    ila_lr=1e-3,
    ila_gate_steps=40,
    ila_keep_layers=0.25,
)
QUICK = DemoSettings(
    held_out=100,
    sft_examples=300,
    align_prompts=300,
    samples_per_prompt=2,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    sft_steps=250,
    sft_lr=3e-3,
    batch_size=32,
    warmup_steps=8,
    forget_steps=8,
    improve_steps=8,
    dpo_lr=3e-4,
    allo_lr=1e-3,
    beta=2.0,
    locate_ratio=0.25,
    mask_fraction=0.4,
    ila_lr=1e-3,
    ila_gate_steps=5,
    ila_keep_layers=0.25,
)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------- data
def make_problems(seed: int, s: DemoSettings) -> dict[str, list[tuple[int, int]]]:
    """Disjoint held-out / SFT / alignment problem sets drawn from all 8100 pairs of two-digit operands."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    n_h, n_s, n_a = s.held_out, s.sft_examples, s.align_prompts
    if n_h + n_s + n_a > len(pairs):
        raise ValueError(f"held_out + sft_examples + align_prompts must be <= {len(pairs)}, got {n_h + n_s + n_a}")
    return {"held_out": pairs[:n_h], "sft": pairs[n_h : n_h + n_s], "align": pairs[n_h + n_s : n_h + n_s + n_a]}


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}="


def answer_of(a: int, b: int) -> str:
    return str(a + b)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------- generation
def generate(model, tokenizer, prompts: list[str], *, sample: bool = False, num_return_sequences: int = 1):
    """Answers per prompt (greedy, or ``num_return_sequences`` samples at temperature 1). All prompts have the same
    length (operands are 10..99), so batches need no padding."""
    return generation.generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=MAX_NEW_TOKENS,
        sample=sample,
        num_return_sequences=num_return_sequences,
    )


def exact_match(model_dir: Path, tokenizer, problems: list[tuple[int, int]]) -> float:
    """Held-out exact match in percent, greedy decoding."""
    model = generation.load_for_inference(model_dir)
    answers = generate(model, tokenizer, [prompt_of(a, b) for a, b in problems])
    right = sum(ans[0] == answer_of(a, b) for ans, (a, b) in zip(answers, problems))
    return 100.0 * right / len(problems)


def build_alignment_data(
    model_dir: Path, tokenizer, problems: list[tuple[int, int]], out: Path, *, seed: int, samples_per_prompt: int
) -> dict:
    """The SFT model's own wrong answers -> preference pairs and forgetting data (corrected = ground truth)."""
    model = generation.load_for_inference(model_dir)
    prompts = [prompt_of(a, b) for a, b in problems]
    greedy = generate(model, tokenizer, prompts)
    torch.manual_seed(seed)
    sampled = generate(model, tokenizer, prompts, sample=True, num_return_sequences=samples_per_prompt)
    pref, forget = [], []
    n_correct = n_answers = 0
    for p, (a, b), g, smp in zip(prompts, problems, greedy, sampled):
        truth = answer_of(a, b)
        answers = g + smp
        n_answers += len(answers)
        n_correct += sum(x == truth for x in answers)
        # The greedy answer first (it is what evaluation reads), then distinct wrong samples; at most 2 per prompt.
        wrong = list(dict.fromkeys(x for x in answers if x != truth and x != ""))[:2]
        for w in wrong:
            pref.append({"prompt": p, "chosen": truth, "rejected": w})
            forget.append({"prompt": p, "rejected": w, "corrected": truth})
    if not pref:
        raise RuntimeError("the SFT model answered every alignment prompt correctly: no preference pair to learn from")
    _write_jsonl(out / "preference.jsonl", pref)
    _write_jsonl(out / "forget.jsonl", forget)
    return {
        "prompts": len(prompts),
        "answers": n_answers,
        "own_correct_rate": n_correct / max(n_answers, 1),
        "preference_pairs": len(pref),
        "forget_examples": len(forget),
    }


# ----------------------------------------------------------------------------------------------------- configs
def _common(seed: int, s: DemoSettings) -> dict:
    return {
        "seed": seed,
        "per_device_train_batch_size": s.batch_size,
        "max_length": 16,
        "max_prompt_length": 8,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.05,
        "max_grad_norm": 1.0,
        "logging_steps": 5,
        "eval_fraction": 0.05,
        "eval_steps": 20,
        "save_steps": 10**9,  # the demo never resumes: no intermediate checkpoints
        "beta": s.beta,
        "deepspeed": {"zero_optimization": {"stage": 0}},
        "report_to": ["jsonl"],
    }


def sft_config(out: Path, model: Path, data: Path, steps: int, seed: int, s: DemoSettings):
    from .config import config_from_dict

    return config_from_dict(
        {
            **_common(seed, s),
            "model_name_or_path": str(model),
            "output_dir": str(out),
            "pipeline": {"stages": ["sft"]},
            "sft": {"data_path": str(data), "max_steps": steps, "learning_rate": s.sft_lr},
        }
    )


def _ila_section(pref: Path, s: DemoSettings) -> dict:
    """ILA on the preference data: LoRA trained with DPO for as many steps as the warm-up, then the layer gates."""
    return {
        "objective": "dpo",
        "data_path": str(pref),
        "lora_steps": s.warmup_steps,
        "learning_rate": s.ila_lr,
        "gate_steps": s.ila_gate_steps,
        "keep_layers": s.ila_keep_layers,
    }


def allo_config(
    out: Path, sft_model: Path, pref: Path, forget: Path, seed: int, s: DemoSettings, *, layers_by_ila: bool = False
):
    """ALLO: warmup -> locate (rows by weight change) -> forget -> improve; with ``layers_by_ila`` the ila stage
    (LoRA for the warm-up's steps, then the gates) replaces warmup + locate and forget/improve train ILA's top
    layers, every weight of them, at the rate of dense training (``dpo_lr``): at ``allo_lr``, sized for a quarter
    of the rows, forget on the whole of layer 0 wrecked the full demo's model (seed 0: 2.2% exact match after
    improve, from the SFT model's 81.8%); at ``dpo_lr``: 83.0%."""
    from .config import config_from_dict

    allo_lr = s.dpo_lr if layers_by_ila else s.allo_lr
    if layers_by_ila:
        selection = {"pipeline": {"stages": ["ila", "forget", "improve"]}, "ila": _ila_section(pref, s)}
    else:
        selection = {
            "pipeline": {"stages": ["warmup", "locate", "forget", "improve"]},
            "warmup": {"data_path": str(pref), "max_steps": s.warmup_steps, "learning_rate": s.dpo_lr},
            "locate": {"method": "weight_delta", "granularity": "row", "ratio": s.locate_ratio},
        }
    return config_from_dict(
        {
            **_common(seed, s),
            "model_name_or_path": str(sft_model),
            "output_dir": str(out),
            **selection,
            "forget": {
                "data_path": str(forget),
                "token_weight_source": "corrected",
                "sparsity": "delta",
                "max_steps": s.forget_steps,
                "learning_rate": allo_lr,
            },
            "improve": {
                "data_path": str(pref),
                "sparsity": "delta",
                "max_steps": s.improve_steps,
                "learning_rate": allo_lr,
                "mask_fraction": s.mask_fraction,
            },
        }
    )


def ila_config(out: Path, sft_model: Path, pref: Path, seed: int, s: DemoSettings):
    """The ila stage alone (another data seed: data order, held-out split and LoRA initialisation)."""
    from .config import config_from_dict

    return config_from_dict(
        {
            **_common(seed, s),
            "model_name_or_path": str(sft_model),
            "output_dir": str(out),
            "pipeline": {"stages": ["ila"]},
            "ila": _ila_section(pref, s),
        }
    )


def dpo_config(out: Path, sft_model: Path, pref: Path, seed: int, s: DemoSettings):
    """The full-DPO baseline is the warmup stage (dense DPO) run for the whole alignment budget."""
    from .config import config_from_dict

    return config_from_dict(
        {
            **_common(seed, s),
            "model_name_or_path": str(sft_model),
            "output_dir": str(out),
            "pipeline": {"stages": ["warmup"]},
            "warmup": {"data_path": str(pref), "max_steps": s.align_budget, "learning_rate": s.dpo_lr},
        }
    )


# ----------------------------------------------------------------------------------------------------- report
def _ila_overlap(reports: dict[int, Path]) -> dict:
    """The layers ILA kept under each data seed and their overlap (what ``allo-train compare-layers`` prints)."""
    from .ila import layer_overlap, read_selection

    (seed_a, a), (seed_b, b) = ((k, read_selection(v)) for k, v in reports.items())
    o = layer_overlap(a, b)
    line = (
        f"ILA's layers across data seeds: seed {seed_a} kept {a}, seed {seed_b} kept {b}; "
        f"{len(o.common)} in common, Jaccard {o.jaccard:.2f}"
    )
    return {
        "seeds": [seed_a, seed_b],
        "selected_layers": [a, b],
        "common": o.common,
        "jaccard": o.jaccard,
        "line": line,
    }


TABLE_NOTE = (
    "steps after SFT: optimizer steps (one batch each) since the SFT model, the ALLO rows counting the dense warm-up "
    "that only locates the neurons (forget starts again from the SFT model). trained params %: share of the weights "
    "the stage may change (ALLO: the located rows of the decoder layers; embeddings, norms and lm_head excluded). "
    "trainable state MB: gradients + fp32 master copies + optimizer state of the run's engine, counted from its "
    "tensors (ALLO's forget and improve train row deltas: only the located rows have any). "
    "ALLO on ILA layers: the ila stage (LoRA trained with DPO for the warm-up's steps, then one learned gate per "
    "decoder layer; the gate steps train only those scalars and are not counted) replaces warmup + locate, and forget "
    "+ improve train the top-ranked layers (norms excluded), at full DPO's learning rate (whole layers: dense)."
)


def trainable_state_bytes(cfg, stage: str) -> int:
    """Gradients + master copies + optimizer state the stage's engine held (rank 0), from its ``stage_done.json``."""
    from .run import STAGE_DONE_FILE

    record = json.loads((cfg.stage_dir(stage) / STAGE_DONE_FILE).read_text(encoding="utf-8"))
    return sum(record["trainable_state_bytes"].values())


def _fmt_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def results_table(rows: list[dict]) -> str:
    head = [
        "model",
        "stage",
        "held-out exact match %",
        "trained params %",
        "trainable state MB",
        "steps after SFT",
        "seed",
    ]
    lines = [_fmt_row(head), _fmt_row(["---"] * len(head))]
    for r in rows:
        lines.append(
            _fmt_row(
                [
                    r["model"],
                    r["stage"],
                    f"{r['exact_match']:.1f}",
                    f"{r['trained_params_pct']:.1f}",
                    f"{r['trainable_state_bytes'] / 1e6:.2f}",
                    str(r["steps_after_sft"]),
                    str(r["seed"]),
                ]
            )
        )
    return "\n".join(lines)


def plot_accuracy(rows: list[dict], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    labels = [
        f"{r['model']}\n{r['stage'].split(' (')[0]}"
        + (f"\n+{r['steps_after_sft']} steps" if r["steps_after_sft"] else "")
        for r in rows
    ]
    colors = [
        "#999999" if r["model"] in ("base", "SFT", "SFT-only") else "#d62728" if r["model"] == "full DPO" else "#1f77b4"
        for r in rows
    ]
    bars = ax.bar(range(len(rows)), [r["exact_match"] for r in rows], color=colors)
    for bar, r in zip(bars, rows):
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            bar.get_height() + 0.5,
            f"{r['exact_match']:.1f}",
            ha="center",
            fontsize=8,
        )
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(0, 100)
    ax.set_title("two-digit addition, greedy decoding")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def loss_curves_figure(curves: dict[str, tuple[Path, str]]):
    """One panel per training run: train loss (and held-out loss) against step. ``curves``: {panel title: (the
    run's stage directory or metrics.jsonl, what its loss is)}; each panel's title names the loss."""
    from matplotlib.figure import Figure

    from .metrics import draw_loss_curves, read_curves

    cols = 3
    nrows = -(-len(curves) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * nrows))
    for i, (name, (metrics_path, loss_name)) in enumerate(curves.items()):
        ax = fig.add_subplot(nrows, cols, i + 1)
        series = {
            k: v
            for stage_series in read_curves(metrics_path, ("loss", "eval/loss")).values()
            for k, v in stage_series.items()
        }
        draw_loss_curves(ax, series, title=f"{name}\n{loss_name}")
    fig.tight_layout()
    return fig


def plot_losses(curves: dict[str, tuple[Path, str]], path: Path) -> Path:
    loss_curves_figure(curves).savefig(path, format="png", dpi=100)
    return path


# ----------------------------------------------------------------------------------------------------- main
def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("DeepSpeed", "deepspeed", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:  # deepspeed is a hard dependency of training; this only trims its chatter
        pass
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


class DemoOutputDirError(AlloTrainError):
    """The demo's output directory holds things the demo did not write."""


def _shown(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} entries)" if len(names) > n else "")


def check_output_dir(out: Path, *, overwrite: bool = False) -> None:
    """Raise :class:`DemoOutputDirError` when the demo must not write into ``out`` (see the module docstring); writes
    nothing."""
    if out.exists() and not out.is_dir():
        raise DemoOutputDirError(f"demo: --output-dir {out} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.exists() else []
    if entries and not (out / DEMO_MARKER).is_file():
        if not overwrite:
            raise DemoOutputDirError(
                f"demo: --output-dir {out} is not empty and was not made by the demo (it holds {_shown(entries)}); "
                "choose a new directory, or pass --overwrite to write the demo's files into it (that replaces only "
                f"the entries named {', '.join(DEMO_ENTRIES)})"
            )
        real = out.resolve()
        cwd = Path.cwd().resolve()
        if real == cwd or real in cwd.parents or real == Path.home().resolve() or (real / ".git").exists():
            raise DemoOutputDirError(
                f"demo: refusing --output-dir {out} even with --overwrite: it is the current directory, a directory "
                "above it, the home directory or a git checkout; choose a new directory"
            )


def prepare_output_dir(out: Path, *, overwrite: bool = False) -> Path:
    """:func:`check_output_dir`, then mark ``out`` as the demo's and remove the demo's own entries from a previous run
    (nothing else). Returns ``out``."""
    out = Path(out)
    check_output_dir(out, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `allo-train demo`; a rerun replaces only the demo's own entries\n")
    for name in DEMO_ENTRIES:
        old = out / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
    return out


def run_demo(
    output_dir: str,
    *,
    seed: int = 0,
    quick: bool = False,
    overrides: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Run the whole demo into ``output_dir`` (see :func:`prepare_output_dir`: a non-empty directory the demo did not
    make is refused unless ``overwrite``) and return the results as a dict (also in
    ``results.json``): ``rows`` (one per model), ``table`` (markdown), ``data`` (alignment-data counts),
    ``settings``, ``seed``, ``wall_seconds``, ``files``. ``overrides``: DemoSettings fields to change.

    Torch runs on one thread meanwhile: the model is so small that a second thread only adds synchronisation, and on
    a busy 2-core machine OpenMP threads that wait on each other make every step many times slower."""
    out = Path(output_dir)
    check_output_dir(out, overwrite=overwrite)  # before the lock file is created in a directory that is not ours
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with hold_output_dir(out):  # two demos on one directory would delete each other's entries
            return _run_demo(prepare_output_dir(out, overwrite=overwrite), seed, quick, overrides or {})
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, seed: int, quick: bool, overrides: dict) -> dict:
    from .ila import LAYER_IMPORTANCE_FILE
    from .model import build_tiny_llama
    from .stages import STAGES, loss_label, model_dir
    from .tokenizer import build_char_tokenizer
    from .trainer import run_pipeline, run_stage

    t0 = time.perf_counter()
    s = replace(QUICK if quick else FULL, **overrides)
    (out / "data").mkdir(parents=True)
    _quiet_libraries()
    torch.manual_seed(seed)
    random.seed(seed)

    _say(f"output in {out}/ (seed {seed}, {'quick' if quick else 'full'} settings, {torch.get_num_threads()} threads)")
    problems = make_problems(seed, s)
    sft_path = _write_jsonl(
        out / "data" / "sft.jsonl",
        [{"prompt": prompt_of(a, b), "completion": answer_of(a, b)} for a, b in problems["sft"]],
    )
    _write_jsonl(
        out / "data" / "held_out.jsonl",
        [{"prompt": prompt_of(a, b), "answer": answer_of(a, b)} for a, b in problems["held_out"]],
    )
    tokenizer = build_char_tokenizer(CHARS, save_dir=out / "tokenizer")
    base = build_tiny_llama(
        tokenizer,
        out / "base",
        hidden_size=s.hidden_size,
        num_layers=s.num_layers,
        num_heads=s.num_heads,
        max_position_embeddings=32,
        seed=seed,
    )
    n_params = sum(p.numel() for p in generation.load_for_inference(base).parameters())
    _say(
        f"task: two-digit addition; {len(problems['sft'])} SFT problems, {len(problems['align'])} alignment "
        f"prompts, {len(problems['held_out'])} held-out problems; tiny Llama with {n_params:,} parameters"
    )

    rows: list[dict] = []

    def add_row(model: str, stage: str, path: Path, trained_pct: float, state_bytes: int, steps: int) -> None:
        em = exact_match(path, tokenizer, problems["held_out"])
        rows.append(
            {
                "model": model,
                "stage": stage,
                "exact_match": em,
                "trained_params_pct": trained_pct,
                "trainable_state_bytes": state_bytes,
                "steps_after_sft": steps,
                "seed": seed,
                "model_dir": str(path),
            }
        )
        _say(f"held-out exact match of {model} ({stage}): {em:.1f}%")

    add_row("base", "random init", base, 0.0, 0, 0)

    _say(
        f"stage 1/3: SFT on {len(problems['sft'])} problems for {s.sft_steps} steps (data and budget kept small on "
        "purpose: the model should still make mistakes)"
    )
    sft_cfg = sft_config(out / "sft", base, sft_path, s.sft_steps, seed, s)
    run_stage(sft_cfg, "sft")
    sft_model = model_dir(sft_cfg, "sft")
    add_row("SFT", f"sft ({s.sft_steps} steps)", sft_model, 100.0, trainable_state_bytes(sft_cfg, "sft"), 0)

    _say("stage 2/3: the SFT model answers fresh problems; its wrong answers become preference and forgetting data")
    data_stats = build_alignment_data(
        sft_model, tokenizer, problems["align"], out / "data", seed=seed, samples_per_prompt=s.samples_per_prompt
    )
    _say(
        f"  {data_stats['answers']} answers, {100 * data_stats['own_correct_rate']:.1f}% correct -> "
        f"{data_stats['preference_pairs']} preference pairs, {data_stats['forget_examples']} forgetting examples"
    )
    pref_path, forget_path = out / "data" / "preference.jsonl", out / "data" / "forget.jsonl"

    budget = s.align_budget
    _say(
        f"stage 3/3: ALLO (warmup {s.warmup_steps} -> locate -> forget {s.forget_steps} -> improve "
        f"{s.improve_steps} steps) and the baselines at the same budget of {budget} steps"
    )
    allo_cfg = allo_config(out / "allo", sft_model, pref_path, forget_path, seed, s)
    run_pipeline(allo_cfg)
    stats = json.loads((allo_cfg.stage_dir("locate") / "mask_stats.json").read_text())
    located_pct = 100.0 * stats["total"]["fraction"]
    rows_sel = sum(p.get("selected_rows", 0) for p in stats["params"].values())
    rows_all = sum(p.get("rows", 0) for p in stats["params"].values() if not p["excluded"])
    _say(f"  located {rows_sel}/{rows_all} rows of the decoder layers = {located_pct:.1f}% of all parameters")

    ila_cfg = allo_config(out / "allo_ila", sft_model, pref_path, forget_path, seed, s, layers_by_ila=True)
    _say(
        f"ALLO on ILA layers: ila (LoRA {s.warmup_steps} steps + {s.ila_gate_steps} gate steps) -> forget "
        f"{s.forget_steps} -> improve {s.improve_steps} steps on the top {s.ila_keep_layers:.0%} of the layers"
    )
    run_pipeline(ila_cfg)
    ila_dir = ila_cfg.stage_dir("ila")
    ila_pct = 100.0 * json.loads((ila_dir / "mask_stats.json").read_text())["total"]["fraction"]
    second_cfg = ila_config(out / "ila_second_seed", sft_model, pref_path, seed + 1, s)
    _say(f"ILA again with data seed {seed + 1}, for the overlap of the chosen layers")
    run_stage(second_cfg, "ila")
    ila_overlap = _ila_overlap(
        {seed: ila_dir / LAYER_IMPORTANCE_FILE, seed + 1: second_cfg.stage_dir("ila") / LAYER_IMPORTANCE_FILE}
    )
    _say(f"  {ila_overlap['line']}")

    dpo_cfg = dpo_config(out / "full_dpo", sft_model, pref_path, seed, s)
    _say(f"baseline: full DPO, all parameters, {budget} steps")
    run_stage(dpo_cfg, "warmup")

    sft_more_cfg = sft_config(out / "sft_only", sft_model, sft_path, budget, seed, s)
    _say(f"baseline: SFT-only, SFT continued on ground truth for {budget} more steps")
    run_stage(sft_more_cfg, "sft")

    _say("evaluating every model on the held-out problems (greedy decoding)")
    for model, stage, cfg, stage_name, pct, steps in (
        ("SFT-only", f"sft (+{budget} steps)", sft_more_cfg, "sft", 100.0, budget),
        ("full DPO", f"dpo ({budget} steps)", dpo_cfg, "warmup", 100.0, budget),
        ("ALLO", f"warmup (dense DPO, {s.warmup_steps} steps)", allo_cfg, "warmup", 100.0, s.warmup_steps),
        ("ALLO", f"forget ({s.forget_steps} steps)", allo_cfg, "forget", located_pct, s.warmup_steps + s.forget_steps),
        ("ALLO", f"improve ({s.improve_steps} steps)", allo_cfg, "improve", located_pct, budget),
        ("ALLO on ILA layers", f"improve ({s.improve_steps} steps)", ila_cfg, "improve", ila_pct, budget),
    ):
        state = trainable_state_bytes(cfg, stage_name)
        add_row(model, stage, model_dir(cfg, stage_name), pct, state, steps)

    def curve(cfg, stage: str) -> tuple[Path, str]:
        return cfg.stage_dir(stage), loss_label(STAGES[stage], cfg.section(stage))

    table = results_table(rows)
    files = {
        "results_md": out / "results.md",
        "results_json": out / "results.json",
        "accuracy_plot": plot_accuracy(rows, out / "accuracy.png"),
        "loss_plot": plot_losses(
            {
                "SFT": curve(sft_cfg, "sft"),
                "ALLO warmup": curve(allo_cfg, "warmup"),
                "ALLO forget": curve(allo_cfg, "forget"),
                "ALLO improve": curve(allo_cfg, "improve"),
                "ALLO on ILA layers improve": curve(ila_cfg, "improve"),
                "full DPO": curve(dpo_cfg, "warmup"),
                "SFT-only": curve(sft_more_cfg, "sft"),
            },
            out / "loss_curves.png",
        ),
        "mask_heatmap": out / "mask_heatmap.png",
    }
    shutil.copyfile(allo_cfg.stage_dir("locate") / "mask_heatmap.png", files["mask_heatmap"])
    wall = time.perf_counter() - t0
    result = {
        "seed": seed,
        "quick": quick,
        "settings": asdict(s),
        "data": data_stats,
        "rows": rows,
        "table": table,
        "located_rows": rows_sel,
        "candidate_rows": rows_all,
        "ila_layers": ila_overlap,
        "wall_seconds": wall,
        "torch_threads": torch.get_num_threads(),
        "files": {k: str(v) for k, v in files.items()},
    }
    files["results_md"].write_text(
        f"# allo demo: held-out exact match on two-digit addition\n\n{table}\n\n"
        f"{TABLE_NOTE}\n\n{ila_overlap['line']}\n\n"
        f"seed {seed}; batch size {s.batch_size}; {len(problems['held_out'])} held-out problems; greedy decoding; "
        f"{data_stats['preference_pairs']} preference pairs from the SFT model's own wrong answers; "
        f"wall time {wall:.0f} s (torch on 1 CPU thread).\n"
    )
    files["results_json"].write_text(json.dumps(result, indent=2))
    print("\n" + table + "\n\n" + TABLE_NOTE + "\n\n" + ila_overlap["line"] + "\n", flush=True)
    _say(f"done in {wall:.0f} s; results.md, accuracy.png, loss_curves.png, mask_heatmap.png in {out}/")
    return result
