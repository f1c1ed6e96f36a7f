"""Text from a trained model without the training engine: generation and teacher-forced scoring on one process.

* :func:`generate`: answers to prompts, greedy or sampled (the demo's evaluation and self-generated data, Aligner
  corrections);
* :func:`correct_answers`: a trained Aligner-style corrector run over a JSONL of ``{question, answer}``
  (``allo-train correct-answers``);
* :func:`scoring_model_weights`: ALLO/RLMEC-style token weights for the forgetting stage from a rewriting (scoring)
  model, ``w_t = 1 - p(y_t | rewrite prompt, y_<t)``.

Plain ``transformers`` models in fp32 on one device: the models these run are small (a corrector, a scoring model,
the demo's tiny Llama), and every rank of a multi-process run computes the same result.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import allo_kernels as ak

from . import data as D
from .model import load_causal_lm

# What the scoring model reads before the rejected response it scores (RLMEC's rewriting prompt).
REWRITE_TEMPLATE = "##Question: {prompt}\n##Answer: {answer}\n##Rewrite: "


def load_for_inference(model_dir: str | Path):
    """A saved causal LM in fp32, in eval mode, on the CPU."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    sample: bool = False,
    num_return_sequences: int = 1,
    batch_size: int = 512,
) -> list[list[str]]:
    """``num_return_sequences`` answers per prompt: greedy, or sampled at temperature 1 (full vocabulary).

    Prompts are batched without padding, so the prompts of one batch must tokenise to the same length (the demo's
    do); give ``batch_size=1`` for prompts of any length. Special tokens are left out of the decoded answers."""
    out: list[list[str]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        ids = tokenizer(chunk, return_tensors="pt").input_ids
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=1.0 if sample else None,
            top_k=None,
            top_p=None,
            num_return_sequences=num_return_sequences,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
        out.extend(texts[j * num_return_sequences : (j + 1) * num_return_sequences] for j in range(len(chunk)))
    return out


def correct_answers(model_dir: str, input_path: str, output_path: str, *, max_new_tokens: int = 256) -> int:
    """Run a trained Aligner-style corrector over {question, answer} lines; write them back with "correction".

    Greedy decoding of the Aligner prompt (``data.aligner_prompt``), one line at a time. Returns the line count."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_for_inference(model_dir)
    rows = []
    for where, obj in D.read_jsonl(input_path):
        for key in ("question", "answer"):
            if not isinstance(obj.get(key), str):
                raise ValueError(f"{where}: field {key!r} must be a string, got {obj.get(key)!r}")
        prompt = D.aligner_prompt(obj["question"], obj["answer"])
        (correction,) = generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1)[0]
        rows.append({**obj, "correction": correction})
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return len(rows)


def scoring_model_weights(
    scoring_model: str, tokenizer, examples: list, feats: list[dict], device: torch.device
) -> list[dict]:
    """Forgetting features with ALLO/RLMEC-style token weights ``w_t = 1 - p(y_t | rewrite prompt, y_<t)``.

    The scoring model reads ``REWRITE_TEMPLATE`` (question and the rejected answer) and is teacher-forced on the
    rejected response; a token the rewriter would copy (p near 1) is aligned and gets weight near 0, a token it would
    change gets weight near 1 (forgotten). The scoring model must share the policy's tokenizer. Every rank scores
    every example (plain torch, no engine): the forgetting sets ALLO uses are small.
    """
    scorer = load_causal_lm(scoring_model, dtype=torch.float32).to(device).eval()
    if scorer.get_output_embeddings().weight.shape[0] < len(tokenizer):
        raise ValueError(
            f"forget.scoring_model {scoring_model!r} has a smaller vocabulary than the "
            f"policy's tokenizer ({len(tokenizer)}): it must share the policy's tokenizer"
        )
    out = []
    for ex, feat in zip(examples, feats):
        labels = torch.tensor(feat["labels"])
        response = torch.tensor(feat["input_ids"])[labels != ak.IGNORE_INDEX]
        prompt = D.plain_text(ex.prompt)
        answer = D.plain_text(ex.rejected)
        head = tokenizer(REWRITE_TEMPLATE.format(prompt=prompt, answer=answer)).input_ids
        ids = torch.tensor([head + response.tolist()], device=device)
        with torch.no_grad():
            logits = scorer(ids).logits[0, len(head) - 1 : -1]
            p = ak.token_logprobs(logits, response.to(device)).exp().cpu()
        weights = torch.zeros(len(feat["input_ids"]))
        weights[labels != ak.IGNORE_INDEX] = 1.0 - p
        out.append({**feat, "token_weights": weights.tolist()})
    return out
