"""``allo-train``: one command per stage, or the whole pipeline, from one YAML config.

    allo-train pipeline --config cfg.yaml [key=value | --key value ...]
    allo-train warmup|locate|forget|improve|sft|correct --config cfg.yaml [overrides] [--resume]
    allo-train correct-answers --model DIR --input answers.jsonl --output corrected.jsonl
    allo-train demo [--output-dir DIR] [--seed N] [--overwrite]

A run stops with one line "allo-train: error: ..." (exit 2) when it cannot go on safely: the output directory is in use
by another run, no checkpoint verifies, a checkpoint was written under other training settings, the disk is full.

Multi-process: ``deepspeed --num_gpus N -m allo_train.cli pipeline --config cfg.yaml`` or
``torchrun --nproc_per_node N -m allo_train.cli ...``; on CPU the gloo backend is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

STAGES = ("sft", "correct", "warmup", "locate", "forget", "improve")


def correct_answers(model_dir: str, input_path: str, output_path: str, *, max_new_tokens: int = 256) -> int:
    """Run a trained Aligner-style corrector over {question, answer} lines; write them back with "correction"."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import aligner_prompt, read_jsonl

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = []
    for where, obj in read_jsonl(input_path):
        for key in ("question", "answer"):
            if not isinstance(obj.get(key), str):
                raise ValueError(f"{where}: field {key!r} must be a string, got {obj.get(key)!r}")
        ids = tokenizer(aligner_prompt(obj["question"], obj["answer"]), return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        rows.append({**obj, "correction": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)})
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="allo-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=(*STAGES, "pipeline", "correct-answers", "demo"))
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
    from .stages import run_pipeline, run_stage

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
