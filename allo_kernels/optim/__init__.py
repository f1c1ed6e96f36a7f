"""Optimizers: SparseAdamW (row / element masked AdamW with compact state; Triton, native C++ and torch backends)."""

from .sparse_adamw import SparseAdamW, named_masks

__all__ = ["SparseAdamW", "named_masks"]
