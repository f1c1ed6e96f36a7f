"""allo_kernels: fused kernels, losses and a sparse optimizer for low-redundant LLM alignment.

Public API (the contract is in docs/design.md; the README shows it in use):

* ``token_logprobs``                 per-token log-probs from logits, one read forward and one backward
* ``token_scores`` / ``TokenScores`` log-probs + rewards + top-percentile token mask + per-sequence sums
* ``fused_linear_token_logprobs`` / ``fused_linear_token_scores``: the same from hidden states x lm_head,
  never holding the [N, V] logits
* ``fused_linear_cross_entropy``     the SFT / Aligner loss from hidden states x lm_head, gradients made in the forward
* ``preference_loss`` / ``forgetting_loss``: one call from a [chosen; rejected] (or forget) batch to (loss, metrics)
* ``losses``                         DPO family, NPO, ALLO token-NPO and kept-token DPO, SimPO, ORPO, KTO, SFT
* ``attach_row_deltas`` / ``merge_row_deltas`` / ``save_row_deltas`` / ``load_row_deltas`` /
  ``row_delta_parameters``: compact trainable neuron deltas on frozen ``nn.Linear`` weights (no weight-gradient
  GEMM for W), merged back at save
* ``integrations``                   the one place that knows a training framework (DeepSpeed ZeRO)
"""

from . import integrations, losses
from .objectives import forgetting_loss, preference_loss
from .ops.fused_linear import fused_linear_token_logprobs, fused_linear_token_scores
from .ops.fused_linear_ce import fused_linear_cross_entropy
from .ops.token_logprobs import IGNORE_INDEX, token_logprobs
from .ops.token_scores import TokenScores, token_scores
from .optim import SparseAdamW
from .row_deltas import attach_row_deltas, load_row_deltas, merge_row_deltas, row_delta_parameters, save_row_deltas

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "SparseAdamW",
    "TokenScores",
    "__version__",
    "attach_row_deltas",
    "forgetting_loss",
    "fused_linear_cross_entropy",
    "fused_linear_token_logprobs",
    "fused_linear_token_scores",
    "integrations",
    "load_row_deltas",
    "losses",
    "merge_row_deltas",
    "preference_loss",
    "row_delta_parameters",
    "save_row_deltas",
    "token_logprobs",
    "token_scores",
]
