"""allo_kernels: fused kernels, losses and a sparse optimizer for low-redundant LLM alignment.

Public API (see DESIGN.md / README.md): ``token_logprobs``.
"""

from .ops.token_logprobs import token_logprobs
from .ops.token_scores import TokenScores, token_scores

__version__ = "0.1.0"

__all__ = ["token_logprobs", "token_scores", "TokenScores", "__version__"]
