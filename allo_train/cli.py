"""``allo-train``: one command per stage, or the whole pipeline, from one YAML config.

    allo-train pipeline --config cfg.yaml [key=value | --key value ...]
    allo-train STAGE --config cfg.yaml [overrides] [--resume]       (the stages are listed below)
    allo-train correct-answers --model DIR --input answers.jsonl --output corrected.jsonl
    allo-train compare-layers A.json B.json [--top K]               (overlap of two ILA layer selections)
    allo-train demo [--output-dir DIR] [--seed N] [--overwrite]

A run stops with one line "allo-train: error: ..." (exit 2) when it cannot go on safely: the output directory is in use
by another run, no checkpoint verifies, a checkpoint was written under other training settings, the disk is full.

Multi-process: ``deepspeed --num_gpus N -m allo_train.cli pipeline --config cfg.yaml`` or
``torchrun --nproc_per_node N -m allo_train.cli ...``; on CPU the gloo backend is used.
"""

from __future__ import annotations

import argparse
import sys

from .generation import correct_answers


def main(argv: list[str] | None = None) -> int:
    from .stages import STAGES  # the commands are the stage table's entries (importing it imports torch)

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
    parser.add_argument("command", choices=(*STAGES, "pipeline", "correct-answers", "compare-layers", "demo"))
    parser.add_argument("--config", help="YAML config (TRL field names; see README)")
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

    if args.command == "correct-answers":
        missing = [k for k in ("model", "input", "output") if getattr(args, k) is None]
        if missing:
            parser.error(f"correct-answers needs --{', --'.join(missing)}")
        n = correct_answers(args.model, args.input, args.output)
        print(f"[allo-train] corrected {n} answers -> {args.output}")
        return 0
    from .errors import AlloTrainError

    if args.command == "demo":
        from .demo import run_demo

        try:
            run_demo(args.output_dir or "demo_out", seed=args.seed, overwrite=args.overwrite)
        except AlloTrainError as exc:
            print(f"allo-train: error: {exc}", file=sys.stderr)
            return 2
        return 0

    from .config import load_config
    from .trainer import run_pipeline, run_stage

    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        parser.error(str(exc))
    if args.resume:
        cfg.resume_from_checkpoint = True
    if args.allow_config_change:
        cfg.allow_config_change = True
    try:
        if args.command == "pipeline":
            run_pipeline(cfg)
        else:
            run_stage(cfg, args.command)
    except AlloTrainError as exc:
        print(f"allo-train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
