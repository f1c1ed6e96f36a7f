"""A character-level Hugging Face tokenizer built locally (no download): one token per character.

Used by the tests and the demo, where a real tokenizer would need the network. It is a ``PreTrainedTokenizerFast``
with ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; ``add_special_tokens=True`` prepends ``<bos>``. Save it with
``save_pretrained(dir)`` (or ``build_char_tokenizer(save_dir=dir)``) and reload it with
``AutoTokenizer.from_pretrained(dir)``.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")

# A minimal chat template (Jinja, as transformers renders it): "<|role|>content\n" per message.
SIMPLE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(
    chars: str | None = None, *, save_dir: str | Path | None = None, chat_template: str | None = None
):
    """Character-level tokenizer over ``chars`` (default: printable ASCII, i.e. letters, digits, punctuation,
    space, ``\\n`` and ``\\t``; anything else maps to ``<unk>``). Special tokens get ids 0-3 in the order
    pad, bos, eos, unk; character ``chars[i]`` gets id ``4 + i``."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    if chars is None:
        chars = string.printable  # includes \n, \t, \r, \x0b, \x0c
    unique = list(dict.fromkeys(chars))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in unique:
        vocab.setdefault(c, len(vocab))
    # BPE with no merges and no pre-tokenizer = exactly one token per character, spaces included.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok
