"""allo_kernels inside Hugging Face ``Trainer``: SFT through the fused-linear log-probs, with SparseAdamW.

Two overrides, nothing else of the Trainer changes (data loading, LR schedule, gradient accumulation, logging):

* ``compute_loss``: the backbone returns final hidden states [B, T, H]; ``ak.fused_linear_token_logprobs`` applies
  the lm_head chunk by chunk and returns per-token log-probs [B, T-1] (the [B, T, V] logits are never built), and
  ``ak.losses.sft_loss`` turns them into the token-mean cross-entropy. With gradient accumulation the Trainer passes
  ``num_items_in_batch`` (the label tokens of the whole accumulated batch) and the loss is normalised by it, as the
  Trainer's own loss does.
* ``create_optimizer``: ``ak.SparseAdamW(masks=...)`` updates only the selected rows of the masked weights (here 10%
  of every MLP weight's rows); every other trainable parameter gets plain AdamW.

Scope: single process (CPU or one GPU). ``compute_loss`` calls the backbone submodule directly, which bypasses a
DDP wrapper's forward; for multi-GPU use DeepSpeed (its hooks live on the submodules) or allo_train.

    python examples/hf_trainer_sft.py --steps 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

import allo_kernels as ak

IGNORE_INDEX = ak.IGNORE_INDEX  # -100, the value Hugging Face models ignore too

SFT_EXAMPLES = [
    ("Q: capital of France? A:", " Paris."),
    ("Q: 2+2? A:", " 4."),
    ("Q: color of the sky? A:", " blue."),
    ("Q: opposite of hot? A:", " cold."),
    ("Q: first letter? A:", " a."),
    ("Q: days in a week? A:", " 7."),
]


def build_tiny_llama(vocab_size: int, *, pad_token_id: int, hidden_size: int, num_layers: int, seed: int):
    """A randomly initialised Llama straight from LlamaConfig (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tokenize(tokenizer, prompt: str, response: str) -> dict[str, list[int]]:
    """HF convention: labels = input_ids (unshifted) with the prompt masked out."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


class PadCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": torch.full((len(features), width), self.pad_token_id),
            "attention_mask": torch.zeros((len(features), width), dtype=torch.long),
            "labels": torch.full((len(features), width), IGNORE_INDEX),
        }
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(f["input_ids"])
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = torch.tensor(f["labels"])
        return batch


def fused_sft_loss(causal_lm, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean cross-entropy of a causal LM from its hidden states (no logits)."""
    hidden = causal_lm.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    target = batch["labels"][:, 1:]  # position t predicts token t+1
    logprobs = ak.fused_linear_token_logprobs(
        hidden[:, :-1], causal_lm.get_output_embeddings().weight, target, ignore_index=IGNORE_INDEX
    )
    return ak.losses.sft_loss(logprobs, target != IGNORE_INDEX)


def _trainer_class():
    from transformers import Trainer

    class AlloSFTTrainer(Trainer):
        """``Trainer`` whose loss and optimizer come from allo_kernels. ``row_masks``: {param: bool [rows]}."""

        def __init__(self, *args, row_masks: dict[torch.nn.Parameter, torch.Tensor] | None = None, **kwargs):
            self.row_masks = row_masks or {}
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            causal_lm = self.accelerator.unwrap_model(model)
            loss, metrics = fused_sft_loss(causal_lm, inputs)
            if num_items_in_batch is not None:  # gradient accumulation: sum over tokens / tokens of all micro-batches
                loss = loss * metrics["num_tokens"] / num_items_in_batch
            return (loss, {"loss": loss}) if return_outputs else loss

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                opt_model = self.model if model is None else model
                params = [p for p in opt_model.parameters() if p.requires_grad]
                masks = {p: m for p, m in self.row_masks.items() if p.requires_grad}
                self.optimizer = ak.SparseAdamW(
                    params,
                    lr=self.args.learning_rate,
                    weight_decay=self.args.weight_decay,
                    betas=(self.args.adam_beta1, self.args.adam_beta2),
                    eps=self.args.adam_epsilon,
                    masks=masks,
                )
            return self.optimizer

    return AlloSFTTrainer


def mlp_row_masks(model, fraction: float, *, seed: int) -> dict[torch.nn.Parameter, torch.Tensor]:
    """A random ``fraction`` of the rows (output neurons) of every MLP weight: {param: bool [rows]}."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in model.named_parameters():
        if ".mlp." in name:
            mask = torch.zeros(p.shape[0], dtype=torch.bool)
            mask[torch.randperm(p.shape[0], generator=gen)[: max(1, round(fraction * p.shape[0]))]] = True
            masks[p] = mask.to(p.device)
    return masks


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--row-fraction", type=float, default=0.1, help="fraction of MLP rows SparseAdamW updates")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="Trainer output dir (default: a temporary directory)")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers import TrainingArguments

    from allo_train.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        seed=args.seed,
    )
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # before the masks: they live on the params' device
    dataset = [tokenize(tokenizer, p, r) for p, r in SFT_EXAMPLES]
    collator = PadCollator(tokenizer.pad_token_id)
    full_batch = collator(dataset)

    # Train 10% of the MLP rows; freeze the rest of the model.
    masks = mlp_row_masks(model, args.row_fraction, seed=args.seed)
    for p in model.parameters():
        p.requires_grad_(p in masks)
    before = {p: p.detach().clone() for p in masks}

    def dataset_loss() -> float:
        with torch.no_grad():
            device = next(model.parameters()).device
            return fused_sft_loss(model, {k: v.to(device) for k, v in full_batch.items()})[0].item()

    loss_before = dataset_loss()
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=args.output_dir or tmp,
            max_steps=args.steps,
            learning_rate=args.lr,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            remove_unused_columns=False,
            disable_tqdm=args.quiet,
            seed=args.seed,
        )
        trainer = _trainer_class()(
            model=model, args=training_args, train_dataset=dataset, data_collator=collator, row_masks=masks
        )
        trainer.train()
    loss_after = dataset_loss()

    step_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "step_losses": step_losses,
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,  # Accelerate wraps it
        "unselected_rows_identical": all(
            torch.equal(p.detach().cpu()[~m.cpu()], before[p].cpu()[~m.cpu()]) for p, m in masks.items()
        ),
        "selected_rows_changed": all(
            not torch.equal(p.detach().cpu()[m.cpu()], before[p].cpu()[m.cpu()]) for p, m in masks.items()
        ),
    }
    if not args.quiet:
        print(
            f"SFT loss on the data set: {loss_before:.4f} -> {loss_after:.4f} ({result['optimizer']}); "
            f"unselected rows bit-identical: {result['unselected_rows_identical']}"
        )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
