"""Reference per-token log-probs: computed once per stage with the stage's starting policy, cached on disk.

So no second model sits in memory while training: before the first step, the engine's own (not yet updated) policy
scores every training example; the per-token log-probs (fp32, aligned with ``labels[1:]``) are stored under a key
made of the data file's bytes, the model directory's weight files and the tokenisation settings, and a later run or a
resumed run with the same key loads them instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .files import naming_write_errors


def cache_key(*, data_path: str | Path, model_dir: str | Path, settings: dict) -> str:
    h = hashlib.sha256()
    with open(data_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    for f in sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def compute_or_load(
    cache_dir: str | Path,
    key: str,
    features: Sequence[dict],
    score_batch: Callable[[list[dict]], list[torch.Tensor]],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    desc: str = "reference log-probs",
) -> list[torch.Tensor]:
    """Per-example fp32 tensors from ``score_batch``, computed across ranks and cached at ``cache_dir/ref-<key>.pt``.

    Every rank runs the same number of forward calls (ZeRO-3 gathers parameters collectively): rank r scores
    examples r, r + W, ...; the shorter shards repeat their last batch. Results are exchanged with all_gather_object
    and rank 0 writes the cache atomically.
    """
    import torch.distributed as dist

    path = Path(cache_dir) / f"ref-{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)

    mine = list(range(rank, len(features), world_size))
    per_rank = -(-len(features) // world_size)
    n_batches = -(-per_rank // batch_size)  # the same on every rank
    results: dict[int, torch.Tensor] = {}
    from tqdm.auto import tqdm

    from .metrics import progress_bars

    for b in tqdm(range(n_batches), desc=desc, disable=rank != 0 or not progress_bars()):
        idx = mine[b * batch_size : (b + 1) * batch_size] or mine[-1:] or [0]
        scored = score_batch([features[i] for i in idx])
        for i, t in zip(idx, scored):
            results[i] = t.detach().to("cpu", torch.float32)
    if world_size > 1:
        gathered: list[dict] = [None] * world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, results)
        for part in gathered:
            results.update(part)
    out = [results[i] for i in range(len(features))]
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with naming_write_errors(tmp):
            torch.save(out, tmp)
        os.replace(tmp, path)
    if world_size > 1:
        dist.barrier()
    return out
