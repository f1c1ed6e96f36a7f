"""allo_kernels inside TRL's ``DPOTrainer`` (tested with trl 1.16): the DPO loss, optionally ALLO's token mask, and
SparseAdamW, through a subclass.

``AlloDPOTrainer`` overrides two public ``Trainer`` methods and nothing else (TRL still does the tokenisation, the
``[chosen; rejected]`` collation, the reference model's placement, logging and the training loop):

* ``compute_loss``: policy and reference backbones return final hidden states [2B, T, H];
  ``ak.fused_linear_token_logprobs`` gives the reference's per-token log-probs (no_grad) and ``ak.preference_loss``
  scores the policy through the fused lm_head (the [2B, T, V] logits are never built) and returns the DPO loss with
  TRL's metric names, which go into TRL's own metric log. ``allo_mask_fraction > 0`` turns on ALLO's token mask on
  the rejected side (``mask_fraction = 1 - eps, mask_by="highest"`` keeps the eps lowest-reward rejected tokens).
* ``create_optimizer``: ``ak.SparseAdamW(masks=row_masks)``.

Narrower than DPOTrainer, on purpose (each unsupported option raises ``ValueError`` at construction):

* a per-token reference is needed, so pass ``ref_model`` and ``precompute_ref_log_probs=False`` (TRL's precomputed
  reference is one number per sequence, which cannot drive a per-token mask); PEFT "adapter off" references are not
  handled;
* ``loss_type`` one of sigmoid / ipo / hinge / robust (one at a time), ``f_divergence_type="reverse_kl"``,
  ``ld_alpha=None``, ``use_weighting=False``, no padding-free batches, no MoE aux loss;
* single process: ``compute_loss`` calls the backbone submodule, which bypasses a DDP wrapper's forward.

TRL's extra diagnostics (entropy, mean logits, top-1 accuracy) need the full logits and are not logged.

    python examples/trl_dpo.py --steps 10 --allo-mask-fraction 0.5
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile

import torch

import allo_kernels as ak

IGNORE_INDEX = ak.IGNORE_INDEX  # -100, the value Hugging Face models ignore too
SUPPORTED_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")

PREFERENCE_DATA = [
    {"prompt": "Q: capital of France? A:", "chosen": " Paris.", "rejected": " no idea, go away"},
    {"prompt": "Q: 2+2? A:", "chosen": " 4.", "rejected": " who cares"},
    {"prompt": "Q: color of the sky? A:", "chosen": " blue.", "rejected": " ask someone else"},
    {"prompt": "Q: opposite of hot? A:", "chosen": " cold.", "rejected": " not telling you"},
]


def build_tiny_llama(
    vocab_size: int, *, pad_token_id: int, eos_token_id: int, hidden_size: int, num_layers: int, seed: int
):
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
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def hidden_and_labels(causal_lm, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states [2B, T-1, H] and next-token labels [2B, T-1] of a TRL preference batch (completion only)."""
    hidden = causal_lm.base_model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
    ).last_hidden_state
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    return hidden[:, :-1], labels[:, 1:]


def _trainer_class():
    from trl import DPOTrainer

    class AlloDPOTrainer(DPOTrainer):
        """DPOTrainer with allo_kernels' fused DPO / ALLO masked DPO loss and SparseAdamW (see the module docstring).

        Extra keyword arguments: ``allo_mask_fraction`` (0: plain DPO), ``allo_mask_by`` ("highest"/"lowest"),
        ``row_masks`` ({param: bool [rows]} for SparseAdamW; params without a mask get dense AdamW).
        """

        def __init__(
            self,
            *args,
            allo_mask_fraction: float = 0.0,
            allo_mask_by: str = "highest",
            row_masks: dict[torch.nn.Parameter, torch.Tensor] | None = None,
            **kwargs,
        ):
            self.allo_mask_fraction = allo_mask_fraction
            self.allo_mask_by = allo_mask_by
            self.row_masks = row_masks or {}
            super().__init__(*args, **kwargs)
            self._check_supported()

        def _check_supported(self) -> None:
            a = self.args
            if self.ref_model is None or a.precompute_ref_log_probs:
                raise ValueError(
                    "AlloDPOTrainer needs per-token reference log-probs: pass ref_model=... and "
                    f"precompute_ref_log_probs=False (got ref_model={type(self.ref_model).__name__}, "
                    f"precompute_ref_log_probs={a.precompute_ref_log_probs})"
                )
            if len(self.loss_types) != 1 or self.loss_types[0] not in SUPPORTED_LOSS_TYPES:
                raise ValueError(f"loss_type must be one of {SUPPORTED_LOSS_TYPES}, got {self.loss_types}")
            unsupported = {
                "f_divergence_type": (a.f_divergence_type, "reverse_kl"),
                "ld_alpha": (a.ld_alpha, None),
                "use_weighting": (a.use_weighting, False),
                "padding_free": (a.padding_free, False),
                "aux_loss_enabled": (self.aux_loss_enabled, False),
            }
            for name, (got, want) in unsupported.items():
                if got != want:
                    raise ValueError(f"AlloDPOTrainer supports only {name}={want!r}, got {got!r}")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            policy = self.accelerator.unwrap_model(model)
            hidden, labels = hidden_and_labels(policy, inputs)
            with torch.no_grad():
                ref = self.accelerator.unwrap_model(self.ref_model)
                ref_hidden, _ = hidden_and_labels(ref, inputs)
                ref_logprobs = ak.fused_linear_token_logprobs(ref_hidden, ref.get_output_embeddings().weight, labels)
            loss, metrics = ak.preference_loss(
                hidden,
                labels,
                lm_head_weight=policy.get_output_embeddings().weight,
                ref_logprobs=ref_logprobs,
                beta=self.beta,
                loss_type=self.loss_types[0],
                label_smoothing=self.label_smoothing,
                mask_fraction=self.allo_mask_fraction,
                mask_by=self.allo_mask_by,
                mask_side="rejected",
            )
            for name, value in metrics.items():  # TRL averages these over the logging interval
                self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).mean().item())
            return (loss, metrics) if return_outputs else loss

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

    return AlloDPOTrainer


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
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss-type", default="sigmoid", choices=SUPPORTED_LOSS_TYPES)
    parser.add_argument("--allo-mask-fraction", type=float, default=0.5)
    parser.add_argument("--row-fraction", type=float, default=0.1, help="fraction of MLP rows SparseAdamW updates")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def build_trainer(args, output_dir: str, **config_overrides):
    """The tiny policy, its frozen reference copy, 10% MLP row masks and an AlloDPOTrainer over PREFERENCE_DATA.

    Returns ``(trainer, masks)``; ``config_overrides`` go to ``DPOConfig``."""
    from datasets import Dataset
    from trl import DPOConfig

    from allo_train.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        seed=args.seed,
    )
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # before the masks: they live on the params' device
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    masks = mlp_row_masks(model, args.row_fraction, seed=args.seed)
    for p in model.parameters():
        p.requires_grad_(p in masks)
    config = DPOConfig(
        **{
            **dict(
                output_dir=output_dir,
                max_steps=args.steps,
                learning_rate=args.lr,
                beta=args.beta,
                loss_type=[args.loss_type],
                per_device_train_batch_size=args.batch_size,
                lr_scheduler_type="constant",
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                use_cpu=not torch.cuda.is_available(),
                bf16=False,
                precompute_ref_log_probs=False,
                disable_tqdm=args.quiet,
                seed=args.seed,
            ),
            **config_overrides,
        }
    )
    trainer = _trainer_class()(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=Dataset.from_list(PREFERENCE_DATA),
        processing_class=tokenizer,
        allo_mask_fraction=args.allo_mask_fraction,
        row_masks=masks,
    )
    return trainer, masks


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from trl import DPOTrainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer, masks = build_trainer(args, tmp)
        before = {p: p.detach().clone() for p in masks}
        trainer.train()

        # Cross-check against TRL's own loss on the trained policy: with no token mask, ours must equal TRL's.
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        with torch.no_grad():
            trainer.allo_mask_fraction, saved = 0.0, trainer.allo_mask_fraction
            allo_loss = trainer.compute_loss(trainer.model, batch).item()
            trl_loss = DPOTrainer.compute_loss(trainer, trainer.model, batch).item()
            trainer.allo_mask_fraction = saved

    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # Accelerate wraps the optimizer
    result = {
        "margins": [h["rewards/margins"] for h in logs],
        "losses": [h["loss"] for h in logs],
        "optimizer": type(inner).__name__,
        "allo_loss_unmasked": allo_loss,
        "trl_loss": trl_loss,
        "unselected_rows_identical": all(torch.equal(p.detach()[~m], before[p][~m]) for p, m in masks.items()),
        "selected_rows_changed": all(not torch.equal(p.detach()[m], before[p][m]) for p, m in masks.items()),
    }
    if not args.quiet:
        print(
            f"margin {result['margins'][0]:+.4f} -> {result['margins'][-1]:+.4f} ({result['optimizer']}); "
            f"unmasked DPO loss: allo {allo_loss:.6f} vs TRL {trl_loss:.6f}; "
            f"unselected rows bit-identical: {result['unselected_rows_identical']}"
        )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
