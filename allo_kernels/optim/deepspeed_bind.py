"""SparseAdamW under DeepSpeed: map row / element masks onto ZeRO's flat fp32 partitions (deepspeed imported lazily).

Usage::

    groups, masks = zero_param_groups(model.parameters(), masks)      # drops all-false / frozen-only entries
    opt = SparseAdamW(groups, lr=..., masks=masks)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)   # cfg: zero_allow_untested_optimizer
    opt.bind(engine)                                                   # before the first step

What bind does (facts verified on deepspeed 0.19.8, see shared notes):

* ZeRO-1/2: the inner optimizer steps ``single_partition_of_fp32_groups[i]``, one 1-D fp32 partition per group. A
  param sits at ``round_robin_bit16_offsets[i]`` of the group's (round-robin reordered) flat buffer; this rank owns
  ``[rank * partition_size[i], (rank + 1) * partition_size[i])``. Row r of an [R, C] weight is ``[r*C, (r+1)*C)``.
* ZeRO-3: sub-group i steps ``fp32_partitioned_groups_flat[i]``; ``grad_position[ds_id] = [i, offset, P]``; this rank
  owns param elements ``[rank*P, (rank+1)*P)`` (the last rank carries padding) at ``offset`` of the sub-group.
* Stage 0: the optimizer steps the model params themselves; nothing to map.
Each flat partition gets a compact layout: its selected row segments (clipped at partition edges) plus every element
of unmasked params. Alignment padding belongs to no param and is never touched.
* Grad hooks ``masked_fill`` the grads of unselected rows/elements with 0 (not multiply: inf * 0 is NaN), so
  DeepSpeed's gradient clipping and overflow checks see exactly the masked reference's gradients.
* Offload: set ``"zero_force_ds_cpu_optimizer": false``; the partitions and grads live on CPU and the native kernel
  runs.
* Checkpoints: ``engine.save_checkpoint`` / ``load_checkpoint`` at the same world size round-trip the compact state
  through ``state_dict``. ``export_state()`` / ``import_state()`` move it by parameter name across world sizes.
  ``elastic_checkpoint`` must stay off (DeepSpeed would slice our compact tensors as if they were flat partitions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._validate import describe
from ._layout import make_layout, runs_of


# --------------------------------------------------------------------------------------------------- param groups
def zero_param_groups(params, masks: dict | None = None) -> tuple[list[dict], dict]:
    """Param groups and masks that ZeRO accepts.

    ``params``: an iterable of params or of param-group dicts (a ``"mask"`` key is moved into the returned masks).
    Params whose mask selects nothing get ``requires_grad_(False)`` and leave their group (they would never change);
    frozen params leave too; groups left empty are dropped (ZeRO-1/2 crash on a group without trainable params).
    Returns ``(groups, masks)`` for ``SparseAdamW(groups, masks=masks)``.
    """
    masks = dict(masks or {})
    items = list(params)
    if items and not isinstance(items[0], dict):
        items = [{"params": items}]
    out = []
    for group in items:
        if not isinstance(group, dict):
            raise TypeError(f"params must be all tensors or all param-group dicts, got {describe(group)}")
        group = dict(group)
        plist = list(group["params"]) if not isinstance(group["params"], torch.Tensor) else [group["params"]]
        gmask = group.pop("mask", None)
        if isinstance(gmask, torch.Tensor):
            gmask = [gmask]
        if isinstance(gmask, (list, tuple)):
            if len(gmask) != len(plist):
                raise ValueError(f"param group key 'mask' has {len(gmask)} entries for {len(plist)} params")
            masks.update({p: m for p, m in zip(plist, gmask) if m is not None})
        elif isinstance(gmask, dict):
            masks.update(gmask)
        keep = []
        for p in plist:
            m = masks.get(p)
            if m is not None and not bool(m.any()):
                p.requires_grad_(False)
                masks.pop(p)
                continue
            if p.requires_grad:
                keep.append(p)
        if keep:
            group["params"] = keep
            out.append(group)
    kept = {p for g in out for p in g["params"]}
    return out, {p: m for p, m in masks.items() if p in kept}


# ---------------------------------------------------------------------------------------------------------- bind
@dataclass
class Piece:
    name: str  # parameter name in engine.module
    param_start: int  # first element of the (full, flattened) parameter covered
    length: int


@dataclass
class Binding:
    stage: int
    flat_params: list = field(default_factory=list)  # the tensors the inner optimizer steps
    pieces: dict = field(default_factory=dict)  # flat param -> [Piece per layout segment]
    hooks: list = field(default_factory=list)
    shapes: dict = field(default_factory=dict)  # name -> full shape
    dp_group: object = None


def _segments(mask: torch.Tensor | None, shape: tuple, numel: int, lo: int, hi: int):
    """Selected element ranges of one param, clipped to param elements [lo, hi).

    Returns (starts, lengths, element-mask values or None), all on the mask's / CPU device."""
    lo, hi = max(lo, 0), min(hi, numel)
    if hi <= lo:
        e = torch.empty(0, dtype=torch.int64)
        return e, e, None
    if mask is None:
        return torch.tensor([lo]), torch.tensor([hi - lo]), None
    n_rows = shape[0] if len(shape) >= 1 else 1
    row_size = numel // n_rows
    if mask.dim() == 1 and mask.shape[0] == n_rows and len(shape) >= 1:
        row_sel, elem = mask, None
    else:
        elem = mask.reshape(-1)
        row_sel = mask.reshape(n_rows, row_size).any(dim=1)
    starts, lens = runs_of(row_sel.cpu())
    a = torch.clamp(starts * row_size, min=lo)
    b = torch.clamp((starts + lens) * row_size, max=hi)
    keep = b > a
    a, b = a[keep], b[keep]
    values = None
    if elem is not None:
        n = int((b - a).sum())
        idx = torch.repeat_interleave(a - (torch.cumsum(b - a, 0) - (b - a)), b - a, output_size=n) + torch.arange(n)
        values = elem.cpu()[idx]
    return a, b - a, values


def _build(opt, flat: torch.Tensor, entries: list, binding: Binding) -> None:
    """entries: (name, param, mask, lo, hi, flat_base): param elements [lo, hi) sit at flat_base + x."""
    seg_p, seg_l, emask, pieces, any_elem = [], [], [], [], False
    for name, _p, mask, shape, numel, lo, hi, base in entries:
        a, ln, vals = _segments(mask, shape, numel, lo, hi)
        for s, n in zip(a.tolist(), ln.tolist()):
            pieces.append(Piece(name, s, n))
        seg_p.append(a + base)
        seg_l.append(ln)
        if vals is not None:
            any_elem = True
        emask.append(vals if vals is not None else torch.ones(int(ln.sum()), dtype=torch.bool))
    dev = flat.device
    seg_param = torch.cat(seg_p) if seg_p else torch.empty(0, dtype=torch.int64)
    seg_len = torch.cat(seg_l) if seg_l else torch.empty(0, dtype=torch.int64)
    elem = torch.cat(emask).to(dev) if any_elem else None
    layout = make_layout(flat.numel(), seg_param.to(dev), seg_len.to(dev), elem_mask=elem)
    st = opt.state.get(flat, {})
    if "exp_avg" in st and tuple(st["exp_avg"].shape) != tuple(layout.state_shape):
        raise RuntimeError("SparseAdamW.bind(engine) must run before the first optimizer step")
    opt._layouts[flat] = layout
    binding.flat_params.append(flat)
    binding.pieces[flat] = pieces


def _hook(mask: torch.Tensor, shape: tuple):
    keep = mask if tuple(mask.shape) == tuple(shape) else mask.reshape((-1,) + (1,) * (len(shape) - 1))
    drop = ~keep

    def fn(grad):
        return grad.masked_fill(drop, 0)

    return fn


def bind_engine(opt, engine) -> Binding:
    import deepspeed.comm as dist

    stage = int(engine.zero_optimization_stage())
    names = {id(p): n for n, p in engine.module.named_parameters()}
    masks = dict(opt._masks)
    for p in masks:
        if id(p) not in names:
            raise ValueError(f"a mask belongs to a param that engine.module does not have: {describe(p)}")
    binding = Binding(stage=stage)
    for p, m in masks.items():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        binding.shapes[names[id(p)]] = shape
        if p.requires_grad:
            dev = p.device
            binding.hooks.append(p.register_hook(_hook(m.to(dev), shape)))
    zero = engine.optimizer
    if stage == 0:
        inner = getattr(zero, "optimizer", zero)
        if inner is not opt and zero is not opt:
            raise NotImplementedError(
                f"SparseAdamW.bind: stage 0 with the {type(zero).__name__} wrapper (bf16/fp16 without ZeRO) is not "
                "supported; use ZeRO stage >= 1 for half-precision models"
            )
        if any(id(p) not in names for p in opt._all_params()):
            raise NotImplementedError("SparseAdamW.bind: stage 0 optimizer steps tensors that are not model params")
        for p in opt._all_params():  # the model params are the stepped tensors: record pieces for export/import
            layout = opt._layout(p)
            binding.flat_params.append(p)
            binding.pieces[p] = [
                Piece(names[id(p)], s, n) for s, n in zip(layout.seg_param.tolist(), layout.seg_len.tolist())
            ]
        return binding
    if getattr(zero, "optimizer", None) is not opt:
        raise ValueError(
            "SparseAdamW.bind: engine.optimizer does not wrap this optimizer "
            "(pass optimizer=opt to deepspeed.initialize)"
        )
    if getattr(zero, "elastic_checkpoint", False):
        raise ValueError("SparseAdamW under ZeRO needs zero_optimization.elastic_checkpoint = false")

    for p in masks:
        if p.requires_grad is False:
            raise ValueError(
                f"a mask belongs to a frozen param (ZeRO leaves it out of its partitions): {describe(p)}; "
                "build groups with zero_param_groups()"
            )
    if stage in (1, 2):
        for i, flat in enumerate(zero.single_partition_of_fp32_groups):
            rank = dist.get_rank(group=zero.real_dp_process_group[i])
            ps = int(zero.partition_size[i])
            lo = rank * ps
            entries = []
            for p, off in zip(zero.round_robin_bit16_groups[i], zero.round_robin_bit16_offsets[i]):
                off = int(off)
                entries.append(
                    (names[id(p)], p, masks.get(p), tuple(p.shape), p.numel(), lo - off, lo + ps - off, off - lo)
                )
            _build(opt, flat, entries, binding)
        binding.dp_group = zero.real_dp_process_group[0] if zero.real_dp_process_group else None
    elif stage == 3:
        rank = dist.get_rank(group=zero.dp_process_group)
        for i, flat in enumerate(zero.fp32_partitioned_groups_flat):
            entries = []
            for p in zero.fp16_groups[i]:
                _, off, part = zero.grad_position[zero.get_param_id(p)]
                lo = rank * int(part)
                entries.append(
                    (
                        names[id(p)],
                        p,
                        masks.get(p),
                        tuple(p.ds_shape),
                        int(p.ds_numel),
                        lo,
                        lo + int(part),
                        int(off) - lo,
                    )
                )
            _build(opt, flat, entries, binding)
        binding.dp_group = zero.dp_process_group
    else:
        raise NotImplementedError(f"SparseAdamW.bind: ZeRO stage {stage}")
    return binding


# ------------------------------------------------------------------------------------------- export / import
def export_state(opt, *, gather: bool = True) -> dict:
    """Compact state by parameter name, independent of the world size.

    Returns ``{name: {"shape", "index" (int64 param elements), "exp_avg", "exp_avg_sq"[, "max_exp_avg_sq"], "step"}}``
    with every rank's pieces merged when ``gather`` (an all_gather over the data-parallel group)."""
    binding = opt._binding
    if binding is None:
        raise RuntimeError("export_state needs bind(engine) first")
    local: dict = {}
    for flat in binding.flat_params:
        st = opt.state.get(flat, {})
        layout = opt._layouts[flat]
        seg_state = layout.seg_state.cpu().tolist()
        for piece, s0 in zip(binding.pieces[flat], seg_state):
            rec = local.setdefault(piece.name, {"shape": binding.shapes.get(piece.name), "index": [], "step": 0.0})
            rec["index"].append(torch.arange(piece.param_start, piece.param_start + piece.length))
            rec["step"] = max(rec["step"], float(st["step"]) if "step" in st else 0.0)
            for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if k in st:
                    rec.setdefault(k, []).append(st[k].reshape(-1)[s0 : s0 + piece.length].detach().cpu().clone())
                elif "step" not in st and k != "max_exp_avg_sq":  # never stepped: zero moments
                    rec.setdefault(k, []).append(torch.zeros(piece.length))
    parts = [local]
    if gather and binding.stage != 0:  # without ZeRO every rank holds the whole state already
        import deepspeed.comm as dist

        if dist.is_initialized() and dist.get_world_size(group=binding.dp_group) > 1:
            parts = [None] * dist.get_world_size(group=binding.dp_group)
            dist.all_gather_object(parts, local, group=binding.dp_group)
    merged: dict = {}
    for part in parts:
        for name, rec in part.items():
            out = merged.setdefault(name, {"shape": rec["shape"], "index": [], "step": 0.0})
            out["step"] = max(out["step"], rec["step"])
            out["index"].extend(rec["index"])
            for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if k in rec:
                    out.setdefault(k, []).extend(rec[k])
    for rec in merged.values():
        idx = torch.cat(rec["index"]) if rec["index"] else torch.empty(0, dtype=torch.int64)
        order = torch.argsort(idx)
        rec["index"] = idx[order]
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if k in rec:
                rec[k] = torch.cat(rec[k])[order]
    return merged


def import_state(opt, exported: dict) -> None:
    """Load an ``export_state()`` result into a bound optimizer (any world size); elements absent from the export
    (newly selected rows) start from zero moments."""
    binding = opt._binding
    if binding is None:
        raise RuntimeError("import_state needs bind(engine) first")
    for flat in binding.flat_params:
        layout = opt._layouts[flat]
        group = opt._group_of(flat) if any(flat is q for q in opt._all_params()) else None
        amsgrad = bool(group["amsgrad"]) if group is not None else any("max_exp_avg_sq" in r for r in exported.values())
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        out = {k: torch.zeros(layout.n_compact, dtype=torch.float32) for k in keys}
        step = 0.0
        pos = 0
        for piece in binding.pieces[flat]:
            rec = exported.get(piece.name)
            if rec is not None and rec["index"].numel():
                want = torch.arange(piece.param_start, piece.param_start + piece.length)
                at = torch.searchsorted(rec["index"], want).clamp_(max=rec["index"].numel() - 1)
                found = rec["index"][at] == want
                for k in keys:
                    if k in rec:
                        out[k][pos : pos + piece.length][found] = rec[k][at[found]].float()
                step = max(step, float(rec["step"]))
            pos += piece.length
        st = {"step": torch.tensor(step, dtype=torch.float32)}
        for k in keys:
            st[k] = out[k].to(flat.device).reshape(layout.state_shape)
        opt.state[flat] = st
