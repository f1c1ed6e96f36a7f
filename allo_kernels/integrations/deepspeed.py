"""DeepSpeed: the only module of allo_kernels that knows DeepSpeed's internals (deepspeed is imported lazily).

What it does (facts verified on deepspeed 0.19.8, see the project's notes on ZeRO):

**SparseAdamW under ZeRO** (:func:`bind`, called by ``SparseAdamW.bind(engine)``). Usage::

    groups, masks = zero_param_groups(model.parameters(), masks)      # drops all-false / frozen-only entries
    opt = SparseAdamW(groups, lr=..., masks=masks)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)   # cfg: sparse_adamw_config(...)
    opt.bind(engine)                                                   # before the first step

  or all of it in one call: ``engine, opt = initialize(model, config=cfg, masks={name: mask}, lr=...)``.

* ZeRO-1/2: the inner optimizer steps ``single_partition_of_fp32_groups[i]``, one 1-D fp32 partition per group. A
  param sits at ``round_robin_bit16_offsets[i]`` of the group's (round-robin reordered) flat buffer; this rank owns
  ``[rank * partition_size[i], (rank + 1) * partition_size[i])``. Row r of an [R, C] weight is ``[r*C, (r+1)*C)``.
  (Not ``_hp_mapping``: it is built from the list before the round-robin reordering.)
* ZeRO-3: sub-group i steps ``fp32_partitioned_groups_flat[i]``; ``grad_position[ds_id] = [i, offset, P]``; this rank
  owns param elements ``[rank*P, (rank+1)*P)`` (the last rank carries padding) at ``offset`` of the sub-group.
* Stage 0: the optimizer steps the model params themselves; nothing to map.
  Each flat partition gets a compact layout (``SparseAdamW.set_layout``): its selected row segments (clipped at
  partition edges) plus every element of unmasked params. Alignment padding belongs to no param and is never touched.
* Grad hooks ``masked_fill`` the grads of unselected rows/elements with 0 (not multiply: inf * 0 is NaN), so
  DeepSpeed's gradient clipping and overflow checks see exactly the masked reference's gradients.
* Offload: ``"zero_force_ds_cpu_optimizer": false``; the partitions and grads live on CPU and the native kernel runs.
* Checkpoints: ``engine.save_checkpoint`` / ``load_checkpoint`` at the same world size round-trip the compact state
  through ``state_dict``. :func:`export_state` / :func:`import_state` move it by parameter name across world sizes.
  ``elastic_checkpoint`` must stay off (DeepSpeed would slice our compact tensors as if they were flat partitions).

**The ZeRO-3 gather of the fused-linear ops** (:class:`ZeRO3Gather`, the ops' default gather context): a ZeRO-3
parameter's local tensor is empty (``ds_status`` NOT_AVAILABLE, real shape ``ds_shape``) until ``all_gather()``;
the lm_head weight is gathered for the forward and again for the backward and partitioned afterwards.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from .._validate import describe
from ..optim._layout import make_layout, runs_of
from ..optim.sparse_adamw import SparseAdamW, check_mask
from .gather import ParamGather

# DeepSpeed config keys SparseAdamW needs: ZeRO must accept a client optimizer, and let it run the offloaded step.
SPARSE_ADAMW_CONFIG = {"zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}


# --------------------------------------------------------------------------------------------------- process group
def skip_shm_comm_build() -> None:
    """Keep ``deepspeed.init_distributed`` from JIT-building DeepSpeed's CPU shared-memory comm op; call it first.

    Every process of a CPU (gloo) job builds ``deepspeed_shm_comm`` in ``init_distributed`` (about a minute of C++
    on a 2-core machine), and the op serves only ``inference_all_reduce``, which training never calls. The build
    holds a lock file in torch's extensions folder: a process killed while building leaves it behind, and from then
    on every CPU job waits on it forever. ``deepspeed.ops.__compatible_ops__`` is a module-level dict that DeepSpeed
    keeps for the process, so marking the op incompatible there makes ``init_distributed`` skip it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# --------------------------------------------------------------------------------------------------- param groups
def _trainable(p: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether ``p`` stays in the optimizer; a mask that selects nothing freezes its param (it would never change,
    and ZeRO then keeps no fp32 master, gradient or state for it)."""
    if mask is not None and not bool(mask.any()):
        p.requires_grad_(False)
    return p.requires_grad


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
        keep = [p for p in plist if _trainable(p, masks.get(p))]
        if keep:
            group["params"] = keep
            out.append(group)
    kept = {p for g in out for p in g["params"]}
    return out, {p: m for p, m in masks.items() if p in kept}


def select_parameters(
    model: torch.nn.Module, masks: Mapping[str, torch.Tensor] | None
) -> tuple[list[torch.nn.Parameter], dict[torch.nn.Parameter, torch.Tensor]]:
    """The parameters to train and their masks, from masks by parameter name.

    ``masks``: ``{name in model.named_parameters(): bool mask}`` (rows ``[out]`` or elements), or None to train every
    trainable parameter densely. With masks, only the named parameters train: one without a mask, or whose mask
    selects nothing, is frozen (``requires_grad_(False)``); an all-True mask trains its parameter densely. A name the
    model does not have, or a mask of the wrong type or shape, is an error before any mask is read. Masks are moved
    to their parameter's device. Returns ``(params, {param: mask})`` for ``SparseAdamW(params, masks=...)``.
    """
    named = list(model.named_parameters(remove_duplicate=False))
    if masks is not None:
        known = {n for n, _ in named}
        unknown = sorted(set(masks) - known)
        if unknown:
            raise ValueError(f"masks name parameters the model does not have: {unknown[:5]}")
    names_of: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in named:  # tied weights: one parameter, several names
        names_of.setdefault(id(p), []).append(name)
        params.setdefault(id(p), p)
    chosen, param_masks = [], {}
    for key, p in params.items():
        if not p.requires_grad:
            continue
        mask = None
        if masks is not None:
            mask = next((masks[n] for n in names_of[key] if n in masks), None)
            if mask is None:
                p.requires_grad_(False)
                continue
            check_mask(p, mask)
            mask = mask.to(p.device)
        if not _trainable(p, mask):
            continue
        chosen.append(p)
        if mask is not None and not bool(mask.all()):
            param_masks[p] = mask
    return chosen, param_masks


def sparse_adamw_config(config: dict) -> dict:
    """A copy of a DeepSpeed config with the keys SparseAdamW needs (``SPARSE_ADAMW_CONFIG``)."""
    return {**config, **SPARSE_ADAMW_CONFIG}


def initialize(
    model: torch.nn.Module,
    *,
    config: dict,
    masks: Mapping[str, torch.Tensor] | None = None,
    lr_scheduler: Callable | None = None,
    **adamw: object,
) -> tuple[object, SparseAdamW]:
    """``deepspeed.initialize`` with SparseAdamW over the parameters ``masks`` select, bound to the engine.

    ``masks`` as in :func:`select_parameters` (None: every trainable parameter, densely); ``adamw``: SparseAdamW's
    options (``lr``, ``weight_decay``, ``betas``, ...); ``lr_scheduler``: what ``deepspeed.initialize`` accepts (e.g.
    ``lambda opt: LambdaLR(opt, fn)``). The config gets ``SPARSE_ADAMW_CONFIG``. Returns ``(engine, optimizer)``."""
    import deepspeed

    params, param_masks = select_parameters(model, masks)
    if not params:
        raise ValueError("the masks select no parameter at all: nothing to train")
    optimizer = SparseAdamW(params, masks=param_masks or None, **adamw)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=sparse_adamw_config(config), lr_scheduler=lr_scheduler
    )
    bind(optimizer, engine)
    return engine, optimizer


# ---------------------------------------------------------------------------------------------------------- bind
@dataclass
class Piece:
    name: str  # parameter name in engine.module
    param_start: int  # first element of the (full, flattened) parameter covered
    length: int


@dataclass
class Binding:
    """How a bound SparseAdamW's stepped tensors map onto the model's parameters (see :func:`bind`)."""

    stage: int
    flat_params: list = field(default_factory=list)  # the tensors the inner optimizer steps
    pieces: dict = field(default_factory=dict)  # flat param -> [Piece per layout segment]
    hooks: list = field(default_factory=list)
    shapes: dict = field(default_factory=dict)  # name -> full shape
    dp_group: object = None


_bindings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its Binding


def binding_of(opt: SparseAdamW) -> Binding:
    """The binding :func:`bind` made for ``opt``; RuntimeError when it was never bound."""
    binding = _bindings.get(opt)
    if binding is None:
        raise RuntimeError("SparseAdamW.export_state/import_state needs bind(engine) first")
    return binding


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


def _build(opt: SparseAdamW, flat: torch.Tensor, entries: list, binding: Binding) -> None:
    """entries: (name, param, mask, shape, numel, lo, hi, flat_base): param elements [lo, hi) sit at flat_base + x."""
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
    opt.set_layout(flat, layout, holds=[piece.name for piece in pieces])
    binding.flat_params.append(flat)
    binding.pieces[flat] = pieces


def _hook(mask: torch.Tensor, shape: tuple):
    keep = mask if tuple(mask.shape) == tuple(shape) else mask.reshape((-1,) + (1,) * (len(shape) - 1))
    drop = ~keep

    def fn(grad):
        return grad.masked_fill(drop, 0)

    return fn


def _stepped_tensors(opt: SparseAdamW) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def bind(opt: SparseAdamW, engine) -> Binding:
    """Map ``opt``'s masks onto the tensors the DeepSpeed ``engine`` steps (call after ``deepspeed.initialize``,
    before the first step). Returns the binding (also kept for :func:`export_state` / :func:`import_state`)."""
    import deepspeed.comm as dist

    stage = int(engine.zero_optimization_stage())
    names = {id(p): n for n, p in engine.module.named_parameters()}
    masks = dict(opt.masks)
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
        stepped = _stepped_tensors(opt)
        if any(id(p) not in names for p in stepped):
            raise NotImplementedError("SparseAdamW.bind: stage 0 optimizer steps tensors that are not model params")
        for p in stepped:  # the model params are the stepped tensors: record pieces for export/import
            layout = opt.layout(p)
            opt.set_layout(p, layout, holds=[names[id(p)]])
            binding.flat_params.append(p)
            binding.pieces[p] = [
                Piece(names[id(p)], s, n) for s, n in zip(layout.seg_param.tolist(), layout.seg_len.tolist())
            ]
        _bindings[opt] = binding
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
    _bindings[opt] = binding
    return binding


# ------------------------------------------------------------------------------------------- export / import
def export_state(opt: SparseAdamW, *, gather: bool = True) -> dict:
    """Compact state by parameter name, independent of the world size.

    Returns ``{name: {"shape", "index" (int64 param elements), "exp_avg", "exp_avg_sq"[, "max_exp_avg_sq"], "step"}}``
    with every rank's pieces merged when ``gather`` (an all_gather over the data-parallel group)."""
    binding = binding_of(opt)
    local: dict = {}
    for flat in binding.flat_params:
        st = opt.state.get(flat, {})
        layout = opt.layout(flat)
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


def import_state(opt: SparseAdamW, exported: dict) -> None:
    """Load an ``export_state()`` result into a bound optimizer (any world size); elements absent from the export
    (newly selected rows) start from zero moments."""
    binding = binding_of(opt)
    for flat in binding.flat_params:
        layout = opt.layout(flat)
        group = next((g for g in opt.param_groups if any(flat is q for q in g["params"])), None)
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


# ----------------------------------------------------------------------------------------------- ZeRO-3 gather
def is_zero3_partitioned(p: torch.Tensor | None) -> bool:
    """Whether ``p`` is a ZeRO-3 parameter whose full value is not present on this rank right now."""
    status = getattr(p, "ds_status", None)
    return status is not None and getattr(status, "name", str(status)) == "NOT_AVAILABLE"


class ZeRO3Gather(ParamGather):
    """The gather context for DeepSpeed ZeRO-3 partitions (through the ``all_gather`` / ``partition`` methods
    DeepSpeed attaches to its parameters); any other tensor is used as it is."""

    def full_shape(self, p: torch.Tensor) -> tuple[int, ...]:
        return tuple(getattr(p, "ds_shape", p.shape)) if is_zero3_partitioned(p) else tuple(p.shape)

    @contextlib.contextmanager
    def gathered(self, *params: torch.Tensor | None) -> Iterator[None]:
        todo = [p for p in params if is_zero3_partitioned(p)]
        for p in todo:
            p.all_gather()
        try:
            yield
        finally:
            for p in todo:
                p.partition()

    def gather_for_backward(self, *params: torch.Tensor | None) -> Callable[[], None]:
        """Gather ZeRO-3 partitions for the backward. A parameter that gets a gradient is released only after
        autograd accumulated it: autograd checks the gradient against the full shape, and DeepSpeed's reduce hook
        (registered at initialize, so it runs first) reads it there; our own post-hook on the same AccumulateGrad
        node then partitions the parameter again. Frozen ones are released by the returned call."""
        release_now = []
        for p in params:
            if not is_zero3_partitioned(p):
                continue
            p.all_gather()
            if not p.requires_grad:
                release_now.append(p)
                continue
            if getattr(p, "_allo_grad_acc", None) is None:
                with torch.enable_grad():  # backward runs with grad mode off; the node lookup needs a graph
                    acc = p.expand_as(p).grad_fn.next_functions[0][0]

                def release(*_unused, p=p):
                    if getattr(p, "_allo_release_pending", False):
                        p._allo_release_pending = False
                        p.partition()

                acc.register_hook(release)
                p._allo_grad_acc = acc  # keep the node (and its hook) alive, as DeepSpeed does for its own hooks
            p._allo_release_pending = True

        def release_frozen() -> None:
            for p in release_now:
                p.partition()

        return release_frozen
