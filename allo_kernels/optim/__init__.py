"""Optimizers: SparseAdamW (row / element masked AdamW with compact state; Triton, native C++ and torch backends).

``zero_param_groups`` prepares param groups and masks for DeepSpeed ZeRO. It lives in
``allo_kernels.integrations.deepspeed``, with everything else that knows DeepSpeed, and is still importable from here.
"""

from .sparse_adamw import SparseAdamW, named_masks

__all__ = ["SparseAdamW", "named_masks", "zero_param_groups"]


def __getattr__(name: str):
    # Looked up on use: integrations.deepspeed imports this package, so importing it here would be circular.
    if name == "zero_param_groups":
        from ..integrations.deepspeed import zero_param_groups

        return zero_param_groups
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
