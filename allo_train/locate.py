"""Neuron location: which parameters the forgetting and improving stages may update.

1. Importance per parameter (fp32, same shape as the parameter, >= 0):
   * ``delta_importance(start, warm)``: ``|theta_warm - theta_start|`` (optionally divided by the warm-up's learning
     rate, which makes ratios comparable across runs), as in the official ALLO ``gen_neuron_mask.py``;
   * ``GradImportance``: ``sum over batches of |grad|`` (the caller runs the backward passes).
2. ``select_masks(importance, ratio=..., granularity=..., scope=..., exclude=...)``:
   * ``"element"``: one bool per weight, mask shape = parameter shape;
   * ``"row"`` (neurons): one bool per output row, a 1-D mask over dim 0; a row's score is the mean importance of
     its elements;
   * ``"layer"`` (all-or-nothing): decoder layers are ranked by the mean importance of their (non-excluded)
     elements and the top ``floor(ratio * n_layers)`` layers are selected; masks are 1-D over dim 0 and all-True
     in selected layers; parameters outside any numbered layer are not selected (:func:`layer_masks`; ILA,
     ``allo_train.ila``, learns the ranking of layers instead and writes the same masks).
   ``scope="global"`` ranks all candidates together; ``"per_matrix"`` selects ``floor(ratio * n)`` within each
   parameter (element/row only). Exactly ``k = floor(ratio * n_candidates)`` elements/rows are selected: ties at the
   threshold go to the earlier position, positions ordered by the importance mapping's key order, then row-major
   index. Excluded parameters (fnmatch patterns on the name, or ``"re:<regex>"`` searched in it; by default
   embeddings, norms, lm_head) are not candidates and get an all-False mask, so the optimizer never treats a missing
   mask as "update densely".

   The global threshold is found without sorting or concatenating everything: non-negative fp32 bit patterns are
   ordered like their values, so a two-pass radix select (a 65536-bin histogram of the high bits, then a 32768-bin
   histogram of the low bits inside the winning bin) finds the exact k-th largest value parameter by parameter, with
   O(largest parameter) extra memory. Small problems (<= 4M candidates) use ``torch.kthvalue`` on a concatenation.
3. ``save_masks`` writes ``masks.safetensors`` (keyed by parameter name), ``mask_stats.json`` and a layers x module
   heatmap PNG; ``load_masks(path)`` reads the masks back.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from .files import write_atomic

GRANULARITIES = ("element", "row", "layer")
SCOPES = ("global", "per_matrix")
# How the locate stage selects (config key locate.method): "weight_delta" = |theta_warm - theta_start|, "grad" =
# accumulated |grad|, "ila" = whole decoder layers ranked by learned gates on LoRA increments (allo_train.ila).
METHODS = ("weight_delta", "grad", "ila")
# The earlier key locate.importance and its values, still read: {value: the method it means}.
IMPORTANCE_METHODS = {"delta": "weight_delta", "grad": "grad"}
IMPORTANCES = tuple(IMPORTANCE_METHODS)
# Not candidates unless the config says otherwise: embeddings, norms and lm_head (fnmatch patterns on the name).
DEFAULT_EXCLUDE = ("*embed*", "*wte*", "*wpe*", "*norm*", "*.ln_*", "*ln_f*", "lm_head*", "*.lm_head*")
MASKS_FILE = "masks.safetensors"
IMPORTANCE_FILE = "importance.safetensors"
STATS_FILE = "mask_stats.json"
HEATMAP_FILE = "mask_heatmap.png"

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_KTHVALUE_MAX_ELEMENTS = 1 << 22  # below this a concatenated copy is cheap: use kthvalue


# --------------------------------------------------------------------------------------------------------------------
# Importance
# --------------------------------------------------------------------------------------------------------------------


def delta_importance(
    start: Mapping[str, torch.Tensor],
    warm: Mapping[str, torch.Tensor],
    *,
    learning_rate: float | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """``|warm[n] - start[n]|`` in fp32 (divided by ``learning_rate`` when given) for every floating tensor of
    ``warm`` (or only ``names``), in ``warm``'s key order. Mappings may be lazy (see :class:`SafetensorsState`)."""
    if learning_rate is not None and not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise ValueError(f"learning_rate must be a finite number > 0 or None, got {learning_rate!r}")
    out: dict[str, torch.Tensor] = {}
    for name in list(names) if names is not None else list(warm.keys()):
        if name not in warm:
            raise ValueError(f"parameter {name!r} is not in the warm state dict")
        if name not in start:
            raise ValueError(f"parameter {name!r} of the warm state dict is missing from the start state dict")
        w, s = warm[name], start[name]
        if not w.is_floating_point():
            continue
        if tuple(w.shape) != tuple(s.shape):
            raise ValueError(
                f"parameter {name!r} has shape {tuple(s.shape)} at start but {tuple(w.shape)} after warm-up"
            )
        imp = (w.detach().float() - s.detach().float().to(w.device)).abs_()
        if learning_rate is not None:
            imp.div_(learning_rate)
        out[name] = imp
    return out


class GradImportance:
    """Accumulates ``|grad|`` per parameter name in fp32 (on ``device``, default: the gradient's device).

    Call :meth:`add` after each backward with ``(name, grad)`` pairs (under ZeRO pass full gradients, e.g.
    ``deepspeed.utils.safe_get_full_grad(p)``), or :meth:`add_model` for a plain module. ``importance`` is the sum."""

    def __init__(self, *, device: torch.device | str | None = None) -> None:
        self.device = device
        self.importance: dict[str, torch.Tensor] = {}
        self.num_updates = 0

    def add(self, named_grads: Iterable[tuple[str, torch.Tensor | None]]) -> None:
        for name, grad in named_grads:
            if grad is None:
                continue
            g = grad.detach().to(self.device or grad.device, torch.float32).abs()
            acc = self.importance.get(name)
            if acc is None:
                self.importance[name] = g
            elif acc.shape != g.shape:
                raise ValueError(f"gradient of {name!r} has shape {tuple(g.shape)}, earlier {tuple(acc.shape)}")
            else:
                acc.add_(g)
        self.num_updates += 1

    def add_model(self, model: torch.nn.Module) -> None:
        self.add((n, p.grad) for n, p in model.named_parameters() if p.requires_grad)


class SafetensorsState(Mapping):
    """A read-only, lazy ``{name: tensor}`` over a safetensors file or a model directory (sharded or not): tensors are
    read one at a time, so two 7B checkpoints can be compared without holding either in memory."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        path = Path(path)
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no .safetensors file at {str(path)!r}")
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():  # noqa: SIM118  (safe_open is not iterable)
                    self._where[key] = f

    def __getitem__(self, key: str) -> torch.Tensor:
        with self._safe_open(str(self._where[key]), framework="pt") as h:
            return h.get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def save_importance(importance: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    from safetensors.torch import save_file

    return write_atomic(Path(path), lambda tmp: save_file({k: v.contiguous() for k, v in importance.items()}, str(tmp)))


def load_importance(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# --------------------------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------------------------


def is_excluded(name: str, patterns: Sequence[str]) -> bool:
    """fnmatch (case-sensitive, whole name) for plain patterns; ``re.search`` for ``"re:<regex>"`` patterns."""
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False


def layer_index(name: str) -> int | None:
    """Decoder layer number in names like ``model.layers.3.mlp...`` or ``transformer.h.3.attn...``; None outside."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj`` (the heatmap's column)."""
    m = _LAYER_RE.search(name)
    rest = name[m.end() :] if m else name
    for suffix in (".weight", ".bias"):
        if rest.endswith(suffix):
            return rest[: -len(suffix)]
    return rest


def count_for_ratio(ratio: float, n: int) -> int:
    """``floor(ratio * n)`` computed on the decimal value of ``ratio`` (0.29 * 100 -> 29, not 28)."""
    return math.floor(Fraction(repr(float(ratio))) * n)


def _bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _nonnegative_bits(s: torch.Tensor) -> torch.Tensor:
    # fp32 bit patterns of values >= 0 are ordered like the values; -0.0 (0x80000000) is clamped onto +0.0.
    return s.reshape(-1).view(torch.int32).clamp(min=0)


def _pick_bin(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin b holding the k-th largest element of a histogram, and how many elements lie in bins above b."""
    above = counts.flip(0).cumsum(0).flip(0) - counts  # elements in bins > b
    b = int(((above < k) & (above + counts >= k)).nonzero()[0])
    return b, int(above[b])


def _kth_largest(scores: Sequence[torch.Tensor], k: int) -> float:
    """The k-th largest value (1 <= k <= total) over fp32 tensors of non-negative values."""
    total = sum(s.numel() for s in scores)
    if total <= _KTHVALUE_MAX_ELEMENTS:
        flat = torch.cat([s.reshape(-1) for s in scores]) if len(scores) > 1 else scores[0].reshape(-1)
        return float(flat.kthvalue(total - k + 1).values)
    # Radix select in two passes, one tensor at a time: histogram of the high 16 bits (of 31), find the bin of the
    # k-th largest, then histogram the low 15 bits of the elements in that bin.
    high = torch.zeros(1 << 16, dtype=torch.int64)
    for s in scores:
        high += torch.bincount(_nonnegative_bits(s) >> 15, minlength=1 << 16).cpu()
    b, above = _pick_bin(high, k)
    low = torch.zeros(1 << 15, dtype=torch.int64)
    for s in scores:
        bits = _nonnegative_bits(s)
        low += torch.bincount(bits[(bits >> 15) == b] & 0x7FFF, minlength=1 << 15).cpu()
    lo, _ = _pick_bin(low, k - above)
    return _bits_to_float((b << 15) | lo)


def top_k_masks(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Bool masks (shapes of ``scores``) selecting exactly the ``k`` largest values over all of ``scores`` together;
    ties at the threshold go to the earlier tensor, then the lower row-major index."""
    total = sum(s.numel() for s in scores)
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}], got {k}")
    if k == 0:
        return [torch.zeros(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    if k == total:
        return [torch.ones(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    t = _kth_largest(scores, k)
    masks = [s > t for s in scores]
    remaining = k - sum(int(m.sum()) for m in masks)
    for s, m in zip(scores, masks):
        if remaining == 0:
            break
        eq = (s == t).reshape(-1).nonzero().squeeze(1)
        take = eq[:remaining]
        m.view(-1)[take] = True
        remaining -= take.numel()
    assert remaining == 0, "internal: threshold selection fell short"
    return masks


def _check_importance(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(
            f"importance[{name!r}] must be a floating tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}"
        )
    x = x.detach().float()
    if bool(torch.isnan(x).any()) or bool((x < 0).any()):
        raise ValueError(f"importance[{name!r}] must be >= 0 and not NaN (got min {float(x.min())})")
    return x


def _row_scores(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0:
        return x.reshape(1)
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _row_mask_shape(shape: torch.Size) -> tuple[int, ...]:
    return (shape[0],) if len(shape) > 0 else ()


def select_masks(
    importance: Mapping[str, torch.Tensor],
    *,
    ratio: float,
    granularity: str = "element",
    scope: str = "global",
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> dict[str, torch.Tensor]:
    """Bool masks for every parameter of ``importance`` (see the module docstring), on the importance's device."""
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if granularity == "layer" and scope != "global":
        raise ValueError(f"scope must be 'global' for granularity='layer' (layers are ranked together), got {scope!r}")

    masks: dict[str, torch.Tensor] = {}
    candidates: list[str] = []
    for name, x in importance.items():
        shape = x.shape
        mask_shape = tuple(shape) if granularity == "element" else _row_mask_shape(shape)
        masks[name] = torch.zeros(mask_shape, dtype=torch.bool, device=x.device)
        if not is_excluded(name, exclude):
            candidates.append(name)

    if granularity == "layer":
        sums: dict[int, float] = {}
        counts: dict[int, int] = {}
        for name in candidates:
            layer = layer_index(name)
            if layer is None:
                continue
            x = _check_importance(name, importance[name])
            sums[layer] = sums.get(layer, 0.0) + float(x.double().sum())
            counts[layer] = counts.get(layer, 0) + x.numel()
        layers = sorted(sums)
        if layers:
            layer_scores = torch.tensor([sums[i] / max(counts[i], 1) for i in layers], dtype=torch.float64).float()
            (chosen,) = top_k_masks([layer_scores], count_for_ratio(ratio, len(layers)))
            selected = {layer for layer, keep in zip(layers, chosen.tolist()) if keep}
            for name in candidates:
                if layer_index(name) in selected:
                    masks[name].fill_(True)
        return masks

    def scores_of(name: str) -> torch.Tensor:
        x = _check_importance(name, importance[name])
        return x if granularity == "element" else _row_scores(x)

    if scope == "per_matrix":
        for name in candidates:
            s = scores_of(name)
            (m,) = top_k_masks([s], count_for_ratio(ratio, s.numel()))
            masks[name] = m.reshape(masks[name].shape)
        return masks

    scores = [scores_of(name) for name in candidates]
    k = count_for_ratio(ratio, sum(s.numel() for s in scores))
    for name, m in zip(candidates, top_k_masks(scores, k)):
        masks[name] = m.reshape(masks[name].shape)
    return masks


def layer_masks(
    shapes: Mapping[str, Sequence[int]], layers: Iterable[int], *, exclude: Sequence[str] = DEFAULT_EXCLUDE
) -> dict[str, torch.Tensor]:
    """Masks at layer granularity for chosen ``layers`` (what ``select_masks(granularity="layer")`` writes for the
    layers it ranks first): for every parameter of ``shapes`` a 1-D mask over dim 0, all-True for the non-excluded
    parameters of those layers, all-False for the rest."""
    chosen = set(layers)
    return {
        name: torch.full(
            _row_mask_shape(torch.Size(shape)),
            layer_index(name) in chosen and not is_excluded(name, exclude),
            dtype=torch.bool,
        )
        for name, shape in shapes.items()
    }


# --------------------------------------------------------------------------------------------------------------------
# Stats, files, heatmap
# --------------------------------------------------------------------------------------------------------------------


def mask_stats(
    masks: Mapping[str, torch.Tensor],
    shapes: Mapping[str, Sequence[int]],
    *,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    **info,
) -> dict:
    """Per-parameter, per-layer (x module) and total selected counts/fractions. ``shapes``: parameter shapes (a
    row mask of length R on an [R, ...] parameter selects whole rows). ``info`` is copied in (ratio, granularity...)."""
    params, layers = {}, {}
    total = {"elements": 0, "selected_elements": 0, "candidate_elements": 0}
    for name, mask in masks.items():
        shape = tuple(shapes[name])
        numel = math.prod(shape)
        n_sel_units = int(mask.sum())
        per_unit = numel // max(mask.numel(), 1)
        selected = n_sel_units * per_unit
        excluded = is_excluded(name, exclude)
        layer = layer_index(name)
        entry = {
            "shape": list(shape),
            "numel": numel,
            "excluded": excluded,
            "layer": layer,
            "module": module_type(name),
            "selected_elements": selected,
            "fraction": selected / numel if numel else 0.0,
        }
        if mask.dim() == 1 and tuple(mask.shape) != shape:
            entry["rows"], entry["selected_rows"] = mask.numel(), n_sel_units
        params[name] = entry
        total["elements"] += numel
        total["selected_elements"] += selected
        total["candidate_elements"] += 0 if excluded else numel
        if layer is not None:
            ly = layers.setdefault(str(layer), {"elements": 0, "selected_elements": 0, "modules": {}})
            ly["elements"] += numel
            ly["selected_elements"] += selected
            mod = ly["modules"].setdefault(entry["module"], {"elements": 0, "selected_elements": 0, "excluded": True})
            mod["elements"] += numel
            mod["selected_elements"] += selected
            mod["excluded"] = mod["excluded"] and excluded  # every parameter of the module excluded
    for ly in layers.values():
        ly["fraction"] = ly["selected_elements"] / ly["elements"] if ly["elements"] else 0.0
        for mod in ly["modules"].values():
            mod["fraction"] = mod["selected_elements"] / mod["elements"] if mod["elements"] else 0.0
    total["fraction"] = total["selected_elements"] / total["elements"] if total["elements"] else 0.0
    total["fraction_of_candidates"] = (
        total["selected_elements"] / total["candidate_elements"] if total["candidate_elements"] else 0.0
    )
    layers = dict(sorted(layers.items(), key=lambda kv: int(kv[0])))
    return {**info, "total": total, "layers": layers, "params": params}


def plot_mask_heatmap(stats: Mapping, path: str | Path, *, title: str | None = None) -> Path:
    """:func:`mask_heatmap_figure` written to ``path`` as a PNG (atomically)."""
    fig = mask_heatmap_figure(stats, title=title)
    return write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))


# The heatmap's colour bar, and how it shows modules that were never candidates.
HEATMAP_COLORBAR_LABEL = "selected share of weights"
HEATMAP_EXCLUDED_LABEL = "excluded (never selected: locate.exclude)"


def mask_heatmap_figure(stats: Mapping, *, title: str | None = None):
    """Layers (rows) x module types (columns), colour = selected share of the module's weights; modules excluded
    from selection (embeddings, norms, lm_head by default) are grey and hatched, not "0 selected". A matplotlib
    Figure (the Agg canvas, no pyplot, no global backend change)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    layers = list(stats["layers"].keys())
    modules = sorted({m for ly in stats["layers"].values() for m in ly["modules"]})
    data = torch.full((max(len(layers), 1), max(len(modules), 1)), float("nan"))
    excluded = []  # (row, column) of the excluded cells
    for i, layer in enumerate(layers):
        for j, m in enumerate(modules):
            entry = stats["layers"][layer]["modules"].get(m)
            if entry is None:
                continue
            if entry.get("excluded", False):
                excluded.append((i, j))
            else:
                data[i, j] = entry["fraction"]
    fig = Figure(figsize=(max(4.5, 0.6 * len(modules) + 3.0), max(3.8, 0.25 * len(layers) + 2.2)))
    ax = fig.add_subplot(1, 1, 1)
    vmax = max(float(data.nan_to_num(0.0).max()), 1e-12)
    image = ax.imshow(data.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    for i, j in excluded:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.85", edgecolor="0.5", hatch="///", lw=0))
    ax.set_xticks(range(len(modules)))
    ax.set_xticklabels(modules, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=7)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title or "selected share per layer and module")
    fig.colorbar(image, ax=ax).set_label(HEATMAP_COLORBAR_LABEL, fontsize=8)
    bottom = 0.0
    if excluded:
        hatched = Patch(facecolor="0.85", edgecolor="0.5", hatch="///", label=HEATMAP_EXCLUDED_LABEL)
        fig.legend(handles=[hatched], loc="lower center", fontsize=8, frameon=False)
        bottom = 0.35 / fig.get_figheight()  # room for the legend under the axes
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


@dataclass
class LocateResult:
    masks: dict[str, torch.Tensor]
    stats: dict
    masks_path: Path
    stats_path: Path
    heatmap_path: Path | None


def save_masks(
    masks: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    stats: Mapping | None = None,
    heatmap: bool = True,
) -> LocateResult:
    """Write ``masks.safetensors`` (+ ``mask_stats.json`` and ``mask_heatmap.png`` when ``stats`` is given)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    cpu = {k: v.detach().to("cpu", torch.bool).contiguous() for k, v in masks.items()}
    masks_path = write_atomic(out_dir / MASKS_FILE, lambda tmp: save_file(cpu, str(tmp)))
    stats_path = out_dir / STATS_FILE
    heatmap_path = None
    if stats is not None:
        text = json.dumps(stats, indent=2)
        write_atomic(stats_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        if heatmap and stats.get("layers"):
            heatmap_path = plot_mask_heatmap(stats, out_dir / HEATMAP_FILE)
    return LocateResult(dict(masks), dict(stats or {}), masks_path, stats_path, heatmap_path)


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """``{name: bool tensor}`` from a ``masks.safetensors`` file or the directory holding it."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / MASKS_FILE
    if not path.is_file():
        raise ValueError(f"no mask file at {str(path)!r}")
    masks = load_file(str(path))
    for name, m in masks.items():
        if m.dtype != torch.bool:
            raise ValueError(f"mask {name!r} in {str(path)!r} has dtype {m.dtype}, expected torch.bool")
    return masks


def masks_digest(masks: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the masks' names, shapes and values: equal digests, equal masks."""
    h = hashlib.sha256()
    for name in sorted(masks):
        m = masks[name].detach().to("cpu", torch.bool).contiguous()
        h.update(f"{name}:{tuple(m.shape)}:".encode())
        h.update(m.numpy().tobytes())
    return h.hexdigest()


def check_mask_shape(name: str, mask: torch.Tensor, shape: tuple[int, ...], *, source: str = "") -> None:
    """A mask is a bool tensor of the parameter's shape (elements) or ``(shape[0],)`` (rows); else ValueError naming
    the parameter and both shapes. Checked before any use of the values, so an all-True or all-False mask of the
    wrong shape is caught as well."""
    where = f" in {source}" if source else ""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask {name!r}{where} has dtype {mask.dtype}, expected torch.bool")
    mask_shape = tuple(mask.shape)
    if mask_shape != shape and mask_shape != shape[:1]:
        raise ValueError(
            f"mask {name!r}{where} has shape {mask_shape} but the parameter has shape {shape}: a mask must have the "
            f"parameter's shape (elements) or {shape[:1]} (rows)"
        )


def _first(names: Sequence[str], n: int = 10) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def check_masks_match_model(
    masks: Mapping[str, torch.Tensor], model: torch.nn.Module, *, source: str = "masks"
) -> None:
    """Validate a mask set against the model it will train, before training: every mask names a parameter of the
    model, every parameter has a mask (all-False freezes it; a missing mask is not read as "train densely"), and
    every shape fits (:func:`check_mask_shape`). A ValueError names the parameters and the shapes."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} mask(s) name parameters the model does not have: {_first(unknown)} (masks "
            f"made for another model?); the model's parameters are e.g. {_first(list(params), 3)}"
        )
    by_tensor: dict[int, list[str]] = {}
    for n, p in params.items():  # tied weights: one tensor, several names; a mask under any of them covers it
        by_tensor.setdefault(id(p), []).append(n)
    missing = [names[0] for names in by_tensor.values() if not any(n in masks for n in names)]
    if missing:
        raise ValueError(
            f"{source}: no mask for {len(missing)} parameter(s) of the model: {_first(missing)}; give every "
            "parameter a mask (an all-False mask keeps it frozen, as locate writes for excluded parameters)"
        )
    for name, mask in masks.items():
        check_mask_shape(name, mask, tuple(params[name].shape), source=source)


def locate(
    importance: Mapping[str, torch.Tensor],
    out_dir: str | Path,
    *,
    ratio: float,
    granularity: str = "element",
    scope: str = "global",
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    heatmap: bool = True,
) -> LocateResult:
    """select_masks + mask_stats + save_masks into ``out_dir``."""
    masks = select_masks(importance, ratio=ratio, granularity=granularity, scope=scope, exclude=exclude)
    stats = mask_stats(
        masks,
        {n: tuple(x.shape) for n, x in importance.items()},
        exclude=exclude,
        ratio=ratio,
        granularity=granularity,
        scope=scope,
        exclude_patterns=list(exclude),
    )
    return save_masks(masks, out_dir, stats=stats, heatmap=heatmap)
