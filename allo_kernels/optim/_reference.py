"""Torch reference of the SparseAdamW update (the ground truth and the fallback on any device).

On the selected (compact) elements it runs exactly the op sequence of ``torch.optim.AdamW``'s single-tensor
implementation (torch/optim/adam.py, ``_single_tensor_adam`` with decoupled weight decay), so on CPU fp32 the result
is bit-identical to torch.optim.AdamW restricted to those entries:

    p      <- p * (1 - lr * wd)                          (only when wd != 0)
    m      <- lerp(m, g, 1 - beta1)
    v      <- v * beta2 + (1 - beta2) * g * g
    vmax   <- max(vmax, v)                               (amsgrad)
    denom  <- sqrt(v or vmax) / sqrt(1 - beta2^t) + eps
    p      <- p + (-lr / (1 - beta1^t)) * m / denom

Low-precision params are updated in fp32 (from the fp32 master rows when there are any) and rounded back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._layout import Layout


@dataclass(frozen=True)
class StepScalars:
    """Per-tensor scalars of one step, derived in float64 exactly as torch.optim.AdamW derives them."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: float
    amsgrad: bool
    maximize: bool

    @property
    def decay(self) -> float:
        return 1 - self.lr * self.weight_decay

    @property
    def step_size(self) -> float:
        return self.lr / (1 - self.beta1**self.step)

    @property
    def bias_correction2_sqrt(self) -> float:
        return (1 - self.beta2**self.step) ** 0.5


def _adamw_inplace(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    sc: StepScalars,
) -> None:
    if sc.maximize:
        grad = -grad
    if sc.weight_decay != 0:
        param.mul_(sc.decay)
    exp_avg.lerp_(grad, 1 - sc.beta1)
    exp_avg_sq.mul_(sc.beta2).addcmul_(grad, grad, value=1 - sc.beta2)
    if sc.amsgrad:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = (max_exp_avg_sq.sqrt() / sc.bias_correction2_sqrt).add_(sc.eps)
    else:
        denom = (exp_avg_sq.sqrt() / sc.bias_correction2_sqrt).add_(sc.eps)
    param.addcdiv_(exp_avg, denom, value=-sc.step_size)


def reference_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    layout: Layout,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    master: torch.Tensor | None,
    sc: StepScalars,
) -> None:
    """Update ``param`` (any shape, contiguous or not for dense layouts) in place on the layout's elements."""
    m = exp_avg.view(-1)
    v = exp_avg_sq.view(-1)
    vmax = None if max_exp_avg_sq is None else max_exp_avg_sq.view(-1)
    mw = None if master is None else master.view(-1)
    if layout.dense:
        g = grad if grad.dtype == torch.float32 else grad.float()
        if mw is not None:
            _adamw_inplace(
                mw.view(param.shape),
                g,
                m.view(param.shape),
                v.view(param.shape),
                None if vmax is None else vmax.view(param.shape),
                sc,
            )
            param.copy_(mw.view(param.shape))
        elif param.dtype == torch.float32:
            _adamw_inplace(
                param, g, m.view(param.shape), v.view(param.shape), None if vmax is None else vmax.view(param.shape), sc
            )
        else:
            work = param.float()
            _adamw_inplace(
                work, g, m.view(param.shape), v.view(param.shape), None if vmax is None else vmax.view(param.shape), sc
            )
            param.copy_(work)
        return
    if layout.n_compact == 0:
        return
    flat = param.view(-1)
    idx = layout.flat_index()
    g = grad.reshape(-1).index_select(0, idx).float()
    work = mw if mw is not None else flat.index_select(0, idx).float()
    em = layout.elem_mask
    if em is not None:  # keep unselected elements of kept rows (and their state) untouched
        saved = [t.clone() for t in (work, m, v) + ((vmax,) if vmax is not None else ())]
    _adamw_inplace(work, g, m, v, vmax, sc)
    if em is not None:
        for t, old in zip((work, m, v) + ((vmax,) if vmax is not None else ()), saved):
            torch.where(em, t, old, out=t)
    flat.index_copy_(0, idx, work.to(param.dtype))
