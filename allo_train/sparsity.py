"""How a stage that trains the selected neurons (forget, improve) trains them: its ``sparsity`` key.

* ``delta``: every nn.Linear weight the masks select rows of is frozen and gets a compact trainable delta on those
  rows (``allo_kernels.attach_row_deltas``); every other parameter is frozen. The deltas are ordinary parameters: a
  stock ``torch.optim.AdamW`` trains them under any ZeRO stage and offload, no ``bind()``, and DeepSpeed keeps
  gradients, fp32 master copies and Adam state for the deltas only. Masks that select whole parameters or nothing
  (layer granularity) need no delta: the selected parameters train themselves, the rest are frozen. At the end the
  deltas are merged into the weights (``merge_row_deltas``): the stage's ``model/`` is a plain Hugging Face model,
  and ``deltas.safetensors`` beside it holds the deltas alone (``load_row_deltas`` puts them onto the starting
  model). AdamW's weight decay shrinks a delta, i.e. pulls the selected rows toward the *starting* weights, not
  toward zero as in ``masked`` mode; ALLO's published settings use weight decay 0, where both modes agree.
* ``masked``: SparseAdamW over the selected parameters, bound to the engine: it updates only the selected rows or
  elements and keeps Adam state for them only, but the selected matrices carry dense gradients (and ZeRO's dense
  fp32 master copies). The only mode for element masks.
* unset (the default): ``delta`` when the masks allow it (row or layer masks on nn.Linear weights, as locate writes
  for ``granularity: row`` or ``layer`` with the default exclusions), ``masked`` otherwise (element masks; selected
  rows of an embedding, a norm, a bias, the lm_head or a layer that is not an nn.Linear); the stage says which and
  why on one line.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

import allo_kernels as ak

SPARSITY_MODES = ("delta", "masked")
DELTAS_FILE = "deltas.safetensors"


@dataclass
class DeltaPlan:
    """What delta mode trains: row deltas on ``rows`` ({weight name: row mask}) and the ``whole`` parameters
    themselves (masks selecting all of them); everything else is frozen."""

    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    whole: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.rows:
            n_rows = sum(int(m.sum()) for m in self.rows.values())
            return f"row deltas on {n_rows} rows of {len(self.rows)} weights, every other parameter frozen"
        return f"{len(self.whole)} whole parameters trained (masks select all of them or nothing), the rest frozen"


def plan_deltas(lm: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> DeltaPlan:
    """Which parameters delta mode trains, and how; ValueError naming a mask that cannot be trained this way.

    ``masks`` are checked against the model already (``locate.check_masks_match_model``). When every mask selects
    all of its parameter or nothing, the selected parameters train whole. Otherwise every mask that selects
    something must select rows of an nn.Linear weight other than the output embeddings (the losses read the lm_head
    weight directly, so a delta there would never train); an all-True element mask counts as all rows."""
    params = dict(lm.named_parameters(remove_duplicate=False))
    selecting = {name: m for name, m in masks.items() if bool(m.any())}
    if not selecting:
        raise ValueError("the masks select no parameter at all: nothing to train (check locate.ratio / exclude)")
    if all(bool(m.all()) for m in selecting.values()):
        return DeltaPlan(whole=list(selecting))
    head = lm.get_output_embeddings()
    head_weight = None if head is None else getattr(head, "weight", None)
    rows = {}
    for name, mask in selecting.items():
        shape = tuple(params[name].shape)
        if params[name] is head_weight:
            raise ValueError(
                f"mask {name!r} selects rows of the output embeddings (lm_head), whose weight the losses read "
                "directly: a row delta there would never train"
            )
        if mask.dim() != 1:  # the parameter's shape: elements (a 1-D mask of a 1-D parameter is left to the library)
            if not bool(mask.all()):
                n = int(mask.sum())
                raise ValueError(
                    f"mask {name!r} selects {n} of {mask.numel()} elements (shape {tuple(mask.shape)}): element masks "
                    "cannot be made compact, row deltas train whole rows of nn.Linear weights"
                )
            mask = torch.ones(shape[0], dtype=torch.bool)
        rows[name] = mask
    return DeltaPlan(rows=rows)


def apply_delta_mode(lm: torch.nn.Module, plan: DeltaPlan) -> dict[str, torch.nn.Parameter]:
    """Attach the plan's row deltas (fp32), make the plan's whole parameters trainable and freeze everything else.
    The library checks every name and mask before it changes anything (ValueError naming the parameter: not an
    nn.Linear, tied, ...), so a refused plan leaves ``lm`` as it was. Returns ``{weight name: delta}``."""
    deltas = ak.attach_row_deltas(lm, dict(plan.rows))
    trainable = {id(d) for d in deltas.values()}
    params = dict(lm.named_parameters(remove_duplicate=False))
    trainable |= {id(params[name]) for name in plan.whole}
    for p in lm.parameters():
        p.requires_grad_(id(p) in trainable)
    return deltas


def attached_copy(
    lm: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], rows: Mapping[str, torch.Tensor]
) -> torch.nn.Module:
    """A CPU copy of ``lm`` (its class and config) with the row deltas attached and the values of ``state_dict`` (the
    full state of the model in training, deltas included, e.g. gathered from ZeRO-3 partitions): what
    ``save_row_deltas`` and ``merge_row_deltas`` work on when the engine's own model is partitioned. Built on the
    meta device and given ``state_dict``'s tensors (no copy), except the weights that carry a delta, which are copied
    when they are ``lm``'s own storage, so that merging never writes into the model in training."""
    with torch.device("meta"):
        skeleton = type(lm)(copy.deepcopy(lm.config))
    ak.attach_row_deltas(skeleton, dict(rows))
    live = {p.untyped_storage().data_ptr() for p in lm.parameters() if p.numel()}
    values = dict(state_dict)
    for name in rows:
        t = values[name]
        if t.numel() and t.untyped_storage().data_ptr() in live:
            values[name] = t.clone()
    skeleton.load_state_dict(values, strict=True, assign=True)
    for name, buf in lm.named_buffers():  # non-persistent buffers (e.g. rotary frequencies) are not in a state dict
        if name not in values:
            module_path, _, attr = name.rpartition(".")
            skeleton.get_submodule(module_path).register_buffer(attr, buf.detach().cpu(), persistent=False)
    if getattr(lm, "generation_config", None) is not None:
        skeleton.generation_config = copy.deepcopy(lm.generation_config)
    return skeleton
