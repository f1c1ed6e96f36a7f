"""SparseAdamW: AdamW on selected rows (neurons) or elements of weights, with Adam state for selected rows only.

Semantics (the contract of docs/design.md):

* ``masks={param: bool tensor}`` (or a param-group key ``"mask"``). A 1-D mask of length ``p.shape[0]`` selects rows,
  a mask of ``p.shape`` selects elements. Params without a mask are updated densely, like ``torch.optim.AdamW``.
* Selected entries receive exactly ``torch.optim.AdamW``'s update (decoupled weight decay, bias correction,
  ``amsgrad``, ``maximize``; ``lr`` & co are read from ``param_groups`` at every step, so LR schedulers work).
  Unselected entries are never written: bit-identical, no weight decay.
* State (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, fp32) exists only for selected rows: shape ``[k, C]`` for a
  ``[R, C...]`` weight with ``k`` selected rows (element masks: rows holding at least one selected element; the
  unselected elements of those rows are neither updated nor their state touched). ``step`` is a per-tensor counter as
  in torch. With ``master_weights=True`` bf16/fp16 params also get fp32 master rows (``state["master"]``).
* Masks are copied when given (constructor, param-group key, ``set_mask``): editing the caller's tensor afterwards
  changes nothing; ``mask_of(p)`` returns a copy too. ``set_mask(p, mask)`` changes a mask; the state of rows that
  stay selected is carried over, new rows start from zero moments (with the tensor's step count).
* ``state_dict()`` adds, per parameter with state, its compact layout (``"allo_layouts"``: the selected element
  segments, element mask, parameter shape), so every saved state row is tied to its parameter row.
  ``load_state_dict()`` checks each saved layout against the parameter it loads into (a different shape or element
  count, a malformed layout, or compact state without a layout is a ValueError naming the parameter, and nothing is
  loaded) and restores fp32 state exactly. When the current mask selects other rows than the saved one, the state is
  remapped by row index, as ``set_mask`` does (rows in both keep their moments, newly selected rows start from zero,
  rows no longer selected are dropped), with one warning giving the counts. Dense ``torch.optim.AdamW`` state loads
  too. State dicts written before the parameter shape was stored load as before (checked by element count only).

Backends: Triton for CUDA tensors (one launch per dtype group over a table of row segments), the native C++ library
for CPU tensors (vectorised, OpenMP), the torch reference elsewhere. ``backend=`` or ``ALLO_KERNELS_BACKEND`` overrides.
Under DeepSpeed ZeRO call ``opt.bind(engine)`` after ``deepspeed.initialize``: it runs
``allo_kernels.integrations.deepspeed.bind``, the one module that knows DeepSpeed.

The surface a framework adapter uses (and nothing private): ``masks`` (read-only {param: mask}), ``layout(t)`` (the
compact layout a stepped tensor is updated under) and ``set_layout(t, layout, holds=...)`` (step a tensor the framework
hands the optimizer instead of the model's parameters, e.g. a ZeRO flat fp32 partition, under a layout the adapter
mapped from the masks). Once an adapter has set layouts, masks are fixed (``set_mask`` raises).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch

from .._backend import BACKENDS, select_backend
from .._validate import check_choice, check_positive, describe
from . import _native
from ._layout import Layout, dense_layout, mask_layout, migrate_tensor
from ._reference import StepScalars, reference_step

LOW_PRECISION = (torch.bfloat16, torch.float16)
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master")
_warned_no_native = False


def _warn_no_native() -> None:
    global _warned_no_native
    if not _warned_no_native:
        _warned_no_native = True
        warnings.warn(
            "allo_kernels: the native CPU library for SparseAdamW is not available "
            f"({_native.load_error()}); using the slower torch fallback. Reinstall allo with CMake and a C++ compiler "
            "present (pip install -e .), or point ALLO_NATIVE_LIB at a built _native*.so.",
            RuntimeWarning,
            stacklevel=3,
        )


class SparseAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        masks: dict | None = None,
        master_weights: bool = False,
        backend: str | None = None,
    ):
        check_positive("lr", float(lr), allow_zero=True)
        check_positive("eps", eps, allow_zero=True)
        check_positive("weight_decay", weight_decay, allow_zero=True)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)):
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        if backend is not None:
            check_choice("backend", backend, BACKENDS)
        self._backend = backend
        self._masks: dict[torch.Tensor, torch.Tensor] = {}
        self._layouts: dict[torch.Tensor, Layout] = {}
        self._holds: dict[torch.Tensor, tuple[str, ...]] = {}  # set_layout's names, for error messages
        self._layouts_fixed = False  # an adapter set layouts: masks can no longer change
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            master_weights=master_weights,
        )
        super().__init__(params, defaults)
        if masks is not None:
            if not isinstance(masks, dict):
                raise TypeError(f"masks must be a dict {{param: bool tensor}}, got {describe(masks)}")
            for p, m in masks.items():
                self.set_mask(p, m)

    # ------------------------------------------------------------------------------------------------ masks
    def add_param_group(self, param_group: dict) -> None:
        group_mask = param_group.pop("mask", None) if isinstance(param_group, dict) else None
        super().add_param_group(param_group)
        if group_mask is None:
            return
        params = self.param_groups[-1]["params"]
        if isinstance(group_mask, torch.Tensor):
            if len(params) != 1:
                raise ValueError(
                    f"param group key 'mask' is one tensor but the group has {len(params)} params; "
                    "give a list with one mask (or None) per param, or a dict {param: mask}"
                )
            pairs = [(params[0], group_mask)]
        elif isinstance(group_mask, dict):
            pairs = list(group_mask.items())
        elif isinstance(group_mask, (list, tuple)):
            if len(group_mask) != len(params):
                raise ValueError(f"param group key 'mask' has {len(group_mask)} entries for {len(params)} params")
            pairs = list(zip(params, group_mask))
        else:
            raise TypeError(
                f"param group key 'mask' must be a tensor, a list of tensors or a dict, got {describe(group_mask)}"
            )
        for p, m in pairs:
            if m is not None:
                self.set_mask(p, m)

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _check_mask(self, p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        check_mask(p, mask)
        if mask.device != p.device:
            raise ValueError(
                f"mask for param of shape {tuple(p.shape)} is on {mask.device} but the param is on "
                f"{p.device}; move the mask to the param's device once, up front"
            )
        # a private copy: the caller may reuse or edit its tensor, and what trains must not change with it
        return mask.detach().clone(memory_format=torch.contiguous_format)

    def set_mask(self, param: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Set (or with ``None`` remove) the mask of ``param``, migrating its state to the new selection."""
        if not any(param is q for q in self._all_params()):
            raise ValueError(f"mask given for a param that is not in this optimizer: {describe(param)}")
        if self._layouts_fixed:
            raise RuntimeError("set_mask after bind(engine) is not supported; set masks before deepspeed.initialize")
        if mask is None:
            self._masks.pop(param, None)
        else:
            self._masks[param] = self._check_mask(param, mask)
        old = self._layouts.pop(param, None)
        if old is not None and any(k in self.state.get(param, {}) for k in STATE_KEYS):
            new = self._layout(param)
            self._migrate_state(param, old, new)

    def mask_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """A copy of ``param``'s mask (None: dense); change masks with ``set_mask``."""
        mask = self._masks.get(param)
        return None if mask is None else mask.clone()

    @property
    def masks(self) -> Mapping[torch.Tensor, torch.Tensor]:
        """Read-only view ``{param: mask}`` of every mask set (params without one are dense). For adapters that map
        masks onto a framework's tensors; the tensors are the optimizer's own copies: read them, do not edit them."""
        return MappingProxyType(self._masks)

    # ----------------------------------------------------------------------------------------------- layouts
    def set_layout(self, tensor: torch.Tensor, layout: Layout, *, holds: Sequence[str] = ()) -> None:
        """For framework adapters: step ``tensor`` (a tensor of the param groups, e.g. a ZeRO flat fp32 partition
        that stands for slices of many model parameters) under ``layout`` instead of the layout of its own mask.
        ``holds`` names the model parameters it holds, for error messages. Must come before the tensor's first step;
        afterwards the optimizer's masks are fixed (``set_mask`` raises)."""
        if layout.numel != tensor.numel():
            raise ValueError(f"layout for {layout.numel} elements given for a tensor of {tensor.numel()}")
        state = self.state.get(tensor, {})
        if "exp_avg" in state and tuple(state["exp_avg"].shape) != tuple(layout.state_shape):
            raise RuntimeError("SparseAdamW.bind(engine) must run before the first optimizer step")
        self._layouts[tensor] = layout
        self._holds[tensor] = tuple(dict.fromkeys(holds))
        self._layouts_fixed = True

    def layout(self, p: torch.Tensor) -> Layout:
        """The compact layout ``p`` is stepped under: which of its elements are updated and where their state is."""
        return self._layout(p)

    def _layout(self, p: torch.Tensor) -> Layout:
        layout = self._layouts.get(p)
        if layout is None:
            mask = self._masks.get(p)
            if mask is None:
                layout = dense_layout(p)
            else:
                if not p.is_contiguous():
                    raise ValueError(f"a masked param must be contiguous, got a strided {describe(p)}")
                layout = mask_layout(p, mask)
            self._layouts[p] = layout
        return layout

    def _group_of(self, p: torch.Tensor) -> dict:
        for g in self.param_groups:
            if any(p is q for q in g["params"]):
                return g
        raise KeyError("param not in optimizer")

    def _wants_master(self, p: torch.Tensor, group: dict) -> bool:
        return bool(group.get("master_weights", False)) and p.dtype in LOW_PRECISION

    def _gather(self, p: torch.Tensor, layout: Layout) -> torch.Tensor:
        if layout.dense:
            return p.detach().float().clone().reshape(layout.state_shape)
        return p.detach().reshape(-1).index_select(0, layout.flat_index()).float().reshape(layout.state_shape)

    def _init_state(self, p: torch.Tensor, layout: Layout, group: dict) -> dict:
        state = self.state[p]
        if "exp_avg" not in state:
            z = lambda: torch.zeros(layout.state_shape, dtype=torch.float32, device=p.device)  # noqa: E731
            state.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
            state["exp_avg"] = z()
            state["exp_avg_sq"] = z()
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = z()
            if self._wants_master(p, group):
                state["master"] = self._gather(p, layout)
        return state

    def _migrate_state(self, p: torch.Tensor, old: Layout, new: Layout, tensors: dict | None = None) -> None:
        old_state = self.state[p]
        src = tensors if tensors is not None else {k: old_state[k] for k in STATE_KEYS if k in old_state}
        # a fresh dict: a state_dict() taken earlier still refers to the old one and must keep describing it
        state = {k: v for k, v in old_state.items() if k not in STATE_KEYS}
        self.state[p] = state
        for k, t in src.items():
            if k == "master":
                state[k] = migrate_tensor(t.float(), old, new, fill=self._gather(p, new))
            else:
                state[k] = migrate_tensor(t.float(), old, new)
        self._fill_missing(p, new)

    def _fill_missing(self, p: torch.Tensor, layout: Layout) -> None:
        """Add the state tensors the group's options need but a loaded/migrated state lacks (amsgrad, master)."""
        state = self.state[p]
        group = self._group_of(p)
        if group["amsgrad"] and "max_exp_avg_sq" not in state and "exp_avg" in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        if self._wants_master(p, group) and "master" not in state and "exp_avg" in state:
            state["master"] = self._gather(p, layout)

    def state_rows(self, param: torch.Tensor) -> int:
        """Number of rows (first state dimension) that hold Adam state for ``param``."""
        st = self.state.get(param, {})
        return int(st["exp_avg"].shape[0]) if "exp_avg" in st and st["exp_avg"].dim() else 0

    # ------------------------------------------------------------------------------------------------- step
    def _backend_for(self, device: torch.device) -> str:
        if self._backend is not None:
            backend = self._backend
            if backend == "triton":
                select_backend(device)  # raises if the interpreter is needed but off
        else:
            backend = select_backend(device, has_native=_native.available())
            if device.type == "cpu" and backend == "torch" and not _native.available():
                import os

                if os.environ.get("ALLO_KERNELS_BACKEND", "").strip().lower() not in ("torch",):
                    _warn_no_native()
        if backend == "native" and (device.type != "cpu" or not _native.available()):
            if device.type == "cpu":
                _warn_no_native()
            backend = "torch"
        return backend

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        triton_work: list = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "SparseAdamW does not support sparse gradients (torch.sparse); masks select rows"
                    )
                layout = self._layout(p)
                state = self._init_state(p, layout, group)
                state["step"] += 1
                if layout.n_compact == 0:
                    continue
                sc = StepScalars(
                    lr=float(group["lr"]),
                    beta1=float(beta1),
                    beta2=float(beta2),
                    eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]),
                    step=float(state["step"].item()),
                    amsgrad=bool(group["amsgrad"]),
                    maximize=bool(group["maximize"]),
                )
                args = (
                    p,
                    p.grad,
                    layout,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    state.get("max_exp_avg_sq"),
                    state.get("master"),
                    sc,
                )
                backend = self._backend_for(p.device)
                if backend == "triton" and p.is_contiguous() and p.grad.is_contiguous():
                    triton_work.append(args)
                elif backend == "native" and p.is_contiguous() and p.grad.is_contiguous() and _native.step(*args):
                    pass
                else:
                    reference_step(*args)
        if triton_work:
            from ._triton_adamw import triton_step

            triton_step(triton_work)
        return loss

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        index = {id(p): i for i, p in enumerate(self._all_params())}
        sd["allo_layouts"] = {
            index[id(p)]: {**layout.to_dict(), "param_shape": tuple(p.shape)}
            for p, layout in self._layouts.items()
            if id(p) in index and "exp_avg" in self.state.get(p, {})
        }
        return sd

    def _param_label(self, idx: int, p: torch.Tensor) -> str:
        """How errors name a param: its index and shape, plus the model params a bound flat ZeRO partition holds."""
        label = f"param {idx} (shape {tuple(p.shape)})"
        names = self._holds.get(p, ())
        if names:
            label += f" holding {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
        return label

    def _saved_layout(self, idx: int, p: torch.Tensor, saved: dict | None, tensors: dict) -> Layout:
        """The layout the saved state ``tensors`` of ``p`` were written under, checked against ``p``."""
        label = self._param_label(idx, p)
        sizes = {k: int(t.numel()) for k, t in tensors.items()}
        if saved is None:
            if all(n == p.numel() for n in sizes.values()):
                return dense_layout(p)  # a dense (e.g. torch.optim.AdamW) state
            raise ValueError(
                f"optimizer state of {label} holds {sizes} elements but the state dict has no layout for it "
                f"('allo_layouts' is missing or lacks index {idx}), so nothing says which rows of the parameter "
                "those state rows belong to; load a state dict written by SparseAdamW.state_dict()"
            )
        if not isinstance(saved, dict):
            raise ValueError(f"saved layout of {label} must be a dict, as state_dict() writes, got {describe(saved)}")
        layout = Layout.from_dict(saved, p.device, what=f"saved layout of {label}")
        shape = saved.get("param_shape")  # absent in state dicts written before it was stored: numel still checked
        if (shape is not None and tuple(shape) != tuple(p.shape)) or layout.numel != p.numel():
            was = f"shape {tuple(shape)}" if shape is not None else f"{layout.numel} elements"
            raise ValueError(
                f"optimizer state of {label} was saved for a parameter of {was}; the state dict belongs to another "
                "model or parameter order (or, under ZeRO, another world size: use export_state()/import_state())"
            )
        bad = {k: n for k, n in sizes.items() if n != layout.n_compact}
        if bad:
            raise ValueError(
                f"optimizer state of {label} has {bad} elements but its saved layout selects {layout.n_compact}"
            )
        return layout

    def load_state_dict(self, state_dict: dict) -> None:
        # torch's load_state_dict casts floating state to the param's dtype: keep our fp32 tensors out of its reach.
        sd = dict(state_dict)
        layouts = sd.pop("allo_layouts", {})
        saved_state = sd.get("state", {})
        params = self._all_params()
        # Check every saved layout first: a refused state dict leaves this optimizer exactly as it was.
        plans = []
        for key, st in saved_state.items():
            tensors = {k: v for k, v in st.items() if k in STATE_KEYS}
            idx = int(key)
            if not tensors or not 0 <= idx < len(params):  # an index torch's own check below refuses
                continue
            described = layouts.get(key)
            saved = self._saved_layout(idx, params[idx], described, tensors)
            plans.append((idx, params[idx], saved, tensors, described is not None))
        sd["state"] = {k: {kk: vv for kk, vv in st.items() if kk not in STATE_KEYS} for k, st in saved_state.items()}
        super().load_state_dict(sd)
        for st in self.state.values():  # torch keeps the caller's step tensors: do not step them in place
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()
        for idx, p, saved, tensors, described in plans:
            current = self._layout(p)
            if saved.same_as(current):
                for k, t in tensors.items():
                    self.state[p][k] = t.to(device=p.device, dtype=torch.float32).reshape(current.state_shape).clone()
                self._fill_missing(p, current)
            else:
                if described:  # not for a dense AdamW state: taking its selected rows is the expected use
                    self._warn_remap(idx, p, saved, current)
                self._migrate_state(p, saved, current, tensors=tensors)

    def _warn_remap(self, idx: int, p: torch.Tensor, saved: Layout, current: Layout) -> None:
        old, new = saved.flat_index(), current.flat_index()
        kept = int(torch.isin(new, old.to(new.device)).sum()) if old.numel() and new.numel() else 0
        # count rows when both are row layouts of the same width, elements otherwise
        width = current.state_shape[1] if len(current.state_shape) == 2 else 0
        if width and len(saved.state_shape) == 2 and saved.state_shape[1] == width:
            unit, kept, n_old, n_new = "rows", kept // width, old.numel() // width, new.numel() // width
        else:
            unit, n_old, n_new = "elements", old.numel(), new.numel()
        warnings.warn(
            f"SparseAdamW.load_state_dict: the state of {self._param_label(idx, p)} was saved under another mask; "
            f"remapped by index: {kept} of the {n_old} saved {unit} kept their moments, {n_new - kept} newly "
            f"selected {unit} start from zero, {n_old - kept} saved {unit} no longer selected were dropped",
            UserWarning,
            stacklevel=3,
        )

    # -------------------------------------------------------------------------------------------- DeepSpeed
    # Shortcuts to allo_kernels.integrations.deepspeed (imported when called: that module imports this one).
    def bind(self, engine) -> SparseAdamW:
        """Map the masks onto the flat fp32 partitions of a DeepSpeed engine (call after deepspeed.initialize)."""
        from ..integrations import deepspeed

        deepspeed.bind(self, engine)
        return self

    def export_state(self) -> dict:
        """World-size independent compact state by parameter name (needs bind(engine)); see
        ``allo_kernels.integrations.deepspeed.export_state``."""
        from ..integrations import deepspeed

        return deepspeed.export_state(self)

    def import_state(self, exported: dict) -> None:
        """Load an ``export_state()`` result (any world size) into a bound optimizer."""
        from ..integrations import deepspeed

        deepspeed.import_state(self, exported)


def check_mask(p: torch.Tensor, mask: object) -> None:
    """A mask for ``p`` is a bool tensor of ``p``'s shape (elements) or ``(p.shape[0],)`` (rows): TypeError /
    ValueError otherwise, before anything reads its values."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask for param of shape {tuple(p.shape)} must be a bool tensor, got {describe(mask)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask for param of shape {tuple(p.shape)} must have dtype torch.bool, got {describe(mask)}")
    n_rows = p.shape[0] if p.dim() >= 1 else None
    if tuple(mask.shape) != tuple(p.shape) and not (mask.dim() == 1 and n_rows is not None and mask.shape[0] == n_rows):
        raise ValueError(
            f"mask for param of shape {tuple(p.shape)} must have shape ({n_rows},) (rows) or "
            f"{tuple(p.shape)} (elements), got {describe(mask)}"
        )


def named_masks(model: torch.nn.Module, masks_by_name: dict[str, torch.Tensor]) -> dict:
    """{param: mask} from {parameter name: mask}; unknown names are an error."""
    params = dict(model.named_parameters())
    unknown = sorted(set(masks_by_name) - set(params))
    if unknown:
        raise ValueError(f"masks name parameters the model does not have: {unknown[:5]}")
    return {params[n]: m for n, m in masks_by_name.items()}
