"""Models: load a local Hugging Face causal LM (and tokenizer), build a tiny Llama, the policy wrapper the engine
trains, and the atomic save.

The wrapper returns final hidden states instead of logits: every loss goes through the fused-linear kernels of
``allo_kernels`` (hidden x lm_head chunk by chunk), so the [B, T, V] logits never exist. The lm_head module itself is
never called; under ZeRO-3 the fused op gathers its weight for the forward and the backward.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .files import apply_umask, fsync_tree, naming_write_errors, new_temp_dir, swap_in_dir


def attention_implementation() -> str:
    """ "auto": flash-attn 2 when it is installed and CUDA is there, else PyTorch SDPA."""
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_causal_lm(path: str | Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    if not Path(path).exists():
        raise ValueError(f"model_name_or_path must be a local model directory, got {str(path)!r} (no such path)")
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attention_implementation(), trust_remote_code=trust_remote_code
    )


def load_tokenizer(name_or_path: str | Path):
    """The Hugging Face tokenizer saved at ``name_or_path`` (a model directory, or the config's tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(name_or_path))


def build_tiny_llama(
    tokenizer,
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> Path:
    """A randomly initialised Llama sized for CPU tests and the demo, saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    save_pretrained_atomic(model, tokenizer, out_dir)
    return out_dir


class PolicyHiddenStates(nn.Module):
    """The module DeepSpeed wraps: input ids -> final hidden states [B, T, H] of a causal LM (no logits)."""

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        self.lm = causal_lm

    @property
    def lm_head(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out[0]


def save_pretrained_atomic(
    model,
    tokenizer,
    out_dir: str | Path,
    *,
    state_dict: dict | None = None,
    extra_files: dict[str, Path] | None = None,
    write_extra: Callable[[Path], None] | None = None,
    before_save: Callable[[Path], None] | None = None,
) -> Path:
    """save_pretrained into a temp dir beside ``out_dir``, then swap it in (:func:`files.swap_in_dir`): at every
    moment ``out_dir`` is either absent or a complete model, the old one or the new one. ``extra_files`` are copied
    in ({name: source}); ``write_extra(tmp_dir)`` writes more files after the model, ``before_save(tmp_dir)`` before
    it (e.g. row deltas saved, then merged into the model). Directory and files get the modes the umask gives
    (``files.apply_umask``)."""
    out_dir = Path(out_dir)
    tmp = new_temp_dir(out_dir.parent, out_dir.name)
    try:
        with naming_write_errors(tmp, "saving the model into"):
            if before_save is not None:
                before_save(tmp)
            model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            for name, src in (extra_files or {}).items():
                shutil.copyfile(src, tmp / name)
            if write_extra is not None:
                write_extra(tmp)
            apply_umask(tmp)
            fsync_tree(tmp)
        swap_in_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
