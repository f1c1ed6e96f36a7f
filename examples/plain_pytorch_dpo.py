"""allo_kernels as the loss and optimizer backend of a plain PyTorch loop: ALLO-style token-masked DPO on a tiny Llama.

What the loop does, and which allo_kernels call does it:

1. The policy returns final hidden states [2B, T, H] (``model.model(...)``), never logits: the lm_head is applied
   chunk by chunk inside ``ak.preference_loss(hidden, labels, lm_head_weight=...)``, so the [2B, T, V] logits never
   exist.
2. The reference model is the policy at step 0. Its per-token log-probs are computed ONCE, under ``no_grad``, with
   ``ak.fused_linear_token_logprobs`` and reused at every step (no second model in memory).
3. The loss is DPO with ALLO's token mask on the rejected side (``mask_side="rejected"``): of each rejected response
   only the tokens with the lowest reward ``beta * (logp - ref)`` are kept (``mask_fraction`` of them are masked).
4. ``ak.SparseAdamW(masks={param: row_mask})`` updates only 10% of the rows of every MLP weight (the "neurons");
   every other row is never written, so it stays bit-identical, and Adam state exists for the selected rows only.

Runs on CPU in seconds (and on CUDA, where the same calls run Triton kernels):

    python examples/plain_pytorch_dpo.py --steps 20
"""

from __future__ import annotations

import argparse
import sys

import torch

import allo_kernels as ak

IGNORE_INDEX = ak.IGNORE_INDEX  # -100, the value Hugging Face models ignore too

# (prompt, chosen, rejected): the policy should learn to prefer the polite answer.
PREFERENCE_PAIRS = [
    ("Q: capital of France? A:", " Paris.", " no idea, go away"),
    ("Q: 2+2? A:", " 4.", " who cares"),
    ("Q: color of the sky? A:", " blue.", " ask someone else"),
    ("Q: opposite of hot? A:", " cold.", " not telling you"),
]


def build_tiny_llama(vocab_size: int, *, pad_token_id: int, hidden_size: int, num_layers: int, seed: int):
    """A randomly initialised Llama straight from LlamaConfig (no download, nothing written to disk)."""
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


def tokenize_pairs(tokenizer, pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[chosen; rejected] batch: input_ids, attention_mask and labels (prompt and padding = IGNORE_INDEX), [2B, T]."""
    rows = []
    for side in (1, 2):  # all chosen rows first, then all rejected rows
        for pair in pairs:
            prompt = tokenizer(pair[0])["input_ids"]  # <bos> + prompt characters
            response = tokenizer(pair[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append((prompt + response, [IGNORE_INDEX] * len(prompt) + response))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return input_ids, attention_mask, labels


def mlp_row_masks(model, fraction: float, *, seed: int) -> dict[torch.nn.Parameter, torch.Tensor]:
    """A random ``fraction`` of the rows (output neurons) of every MLP weight: {param: bool [rows]}."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in model.named_parameters():
        if ".mlp." in name:
            rows = p.shape[0]
            chosen = torch.randperm(rows, generator=gen)[: max(1, round(fraction * rows))]
            mask = torch.zeros(rows, dtype=torch.bool)
            mask[chosen] = True
            masks[p] = mask.to(p.device)
    return masks


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument(
        "--mask-fraction",
        type=float,
        default=0.5,
        help="fraction of each rejected response's tokens masked out (ALLO: 1 - eps)",
    )
    parser.add_argument("--row-fraction", type=float, default=0.1, help="fraction of MLP rows SparseAdamW updates")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from allo_train.tokenizer import build_char_tokenizer

    device = torch.device(args.device)
    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        seed=args.seed,
    ).to(device)
    model.eval()  # no dropout in Llama anyway; eval() keeps the reference and the policy forward identical
    input_ids, attention_mask, labels = (t.to(device) for t in tokenize_pairs(tokenizer, PREFERENCE_PAIRS))
    lm_head_weight = model.get_output_embeddings().weight
    target = labels[:, 1:]  # position t predicts token t+1: shift once here, never inside allo_kernels

    def hidden_states() -> torch.Tensor:
        out = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state[:, :-1]

    # Reference log-probs: the step-0 policy, once, without logits and without a second model.
    with torch.no_grad():
        ref_logprobs = ak.fused_linear_token_logprobs(hidden_states(), lm_head_weight, target)

    # Train only the MLP weights, and of those only 10% of the rows. Everything else is frozen.
    masks = mlp_row_masks(model, args.row_fraction, seed=args.seed)
    for p in model.parameters():
        p.requires_grad_(p in masks)
    before = {p: p.detach().clone() for p in masks}
    optimizer = ak.SparseAdamW(list(masks), lr=args.lr, masks=masks)

    history: list[dict[str, float]] = []
    for step in range(args.steps):
        loss, metrics = ak.preference_loss(
            hidden_states(),
            target,
            lm_head_weight=lm_head_weight,
            ref_logprobs=ref_logprobs,
            beta=args.beta,
            mask_fraction=args.mask_fraction,
            mask_by="highest",
            mask_side="rejected",
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        row = {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}}
        history.append(row)
        if not args.quiet:
            print(
                f"step {step:3d}  loss {row['loss']:.4f}  margin {row['rewards/margins']:+.4f}  "
                f"acc {row['rewards/accuracies']:.2f}  kept rejected {row['tokens/rejected']:.1f}"
            )

    # The optimizer's contract, checked on the trained model: unselected rows never written, selected rows moved.
    unselected_identical = all(torch.equal(p.detach()[~m], before[p][~m]) for p, m in masks.items())
    selected_changed = all(not torch.equal(p.detach()[m], before[p][m]) for p, m in masks.items())
    state_rows = {next(iter(optimizer.state[p]["exp_avg"].shape)) for p in masks}
    result = {
        "history": history,
        "margins": [h["rewards/margins"] for h in history],
        "losses": [h["loss"] for h in history],
        "unselected_rows_identical": unselected_identical,
        "selected_rows_changed": selected_changed,
        "adam_state_rows": sorted(state_rows),
        "selected_rows": sorted({int(m.sum()) for m in masks.values()}),
    }
    if not args.quiet:
        print(
            f"margin {result['margins'][0]:+.4f} -> {result['margins'][-1]:+.4f}; unselected rows bit-identical: "
            f"{unselected_identical}; selected rows changed: {selected_changed}"
        )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
