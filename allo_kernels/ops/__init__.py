"""One file per op: Triton kernels, launch wrappers, autograd.Function and the torch reference."""

from .token_logprobs import token_logprobs, token_logprobs_reference

__all__ = ["token_logprobs", "token_logprobs_reference"]
