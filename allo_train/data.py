"""Data: JSONL readers, tokenization, collators, the held-out split and a resumable sampler.

Formats (one JSON object per line; blank lines are skipped):

* preference (TRL-compatible): ``{"prompt", "chosen", "rejected"}``, each a string, or chat-message lists
  ``[{"role": ..., "content": ...}, ...]`` (a string response after a message-list prompt is read as one assistant
  message).
* forgetting: ``{"prompt", "rejected"}`` plus the token-reward source the config names: ``"token_weights"`` (one float
  per response token, see below), ``"corrected"`` (a minimally edited good response), or nothing when a scoring model
  provides the weights at training time.
* correction (Aligner): ``{"question", "answer", "correction"}`` strings.
* SFT (TRL prompt-completion): ``{"prompt", "completion"}`` (the completion field name is configurable).

A malformed line raises ``ValueError`` starting with ``"<file>:<line>:"``: bad JSON, bytes that are not UTF-8, a
missing or mistyped field, ``token_weights`` that are not finite numbers in ``[0, MAX_TOKEN_WEIGHT]``, and a
``token_weights`` length that does not match the tokenized response (checked at tokenization, where the token count is
known). A forgetting file in which no example keeps a non-zero token weight (after truncation) is a ``ValueError`` too:
it would train nothing.

Warnings (one line each, with counts and example lines, on the ``allo_train`` logger): prompts cut to
``max_prompt_length``, responses cut to ``max_length``, preference pairs whose chosen and rejected tokens are the same
(DPO gives them loss log 2 and no gradient), forgetting examples whose weights are all zero.

Tokenization. String prompt/response: ``<bos>? + tok(prompt)`` and ``tok(response) + <eos>?`` are tokenized separately
(``add_special_tokens=False``) and concatenated, as TRL does. Message lists with a tokenizer that has a chat template:
the prompt is ``apply_chat_template(prompt, add_generation_prompt=True)``, the response is the rest of
``apply_chat_template(prompt + response)`` (the template supplies BOS/end-of-turn; no EOS is appended). Without a chat
template messages are rendered as plain text, ``"<role>: <content>\\n"`` per message followed by ``"assistant: "``,
and then treated like strings. ``token_weights`` cover the response tokens *before* the appended EOS, i.e.
``len(token_weights) == len(response_token_ids(tokenizer, prompt, response))``; the appended EOS gets weight 0.

Truncation: the prompt keeps its last ``max_prompt_length`` tokens (the part next to the response), then the response
keeps its first ``max_length - len(prompt)`` tokens (and its weights with it).

Features and batches use the *unshifted* layout: ``labels[t]`` is ``input_ids[t]`` on response tokens and
``IGNORE_INDEX`` (-100, allo_kernels' constant) on prompt tokens and padding, ``token_weights[t]`` is the weight of
the token ``input_ids[t]`` (0 on prompt and padding). Callers shift: ``logits[:, :-1]`` with ``labels[:, 1:]`` and
``token_weights[:, 1:]``. Padding is on the right.

"corrected" weights (:func:`corrected_token_weights`): ``difflib.SequenceMatcher(None, rejected_ids, corrected_ids,
autojunk=False)`` aligns the two token sequences (Ratcliff/Obershelp: close to, not always exactly, a minimal edit).
Rejected tokens inside a ``replace`` or ``delete`` opcode get weight 1; for an ``insert`` (the good response adds
tokens the rejected one lacks) the rejected token at the insertion point gets weight 1, since that is the position
where the model should have produced something else; all other tokens get 0. Both responses are compared with their
appended EOS (or end-of-turn tokens), so a correction that only appends text marks the rejected response's EOS.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from allo_kernels import IGNORE_INDEX

# Where a forgetting example's token weights come from: its "token_weights" field, a "corrected" response (tokens the
# correction changes get weight 1), or a scoring model named in the config (nothing extra in the file).
TOKEN_WEIGHT_SOURCES = ("token_weights", "corrected", "scoring_model")
# Token weights scale a token's forgetting loss; ALLO's are in [0, 1]. Far larger values mean the file holds something
# else (logits, counts) and would blow the loss up, so they are refused.
MAX_TOKEN_WEIGHT = 1000.0

log = logging.getLogger("allo_train.data")
Messages = list  # list[dict[str, str]] with "role" and "content"
Text = str | Messages


# --------------------------------------------------------------------------------------------------------------------
# Examples and readers
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class PreferenceExample:
    prompt: Text
    chosen: Text
    rejected: Text
    source: str = ""  # "<file>:<line>", for error messages


@dataclass
class ForgettingExample:
    prompt: Text
    rejected: Text
    token_weights: list[float] | None = None
    corrected: Text | None = None
    source: str = ""


@dataclass
class CorrectionExample:
    question: str
    answer: str
    correction: str
    source: str = ""


@dataclass
class SFTExample:
    prompt: Text
    completion: Text
    source: str = ""


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ``("<file>:<line>", object)`` for each non-blank line; bytes that are not UTF-8, bad JSON or a non-object
    is a ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}, {e.reason}); "
                    "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                ) from None
            line = line.rstrip("\r\n")  # the line break is not part of the object (errors at its end say so)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                end = " (the end of the line)" if e.pos >= len(line.rstrip()) else ""
                raise ValueError(f"{where}: invalid JSON at column {e.pos + 1}{end}: {e.msg}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
            yield where, obj


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _require(where: str, obj: dict, key: str) -> Any:
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r} (fields present: {sorted(obj)})")
    return obj[key]


def _string(where: str, obj: dict, key: str) -> str:
    value = _require(where, obj, key)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {_describe(value)}")
    return value


def _text(where: str, obj: dict, key: str) -> Text:
    value = _require(where, obj, key)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        for i, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(
                    f"{where}: field {key!r} message {i} must be {{'role': str, 'content': str}}, got {_describe(m)}"
                )
        return value
    raise ValueError(
        f"{where}: field {key!r} must be a string or a non-empty list of chat messages, got {_describe(value)}"
    )


def _response(where: str, obj: dict, key: str, prompt: Text) -> Text:
    value = _text(where, obj, key)
    if isinstance(prompt, str) and not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} is a message list but 'prompt' is a string; use one kind for both")
    if isinstance(prompt, list) and isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    return value


def load_preference_jsonl(path: str | Path) -> list[PreferenceExample]:
    out = []
    for where, obj in read_jsonl(path):
        prompt = _text(where, obj, "prompt")
        out.append(
            PreferenceExample(
                prompt=prompt,
                chosen=_response(where, obj, "chosen", prompt),
                rejected=_response(where, obj, "rejected", prompt),
                source=where,
            )
        )
    return out


def load_forgetting_jsonl(path: str | Path, *, token_weight_source: str = "token_weights") -> list[ForgettingExample]:
    """``token_weight_source``: "token_weights" | "corrected" | "scoring_model" (the field each line must carry;
    nothing extra for "scoring_model")."""
    if token_weight_source not in TOKEN_WEIGHT_SOURCES:
        raise ValueError(
            f"token_weight_source must be one of {list(TOKEN_WEIGHT_SOURCES)}, got {token_weight_source!r}"
        )
    out = []
    for where, obj in read_jsonl(path):
        prompt = _text(where, obj, "prompt")
        ex = ForgettingExample(prompt=prompt, rejected=_response(where, obj, "rejected", prompt), source=where)
        if token_weight_source == "token_weights":
            ex.token_weights = _token_weights(where, _require(where, obj, "token_weights"))
        elif token_weight_source == "corrected":
            ex.corrected = _response(where, obj, "corrected", prompt)
        out.append(ex)
    return out


def _token_weights(where: str, weights: Any) -> list[float]:
    if not isinstance(weights, list) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
    ):
        raise ValueError(f"{where}: field 'token_weights' must be a list of finite numbers, got {_describe(weights)}")
    for i, w in enumerate(weights):
        if not 0.0 <= w <= MAX_TOKEN_WEIGHT:
            raise ValueError(
                f"{where}: field 'token_weights' value {i} is {w!r}; token weights must be in [0, {MAX_TOKEN_WEIGHT:g}]"
            )
    return [float(w) for w in weights]


def load_correction_jsonl(path: str | Path) -> list[CorrectionExample]:
    return [
        CorrectionExample(
            question=_string(where, obj, "question"),
            answer=_string(where, obj, "answer"),
            correction=_string(where, obj, "correction"),
            source=where,
        )
        for where, obj in read_jsonl(path)
    ]


def load_sft_jsonl(path: str | Path, *, completion_field: str = "completion") -> list[SFTExample]:
    out = []
    for where, obj in read_jsonl(path):
        prompt = _text(where, obj, "prompt")
        out.append(SFTExample(prompt=prompt, completion=_response(where, obj, completion_field, prompt), source=where))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------------------------


def pad_token_id_of(tokenizer) -> int:
    """The pad id: the tokenizer's pad token, else its EOS, else 0 (padding is masked out either way)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _plain_messages(messages: Messages) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def plain_text(text: Text) -> str:
    """A string as is; chat messages as ``"role: content"`` lines (how a prompt without a chat template reads)."""
    return _plain_messages(text) if isinstance(text, list) else text


def encode_prompt_response(
    tokenizer, prompt: Text, response: Text, *, source: str = ""
) -> tuple[list[int], list[int], int]:
    """Tokenize one prompt/response pair (no truncation). Returns ``(prompt_ids, response_ids, n_core)`` where the
    first ``n_core`` response ids are the response text's own tokens (what ``token_weights`` cover) and the rest is the
    appended EOS, if any."""
    if isinstance(prompt, list):
        if getattr(tokenizer, "chat_template", None):
            prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            full_text = tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=False)
            if not full_text.startswith(prompt_text):
                raise ValueError(
                    f"{source}: the chat template renders prompt+response so that it does not start with the rendered "
                    "prompt; cannot tell response tokens apart"
                )
            response_ids = _ids(tokenizer, full_text[len(prompt_text) :])
            return _ids(tokenizer, prompt_text), response_ids, len(response_ids)
        prompt = _plain_messages(prompt) + "assistant: "
        response = "".join(m["content"] for m in response)
    prompt_ids = _ids(tokenizer, prompt)
    if tokenizer.bos_token_id is not None:
        prompt_ids = [int(tokenizer.bos_token_id)] + prompt_ids
    response_ids = _ids(tokenizer, response)
    n_core = len(response_ids)
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [int(tokenizer.eos_token_id)]
    return prompt_ids, response_ids, n_core


def response_token_ids(tokenizer, prompt: Text, response: Text) -> list[int]:
    """The response tokens that a ``token_weights`` list must cover, one weight each (EOS not included)."""
    _, response_ids, n_core = encode_prompt_response(tokenizer, prompt, response)
    return response_ids[:n_core]


def truncate(
    prompt_ids: list[int], response_ids: list[int], *, max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int]]:
    """Keep the prompt's last ``max_prompt_length`` tokens, then the response's first ``max_length - len(prompt)``."""
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
    return prompt_ids, response_ids[: max_length - len(prompt_ids)]


class _Notes:
    """Counts of silent surprises in one tokenization pass, each warned once with its count and example lines."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.seen: dict[str, list[str]] = {}

    def add(self, what: str, source: str) -> None:
        self.seen.setdefault(what, []).append(source)

    def count(self, what: str) -> int:
        return len(self.seen.get(what, []))

    def warn(self, what: str, message: str) -> None:
        """``message`` formatted with n, total, file and lines (the first few line numbers)."""
        sources = self.seen.get(what)
        if not sources:
            return
        file = sources[0].rpartition(":")[0] or "data"
        lines = ", ".join(s.rpartition(":")[2] for s in sources[:5]) + (", ..." if len(sources) > 5 else "")
        log.warning(
            "[allo-train] warning: %s", message.format(n=len(sources), total=self.total, file=file, lines=lines)
        )


def _truncate_noted(
    notes: _Notes, source: str, prompt_ids: list[int], response_ids: list[int], lengths: dict
) -> tuple[list[int], list[int]]:
    """:func:`truncate`, noting a cut prompt ("prompt") and a cut response ("response") of example ``source``."""
    p, r = truncate(prompt_ids, response_ids, **lengths)
    if len(p) < len(prompt_ids):
        notes.add("prompt", source)
    if len(r) < len(response_ids):
        notes.add("response", source)
    return p, r


def _warn_truncation(notes: _Notes, lengths: dict, *, examples: str = "examples") -> None:
    mpl, ml = lengths["max_prompt_length"], lengths["max_length"]
    notes.warn(
        "prompt",
        f"{{file}}: {{n}} of {{total}} {examples} have a prompt longer than max_prompt_length={mpl} tokens; it keeps "
        f"only its last {mpl} (lines {{lines}})",
    )
    notes.warn(
        "response",
        f"{{file}}: {{n}} of {{total}} {examples} have a response cut to fit max_length={ml} tokens together with "
        "its prompt (lines {lines})",
    )


def _features(prompt_ids: list[int], response_ids: list[int]) -> dict[str, list]:
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


def tokenize_preference(
    examples: Sequence[PreferenceExample], tokenizer, *, max_length: int, max_prompt_length: int
) -> list[dict]:
    """-> ``[{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "source"}]``. Warns about
    truncated prompts / responses and about pairs whose chosen and rejected tokens are the same."""
    out = []
    notes = _Notes(len(examples))
    lengths = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    for ex in examples:
        feat: dict[str, Any] = {"source": ex.source}
        pair_notes = _Notes(0)
        for side in ("chosen", "rejected"):
            p, r, _ = encode_prompt_response(tokenizer, ex.prompt, getattr(ex, side), source=ex.source)
            p, r = _truncate_noted(pair_notes, ex.source, p, r, lengths)
            f = _features(p, r)
            feat[f"{side}_input_ids"], feat[f"{side}_labels"] = f["input_ids"], f["labels"]
        for what in ("prompt", "response"):  # once per pair, whichever side was cut
            if pair_notes.count(what):
                notes.add(what, ex.source)
        if feat["chosen_input_ids"] == feat["rejected_input_ids"]:
            notes.add("same", ex.source)
        out.append(feat)
    _warn_truncation(notes, lengths, examples="pairs")
    notes.warn(
        "same",
        "{file}: {n} of {total} pairs have the same chosen and rejected tokens after truncation (lines {lines}): "
        "DPO gives them loss log 2 and no gradient",
    )
    return out


def corrected_token_weights(rejected_ids: Sequence[int], corrected_ids: Sequence[int]) -> list[float]:
    """1.0 for each rejected token that the edit rejected -> corrected changes, 0.0 for the others (see module doc)."""
    weights = [0.0] * len(rejected_ids)
    matcher = difflib.SequenceMatcher(None, list(rejected_ids), list(corrected_ids), autojunk=False)
    for op, i1, i2, _, _ in matcher.get_opcodes():
        if op in ("replace", "delete"):
            for i in range(i1, i2):
                weights[i] = 1.0
        elif op == "insert" and i1 < len(weights):
            weights[i1] = 1.0
    return weights


def tokenize_forgetting(
    examples: Sequence[ForgettingExample], tokenizer, *, max_length: int, max_prompt_length: int
) -> list[dict]:
    """-> ``[{"input_ids", "labels", "token_weights"?, "source"}]``. ``token_weights`` (same length as input_ids, 0 on
    the prompt and the appended EOS) comes from the example's ``token_weights`` or ``corrected``; examples with neither
    (scoring-model source) get no ``token_weights`` key. Examples that keep no non-zero weight are counted in a
    warning; when that is every example, a ValueError (the stage would train nothing)."""
    out = []
    notes = _Notes(len(examples))
    lengths = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    for ex in examples:
        p, r, n_core = encode_prompt_response(tokenizer, ex.prompt, ex.rejected, source=ex.source)
        weights: list[float] | None = None
        if ex.token_weights is not None:
            if len(ex.token_weights) != n_core:
                raise ValueError(
                    f"{ex.source}: 'token_weights' has {len(ex.token_weights)} values but the rejected response has "
                    f"{n_core} tokens with this tokenizer (see allo_train.data.response_token_ids)"
                )
            weights = list(ex.token_weights) + [0.0] * (len(r) - n_core)  # the appended EOS is not weighted
        elif ex.corrected is not None:
            # Compared with EOS included: a correction that appends text marks the rejected EOS (ended too early).
            _, c, _ = encode_prompt_response(tokenizer, ex.prompt, ex.corrected, source=ex.source)
            weights = corrected_token_weights(r, c)
        p, r = _truncate_noted(notes, ex.source, p, r, lengths)
        feat: dict[str, Any] = {**_features(p, r), "source": ex.source}
        if weights is not None:
            feat["token_weights"] = [0.0] * len(p) + weights[: len(r)]
            if not any(feat["token_weights"]):
                notes.add("zero", ex.source)
        out.append(feat)
    _warn_truncation(notes, lengths)
    if out and notes.count("zero") == len(out):
        file = out[0]["source"].rpartition(":")[0]
        raise ValueError(
            f"{file}: every example ({len(out)}) has token weight 0 on all the response tokens it keeps (after "
            f"truncation to max_length={max_length}): forgetting would train nothing (check token_weights, or "
            "'corrected' responses equal to 'rejected')"
        )
    notes.warn(
        "zero",
        "{file}: {n} of {total} examples have token weight 0 on all the response tokens they keep (lines {lines}): "
        "they add nothing to the forgetting loss",
    )
    return out


def tokenize_sft(examples: Sequence[SFTExample], tokenizer, *, max_length: int, max_prompt_length: int) -> list[dict]:
    """-> ``[{"input_ids", "labels", "source"}]``: cross-entropy on completion tokens only."""
    out = []
    notes = _Notes(len(examples))
    lengths = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    for ex in examples:
        p, r, _ = encode_prompt_response(tokenizer, ex.prompt, ex.completion, source=ex.source)
        p, r = _truncate_noted(notes, ex.source, p, r, lengths)
        out.append({**_features(p, r), "source": ex.source})
    _warn_truncation(notes, lengths)
    return out


def aligner_prompt(question: str, answer: str) -> str:
    """Aligner's input format; the model learns to continue it with the correction."""
    return f"##Question: {question}\n##Answer: {answer}\n##Correction: "


def tokenize_correction(
    examples: Sequence[CorrectionExample], tokenizer, *, max_length: int, max_prompt_length: int
) -> list[dict]:
    """Q-A-C -> ``[{"input_ids", "labels", "source"}]`` with labels on the correction tokens (and EOS) only."""
    sft = [SFTExample(aligner_prompt(ex.question, ex.answer), ex.correction, ex.source) for ex in examples]
    return tokenize_sft(sft, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)


def identity_warmup_examples(
    examples: Sequence[CorrectionExample], *, fraction: float, seed: int
) -> list[CorrectionExample]:
    """Aligner's identity warm-up: ``floor(fraction * n)`` examples, drawn deterministically by ``seed``, turned into
    answer -> answer pairs (correction = answer). Train on these first, then on all Q-A-C examples."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    n = math.floor(fraction * len(examples) + 1e-9)
    picked = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [
        CorrectionExample(
            examples[i].question, examples[i].answer, examples[i].answer, examples[i].source + " (identity)"
        )
        for i in picked
    ]


# --------------------------------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------------------------------


def _pad(rows: list[list], value, length: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def _padded_length(rows: list[list], multiple: int | None) -> int:
    length = max((len(r) for r in rows), default=0)
    if multiple:
        length = -(-length // multiple) * multiple
    return length


def _lm_batch(input_ids: list[list[int]], labels: list[list[int]], pad_token_id: int, multiple: int | None) -> dict:
    length = _padded_length(input_ids, multiple)
    return {
        "input_ids": _pad(input_ids, pad_token_id, length, torch.long),
        "attention_mask": _pad([[1] * len(r) for r in input_ids], 0, length, torch.long),
        "labels": _pad(labels, IGNORE_INDEX, length, torch.long),
    }


@dataclass
class PreferenceCollator:
    """Preference features -> one batch of 2B rows: rows [0, B) chosen, rows [B, 2B) rejected (same order)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
        return _lm_batch(ids, labels, self.pad_token_id, self.pad_to_multiple_of)


@dataclass
class ForgettingCollator:
    """Forgetting features -> input_ids, attention_mask, labels and (when the features have them) float32
    ``token_weights`` aligned with ``labels`` (0 on prompt and padding)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = _lm_batch(
            [f["input_ids"] for f in features],
            [f["labels"] for f in features],
            self.pad_token_id,
            self.pad_to_multiple_of,
        )
        has = ["token_weights" in f for f in features]
        if any(has):
            if not all(has):
                missing = next(f.get("source", "?") for f in features if "token_weights" not in f)
                raise ValueError(f"{missing}: example has no token_weights but others in the batch do")
            batch["token_weights"] = _pad(
                [f["token_weights"] for f in features], 0.0, batch["input_ids"].shape[1], torch.float32
            )
        return batch


@dataclass
class SFTCollator:
    """SFT / correction features -> input_ids, attention_mask, labels."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return _lm_batch(
            [f["input_ids"] for f in features],
            [f["labels"] for f in features],
            self.pad_token_id,
            self.pad_to_multiple_of,
        )


# --------------------------------------------------------------------------------------------------------------------
# Held-out split and data order
# --------------------------------------------------------------------------------------------------------------------


def train_eval_split(items: Sequence, *, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split: ``floor(eval_fraction * n)`` items (at least 1 when eval_fraction > 0 and n >= 2) drawn
    by ``seed`` go to eval; both parts keep the original order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    n = len(items)
    n_eval = math.floor(eval_fraction * n + 1e-9)
    if eval_fraction > 0 and n_eval == 0 and n >= 2:
        n_eval = 1
    eval_idx = set(random.Random(seed).sample(range(n), n_eval))
    return [x for i, x in enumerate(items) if i not in eval_idx], [x for i, x in enumerate(items) if i in eval_idx]


class ResumableSampler(torch.utils.data.Sampler):
    """Deterministic per-epoch order (a permutation seeded by ``seed + epoch`` when ``shuffle``), sharded across ranks
    (rank r takes positions r, r + world_size, ...; the order is padded by wrapping so every rank gets the same count
    unless ``drop_last``), resumable mid-epoch.

    ``state_dict()`` -> ``{"epoch", "position"}``, position = indices this rank has yielded in the current epoch. It
    is exact when the DataLoader pulls indices only as batches are consumed (``num_workers=0``); with workers, which
    prefetch, record the consumed count yourself and pass it to ``load_state_dict``. Iterating past the end of an
    epoch moves to the next one."""

    def __init__(
        self,
        num_examples: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if num_examples < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"bad sampler arguments: num_examples={num_examples}, rank={rank}, world_size={world_size}"
            )
        self.num_examples, self.seed, self.shuffle = num_examples, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_examples // self.world_size
        return -(-self.num_examples // self.world_size)

    def epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_examples, generator=g).tolist()
        else:
            order = list(range(self.num_examples))
        total = len(self) * self.world_size
        if total > len(order) and order:
            order = order + order[: total - len(order)]
        return order[:total][self.rank :: self.world_size]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)
        while self.position < len(indices):
            i = indices[self.position]
            self.position += 1
            yield i
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
