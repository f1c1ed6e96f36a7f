"""Optimizers: SparseAdamW (row / element masked AdamW with compact state; Triton, native C++ and torch backends).

``zero_param_groups`` prepares param groups and masks for DeepSpeed ZeRO (see ``deepspeed_bind``).
"""

from .deepspeed_bind import zero_param_groups
from .sparse_adamw import SparseAdamW, named_masks

__all__ = ["SparseAdamW", "named_masks", "zero_param_groups"]
