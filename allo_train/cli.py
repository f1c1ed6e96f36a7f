"""allo-train: one command per stage, or the whole pipeline, from one YAML config.

usage:
    allo-train pipeline --config cfg.yaml [key=value | --key value ...]   the stages of pipeline.stages, in order
    allo-train STAGE --config cfg.yaml [overrides] [--resume]             one stage (listed below)
    allo-train config [STAGE] [--config cfg.yaml] [overrides]             every config key, its value and meaning
    allo-train correct-answers --model DIR --input answers.jsonl --output corrected.jsonl
    allo-train compare-layers A.json B.json [--top K]                     overlap of two ILA layer selections
    allo-train demo [--output-dir DIR] [--seed N] [--overwrite]

Overrides are dotted keys: improve.mask_fraction=0.5, --learning_rate 1e-5.
A run ends with a summary per stage. It stops with one line "allo-train: error: ..." (exit status 2) when the
config, a model directory or a data file is wrong, the output directory is in use by another run, no checkpoint
verifies, a checkpoint was written under other training settings, or the disk is full.

Several processes: deepspeed --num_gpus N -m allo_train.cli pipeline --config cfg.yaml
(or torchrun --nproc_per_node N -m allo_train.cli ...); on CPU the gloo backend is used.
"""

from __future__ import annotations

import argparse
import os
import sys

# Nothing heavy is imported before the config is checked: the stage table and config.py import no torch, so a
# config error is reported in a fraction of a second.


def main(argv: list[str] | None = None) -> int:
    from .stages import STAGES

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare-layers"]:  # positional files of its own: its own parser
        from .ila import compare_layers_main

        return compare_layers_main(argv[1:])
    stage_lines = "\n".join(f"    {name:<10}{spec.summary}" for name, spec in STAGES.items())
    parser = argparse.ArgumentParser(
        prog="allo-train",
        description=f"{__doc__}\nstages:\n{stage_lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=(*STAGES, "pipeline", "config", "correct-answers", "compare-layers", "demo"))
    parser.add_argument("--config", help="YAML config (TRL field names; `allo-train config` lists every key)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint that verifies; skip finished stages"
    )
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: continue a checkpoint written under other training settings (listed when resuming)",
    )
    parser.add_argument("--model", help="correct-answers: the trained corrector's directory")
    parser.add_argument("--input", help="correct-answers: JSONL of {question, answer}")
    parser.add_argument("--output", help="correct-answers: where to write the corrected JSONL")
    parser.add_argument("--output-dir", help="demo: where to write the demo's data, models and plots")
    parser.add_argument("--seed", type=int, default=0, help="demo: seed of data, initialisation and sampling")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="demo: write into a non-empty --output-dir it did not create (replacing only the demo's own entries)",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args, overrides = parser.parse_known_args(argv)
    if args.command != "config":
        from .metrics import quiet_library_progress_bars

        quiet_library_progress_bars()

    if args.command == "correct-answers":
        missing = [k for k in ("model", "input", "output") if getattr(args, k) is None]
        if missing:
            parser.error(f"correct-answers needs --{', --'.join(missing)}")
        from .generation import correct_answers

        n = correct_answers(args.model, args.input, args.output)
        print(f"[allo-train] corrected {n} answers -> {args.output}")
        return 0
    from .config import load_config, render_config
    from .errors import AlloTrainError

    if args.command == "demo":
        from .demo import run_demo

        try:
            run_demo(args.output_dir or "demo_out", seed=args.seed, overwrite=args.overwrite)
        except AlloTrainError as exc:
            return fail(exc)
        return 0

    show_stage = None
    if args.command == "config" and overrides and "=" not in overrides[0] and not overrides[0].startswith("-"):
        show_stage, overrides = overrides[0], overrides[1:]
    try:
        cfg = load_config(args.config, overrides)
        if args.command == "config":
            sys.stdout.write(render_config(cfg, stage=show_stage))
            return 0
    except (ValueError, TypeError) as exc:
        return fail(exc)
    if args.resume:
        cfg.resume_from_checkpoint = True
    if args.allow_config_change:
        cfg.allow_config_change = True

    from .trainer import run_pipeline, run_stage

    try:
        if args.command == "pipeline":
            run_pipeline(cfg)
        else:
            run_stage(cfg, args.command)
    except AlloTrainError as exc:
        return fail(exc)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def __getattr__(name: str):
    # cli.correct_answers: its earlier home, kept as an alias of generation.correct_answers (imported on first use).
    if name == "correct_answers":
        from .generation import correct_answers

        return correct_answers
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fail(exc: BaseException) -> int:
    """Print ``allo-train: error: <exc>`` on one line and return the exit status 2. Under a launcher every rank stops
    with the same error; the first process of each machine prints it (LOCAL_RANK 0, or no launcher)."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        message = " ".join(str(exc).split("\n"))
        print(f"allo-train: error: {message}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":  # python -m allo_train.cli (make demo, the deepspeed launcher): check the train extra too
    from allo_train._entry import missing_train_extra

    sys.exit(missing_train_extra() or main())
