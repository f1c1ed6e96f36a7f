"""Compact neuron deltas for ``nn.Linear`` layers: train only the selected rows (or columns), merge at save.

    model.requires_grad_(False)                              # train nothing but the deltas
    deltas = ak.attach_row_deltas(model, masks)              # {weight name: delta [k, in_features]}
    opt = torch.optim.AdamW(deltas.values(), lr=1e-5)        # any optimizer; under DeepSpeed any ZeRO stage
    ... train ...
    ak.save_row_deltas(model, "deltas.safetensors")          # the deltas alone: selected rows + values
    ak.merge_row_deltas(model)                               # W[R] = round(W[R] + D): a plain model again
    model.save_pretrained(out)

What attach does to a named weight W [out, in] with k selected rows R: W is frozen (``requires_grad=False``) and
its ``nn.Linear`` becomes a ``RowDeltaLinear`` (same object, same place, ``weight``/``bias`` keep their names) with a
trainable ``weight_delta`` [k, in] (zeros) and a buffer ``weight_delta_index`` [k] (the rows R). The layer computes
y = x W^T + b with y[..., R] += x D^T, without ever computing a gradient for W (see ``ops/row_delta.py``).
``axis=1`` selects columns instead (input neurons, e.g. an MLP's down projection): D is [out, k].

Properties users rely on:

* Unselected weights cannot change: W is never written until ``merge_row_deltas``, which writes only the rows R.
* State-dict names while attached: every original name, plus ``<module>.weight_delta`` and
  ``<module>.weight_delta_index``. A checkpoint of the attached model therefore holds the deltas and their rows, and
  restores exactly into a model attached with the same masks.
* dtype: the delta is fp32 by default, whatever W's dtype: it is then its own master copy (updates far below a bf16
  ulp of W accumulate), and the layer computes with round(W[R] + D) in W's dtype, exactly what the merge writes.
  This costs 4 bytes per selected element, against 2 for a bf16 delta plus 4 for an fp32 master copy. Pass
  ``dtype=torch.bfloat16`` for a bf16 delta (mixed-precision frameworks such as DeepSpeed's bf16 mode cast the model,
  deltas included, to bf16 and keep their own fp32 master copy anyway). ``model.to(dtype)`` casts deltas like any
  parameter; ``model.to(device)`` moves them with their rows.
* Weight decay: AdamW's decoupled decay shrinks D, i.e. it pulls the merged W[R] + D toward the *base* weights, not
  toward zero (as with LoRA). SparseAdamW's masked path decays W[R] itself toward zero. With weight decay 0 (ALLO's
  published settings) both give the same model; with decay they differ by lr * wd * W[R] per step.
* Tied weights (one tensor used by several modules) cannot get a delta: the delta would apply to one module only.
* A mask selecting no rows freezes the weight and adds no delta. A weight named again before a merge is an error.
* Element masks cannot be made compact this way: they stay on ``ak.SparseAdamW``.

safetensors is imported only by ``save_row_deltas`` / ``load_row_deltas`` (it is not a dependency of allo_kernels,
which needs only torch and triton); without it they raise an ImportError that names the package.
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ._validate import describe
from .ops.row_delta import AXES, RowDeltaLinear

FILE_FORMAT = "allo_row_deltas"
FILE_VERSION = "1"
DELTA_SUFFIX = ".weight_delta"
INDEX_SUFFIX = ".weight_delta_index"
# Set on an nn.Linear whose mask selected nothing: the weight was frozen, merge restores its requires_grad.
FROZEN_ONLY_ATTR = "allo_row_delta_frozen_weight_requires_grad"


# ------------------------------------------------------------------------------------------------------ validation
def _module_path(name: str) -> str:
    return name.rpartition(".")[0]


def _resolve_weight(model: nn.Module, name: object, what: str) -> nn.Linear:
    """The nn.Linear whose ``weight`` is the parameter ``name``, or a ValueError that says what ``name`` is instead."""
    if not isinstance(name, str):
        raise TypeError(f"{what}: keys must be parameter names (str), got {describe(name)}")
    params = dict(model.named_parameters(remove_duplicate=False))
    if name not in params:
        close = difflib.get_close_matches(name, list(params), n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"{what}: {name!r} is not a parameter name of the model (model.named_parameters()){hint}")
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if isinstance(module, RowDeltaLinear) and attr == "weight":
        raise ValueError(
            f"{what}: {name!r} already has a row delta ({module.weight_delta_index.numel()} rows, attached earlier); "
            "call allo_kernels.merge_row_deltas(model) before attaching new deltas to it"
        )
    if hasattr(module, FROZEN_ONLY_ATTR) and attr == "weight":
        raise ValueError(
            f"{what}: {name!r} was already named in an earlier attach_row_deltas call (its mask selected no rows); "
            "call allo_kernels.merge_row_deltas(model) first"
        )
    if type(module) is not nn.Linear or attr != "weight":
        kind = type(module).__name__
        if isinstance(module, nn.Linear) and attr == "weight":
            why = f"it belongs to a {kind}, a subclass of torch.nn.Linear with its own behaviour"
        else:
            why = f"it is the {attr!r} parameter of a {kind}"
        raise ValueError(f"{what}: {name!r} is not the weight of a plain torch.nn.Linear ({why})")
    weight = params[name]
    sharers = [n for n, p in params.items() if p is weight and n != name]
    if sharers:
        raise ValueError(
            f"{what}: {name!r} is tied to {sharers} (one tensor used by several modules); a row delta would change "
            "only one of them, so tied weights cannot get one"
        )
    return module


def _check_axis(axis: object) -> int:
    if isinstance(axis, bool) or axis not in AXES:
        raise ValueError(f"axis must be 0 (rows: output neurons) or 1 (columns: input neurons), got {axis!r}")
    return int(axis)


def _mask_index(name: str, mask: object, weight: torch.Tensor, axis: int) -> torch.Tensor:
    """Sorted row (axis 0) or column (axis 1) indices selected by a 1-D bool mask, validated against the weight."""
    length = weight.shape[axis]
    what = "rows" if axis == 0 else "columns"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"masks[{name!r}] must be a 1-D bool tensor of {length} {what}, got {describe(mask)}")
    if mask.dim() == 2 and tuple(mask.shape) == tuple(weight.shape):
        raise ValueError(
            f"masks[{name!r}] is an element mask of shape {tuple(mask.shape)}: row deltas need one bool per "
            f"{what[:-1]} (shape ({length},)); element masks cannot be made compact this way, train them with "
            "allo_kernels.SparseAdamW(..., masks=...) instead"
        )
    if mask.dim() != 1 or mask.shape[0] != length:
        raise ValueError(
            f"masks[{name!r}] must have shape ({length},), one bool per {what[:-1]} of the weight of shape "
            f"{tuple(weight.shape)} (axis={axis}), got {describe(mask)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"masks[{name!r}] must have dtype torch.bool, got {describe(mask)}")
    return mask.nonzero().flatten()


def _check_dtype(dtype: object) -> torch.dtype:
    allowed = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    if dtype not in allowed:
        raise ValueError(f"dtype must be one of {[str(d) for d in allowed]}, got {dtype!r}")
    return dtype  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------ attach/merge
def _attach(
    model: nn.Module, indices: dict[str, torch.Tensor | None], *, axis: int, dtype: torch.dtype
) -> dict[str, nn.Parameter]:
    """Attach validated indices (name -> sorted index, or None for 'no rows') after every name was checked."""
    deltas: dict[str, nn.Parameter] = {}
    for name, index in indices.items():
        module = model.get_submodule(_module_path(name)) if _module_path(name) else model
        if index is None or index.numel() == 0:
            setattr(module, FROZEN_ONLY_ATTR, module.weight.requires_grad)
            module.weight.requires_grad_(False)
            continue
        deltas[name] = RowDeltaLinear.attach(module, index, axis=axis, dtype=dtype).weight_delta
    return deltas


def attach_row_deltas(
    model: nn.Module, masks: dict[str, torch.Tensor], *, axis: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, nn.Parameter]:
    """Freeze each named ``nn.Linear`` weight and give its selected rows a trainable zero delta.

    ``masks`` maps parameter names (as in ``model.named_parameters()``) of ``nn.Linear`` weights to 1-D bool masks:
    ``[out_features]`` rows with ``axis=0`` (output neurons), ``[in_features]`` columns with ``axis=1`` (input
    neurons; call twice to mix). Returns ``{weight name: delta}`` for every weight whose mask selects at least one
    row: the parameters to give an optimizer. Parameters not named are left exactly as they are. Every name and mask
    is checked before anything changes; bad input is a ValueError (TypeError for non-tensors) naming the parameter.
    """
    axis = _check_axis(axis)
    dtype = _check_dtype(dtype)
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict {{parameter name: 1-D bool tensor}}, got {describe(masks)}")
    indices = {}
    for name, mask in masks.items():
        module = _resolve_weight(model, name, "masks")
        indices[name] = _mask_index(name, mask, module.weight, axis)
    return _attach(model, indices, axis=axis, dtype=dtype)


def _attached(model: nn.Module) -> dict[str, RowDeltaLinear]:
    """{weight name: module} for every attached row delta, in ``named_modules`` order."""
    modules = model.named_modules()
    return {(f"{path}.weight" if path else "weight"): m for path, m in modules if isinstance(m, RowDeltaLinear)}


def row_delta_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{weight name: delta} of every row delta attached to ``model``, as ``attach_row_deltas`` returned them: e.g. to
    hand them to an optimizer, or to tell them apart from the model's own weights."""
    return {name: module.weight_delta for name, module in _attached(model).items()}


def merge_row_deltas(model: nn.Module) -> list[str]:
    """W[R] = round(W[R] + D) for every attached delta (fp32 sum, rounded once to W's dtype) and remove the deltas.

    Afterwards the model's modules, parameter names and ``requires_grad`` flags are as before ``attach_row_deltas``
    (only the selected rows of W hold new values). Returns the names of the merged weights.
    """
    attached = _attached(model)
    for name, module in attached.items():  # all checked before any is merged
        _check_local(name, module)
    for module in attached.values():
        module.merge()
    for _, module in model.named_modules():
        if hasattr(module, FROZEN_ONLY_ATTR):
            module.weight.requires_grad_(getattr(module, FROZEN_ONLY_ATTR))
            delattr(module, FROZEN_ONLY_ATTR)
    return list(attached)


def _check_local(name: str, module: RowDeltaLinear) -> None:
    """A ZeRO-3-partitioned delta (an empty local shard) must be gathered before it is merged or saved."""
    want = list(module.weight.shape)
    want[module.delta_axis] = module.weight_delta_index.numel()
    if list(module.weight_delta.shape) != want:
        raise ValueError(
            f"the delta of {name!r} has shape {tuple(module.weight_delta.shape)}, expected {tuple(want)} for a weight "
            f"of shape {tuple(module.weight.shape)}; a partitioned (DeepSpeed ZeRO-3) model must be gathered first"
        )


# ------------------------------------------------------------------------------------------------------- save/load
def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "save_row_deltas/load_row_deltas write safetensors files and need the 'safetensors' package "
            "(pip install safetensors); allo_kernels itself depends only on torch and triton"
        ) from e
    return safetensors.torch


def save_row_deltas(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> dict[str, int]:
    """Write every attached delta and its rows (columns) to one safetensors file.

    Tensors: ``<module>.weight_delta`` (the values, in their dtype) and ``<module>.weight_delta_index`` (int64), the
    attached model's own state-dict names; metadata: the axis and the base weight's shape per delta. The file is
    written to a temporary name and renamed, so an interrupted save leaves no partial file; an existing file is
    replaced only with ``overwrite=True``. Returns ``{weight name: number of rows (columns)}``.
    """
    st = _safetensors()
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    attached = _attached(model)
    if not attached:
        raise ValueError("the model has no row deltas attached (attach_row_deltas or load_row_deltas first)")
    tensors, axes, shapes, counts = {}, {}, {}, {}
    for name, module in attached.items():
        _check_local(name, module)
        path_prefix = _module_path(name)
        prefix = f"{path_prefix}." if path_prefix else ""
        tensors[f"{prefix}{DELTA_SUFFIX[1:]}"] = module.weight_delta.detach().contiguous().cpu()
        tensors[f"{prefix}{INDEX_SUFFIX[1:]}"] = module.weight_delta_index.detach().contiguous().cpu()
        axes[name] = module.delta_axis
        shapes[name] = list(module.weight.shape)
        counts[name] = int(module.weight_delta_index.numel())
    metadata = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "axes": json.dumps(axes),
        "base_shapes": json.dumps(shapes),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        st.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return counts


def _read_deltas(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has keys(), no __iter__)
    return tensors, metadata


def load_row_deltas(model: nn.Module, path: str | os.PathLike) -> dict[str, nn.Parameter]:
    """Attach the deltas saved by ``save_row_deltas`` onto a model (e.g. a fresh copy of the base model).

    Each named weight is frozen and gets the saved rows (columns) and values, as ``attach_row_deltas`` would, with
    the delta in its saved dtype. Returns ``{weight name: delta}``; ``merge_row_deltas(model)`` then gives the trained
    model. The file is checked against the model before anything changes: a missing parameter, a weight of another
    shape, or a malformed entry is a ValueError naming the file and the entry.
    """
    _safetensors()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no row-delta file at {path}")
    tensors, metadata = _read_deltas(path)
    if metadata.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not a row-delta file (metadata format={metadata.get('format')!r})")
    try:
        axes = json.loads(metadata["axes"])
        shapes = json.loads(metadata["base_shapes"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: malformed row-delta metadata ({e})") from e
    entries: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
    for name, axis in axes.items():
        what = f"{path} entry {name!r}"
        if axis not in AXES:
            raise ValueError(f"{what}: axis must be 0 or 1, got {axis!r}")
        module = _resolve_weight(model, name, str(path))
        if list(module.weight.shape) != shapes.get(name):
            raise ValueError(
                f"{what}: the deltas were made for a weight of shape {shapes.get(name)}, the model's "
                f"{name!r} has shape {list(module.weight.shape)}"
            )
        prefix = f"{_module_path(name)}." if _module_path(name) else ""
        index, delta = tensors.get(f"{prefix}{INDEX_SUFFIX[1:]}"), tensors.get(f"{prefix}{DELTA_SUFFIX[1:]}")
        if index is None or delta is None:
            raise ValueError(f"{what}: the file lacks {prefix}{INDEX_SUFFIX[1:]} or {prefix}{DELTA_SUFFIX[1:]}")
        length = module.weight.shape[axis]
        ok = (
            index.dtype == torch.int64
            and index.dim() == 1
            and index.numel() > 0
            and bool((index[1:] > index[:-1]).all())
            and 0 <= int(index[0]) <= int(index[-1]) < length
        )
        if not ok:
            raise ValueError(f"{what}: the index must be sorted distinct int64 in [0, {length}), got {describe(index)}")
        want = list(module.weight.shape)
        want[axis] = index.numel()
        if list(delta.shape) != want or not delta.is_floating_point():
            raise ValueError(f"{what}: the delta must be a float tensor of shape {want}, got {describe(delta)}")
        entries[name] = (axis, index, delta)
    deltas: dict[str, nn.Parameter] = {}
    for name, (axis, index, values) in entries.items():
        deltas.update(_attach(model, {name: index}, axis=axis, dtype=values.dtype))
        with torch.no_grad():
            deltas[name].copy_(values)
    return deltas
