"""Row deltas vs SparseAdamW's masked path vs dense AdamW: one training step, bytes of training state, ZeRO per rank.

    python benchmarks/bench_row_delta.py --json benchmarks/results/cpu-row_delta.json           # every section
    python benchmarks/bench_row_delta.py --sections layer,step --dtypes float32                  # a part

Sections (all timings are paired rounds: every case alive at once, one run each per round, the order reversed every
other round, so a shared machine's background load hits every case alike; ratios are per round, then the median):

* ``layer``: one linear layer, forward + backward (dx needed, as inside a model), N tokens (64, 256, 1024), 10 %
  random rows: ``dense`` (trainable W: the masked path's layer, dW GEMM included), ``frozen`` (W frozen, no delta: the
  floor), the row-delta forms of ``allo_kernels.ops.row_delta`` (``effective_weight``: W_eff = W with rows R + D,
  one GEMM forward and 1 + k/out backward; ``additive``: y = x W^T + b, y[..., R] += x D^T in the same
  autograd.Function, no W copy but two skinny GEMMs more; ``row_delta_auto``: the form the library picks),
  ``effective_weight_scratch`` (W_eff built in one reused buffer instead of a fresh allocation) and
  ``additive_autograd`` (the additive form in plain autograd: ``index_add`` on the output).
* ``step``: a Llama-shaped model (8 layers, hidden 1024, intermediate 2816, 16 heads, vocab 8192: 120M parameters,
  103M of them in the decoder linears), batch 1 x T tokens, random init (no downloads), 10 % random rows in every
  decoder linear. ``dense_adamw``: every parameter trainable, ``torch.optim.AdamW(fused=True)``. ``masked``: the
  decoder-linear weights trainable, ``ak.SparseAdamW`` row-masked (native CPU kernel; bf16: fp32 master rows).
  ``row_delta``: ``ak.attach_row_deltas`` (fp32 deltas) + ``torch.optim.AdamW(fused=True)`` on the deltas. Time per
  step (forward + backward + optimizer step + zero_grad); bytes of gradients, master weights and optimizer state
  counted from the tensors after the backward and step; peak resident memory of a fresh process per case during one
  step (Linux VmHWM, reset before the step; CPU has no allocator statistics).
* ``zero``: DeepSpeed ZeRO-2 and ZeRO-3, 2 gloo ranks on 127.0.0.1 (DS_ACCELERATOR=cpu), the same model, one step:
  per-rank bytes of parameters, gradients, fp32 master partitions and optimizer state, read from the engine.
  ``masked``: SparseAdamW + bind(engine); ``row_delta``: a stock ``torch.optim.AdamW`` on the deltas;
  ``dense_adamw``: torch AdamW on everything. A table for Llama-2-7B on 1 and 8 GPUs is *derived* from the measured
  bytes per element (printed and stored under ``derived_7b``; nothing there is measured on a GPU).

bf16 on a CPU without bf16 instructions (ours: AVX2 only) runs GEMMs ~60x slower than fp32, so the bf16 cases use
fewer tokens (``--bf16-tokens``, ``--bf16-layer-tokens``); their times measure the CPU's bf16 emulation more than the
method. Timings use one intra-op thread by default (``--threads``): on a 2-core machine shared with other jobs, the
CPU time of one thread (reported beside the wall time) is the steadier measure of work.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import allo_kernels as ak
from allo_kernels.ops.row_delta import row_delta_linear
from allo_kernels.optim import _native
from benchmarks.bench_sparse_adamw import cpu_model, paired_speedup

MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, vocab_size=8192)
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FRACTION = 0.10
LR = 1e-5
LAYER_SHAPES = ((1024, 1024), (1024, 2816), (2816, 1024))  # (in, out): attention, gate/up, down
# Llama-2-7B: 32 layers, hidden 4096, intermediate 11008, vocab 32000 (untied): the derived table's model.
LLAMA7B = dict(layers=32, hidden=4096, intermediate=11008, vocab=32000)


# ------------------------------------------------------------------------------------------------------------ timing
def paired_rounds(cases: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run every case once per round (order reversed every other round): (wall seconds, CPU seconds) per run."""
    wall = {name: [] for name in cases}
    cpu = {name: [] for name in cases}
    order = list(cases)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            t, c = time.perf_counter(), time.process_time()
            cases[name]()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - t)
    return wall, cpu


def summarize(wall: dict[str, list[float]], cpu: dict[str, list[float]], baselines: tuple[str, ...]) -> dict:
    out = {}
    for name in wall:
        row = dict(rounds=len(wall[name]))
        for label, times in (("seconds", wall), ("cpu_seconds", cpu)):
            row[f"{label}_median"] = statistics.median(times[name])
            row[f"{label}_min"] = min(times[name])
            for base in baselines:
                if base != name and base in times:
                    # ours / baseline per round (< 1: faster): median and 10th-90th percentiles
                    r = paired_speedup(times[name], times[base])
                    row[f"{label}_vs_{base}"] = dict(median=r["median"], p10=r["p10"], p90=r["p90"])
        out[name] = row
    return out


# ------------------------------------------------------------------------------------------------------------- layer
class ScratchRowDelta(torch.autograd.Function):
    """row_delta with W_eff built in one reused buffer (no fresh W-sized allocation per call)."""

    scratch: ClassVar[dict] = {}

    @staticmethod
    def w_eff(weight, delta, index):
        key = (weight.shape, weight.dtype)
        if key not in ScratchRowDelta.scratch:
            ScratchRowDelta.scratch[key] = torch.empty_like(weight)
        buf = ScratchRowDelta.scratch[key]
        buf.copy_(weight)
        buf.index_copy_(0, index, (weight.index_select(0, index).float() + delta).to(weight.dtype))
        return buf

    @staticmethod
    def forward(ctx, x, weight, bias, delta, index):
        ctx.save_for_backward(x, weight, delta, index)
        return F.linear(x, ScratchRowDelta.w_eff(weight, delta, index), bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, delta, index = ctx.saved_tensors
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = (dy2 @ ScratchRowDelta.w_eff(weight, delta, index)).view_as(x)
        return dx, None, None, (dy2.index_select(1, index).t() @ x2).to(delta.dtype), None


def layer_cases(n_tokens: int, in_f: int, out_f: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    k = round(FRACTION * out_f)
    x = torch.randn(n_tokens, in_f, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(out_f, in_f, generator=g) * 0.02).to(dtype)
    bias = None
    index = torch.randperm(out_f, generator=g)[:k].sort().values
    delta = torch.zeros(k, in_f, requires_grad=True)  # fp32, the library's default
    trainable = weight.clone().requires_grad_()
    dy = torch.randn(n_tokens, out_f, generator=g).to(dtype)

    def run(fn, *params):
        def case():
            for p in (x, *params):
                p.grad = None
            fn().backward(dy)

        return case

    return {
        "dense": run(lambda: F.linear(x, trainable, bias), trainable),
        "frozen": run(lambda: F.linear(x, weight, bias)),
        "row_delta_auto": run(lambda: row_delta_linear(x, weight, delta, index, bias=bias), delta),
        "effective_weight": run(lambda: row_delta_linear(x, weight, delta, index, form="effective_weight"), delta),
        "effective_weight_scratch": run(lambda: ScratchRowDelta.apply(x, weight, bias, delta, index), delta),
        "additive": run(lambda: row_delta_linear(x, weight, delta, index, bias=bias, form="additive"), delta),
        "additive_autograd": run(
            lambda: F.linear(x, weight, bias).index_add(-1, index, F.linear(x, delta.to(dtype))), delta
        ),
    }


def bench_layer(args, dtype: torch.dtype) -> list[dict]:
    rows = []
    fp32 = dtype == torch.float32
    tokens = args.layer_tokens if fp32 else args.bf16_layer_tokens
    for n_tokens, (in_f, out_f) in itertools.product(map(int, tokens.split(",")), LAYER_SHAPES):
        cases = layer_cases(n_tokens, in_f, out_f, dtype)
        for case in cases.values():
            case()  # warm-up
        rounds = args.layer_rounds if fp32 else args.bf16_layer_rounds
        summary = summarize(*paired_rounds(cases, rounds), ("dense", "frozen"))
        for name, row in summary.items():
            rows.append(dict(impl=name, tokens=n_tokens, in_features=in_f, out_features=out_f, **row))
            wall_ratio = row.get("seconds_vs_dense", {}).get("median", 1.0)
            cpu_ratio = row.get("cpu_seconds_vs_dense", {}).get("median", 1.0)
            print(
                f"layer {dtype_name(dtype)} N={n_tokens} {in_f}->{out_f} {name:>24}: "
                f"{row['seconds_median'] * 1e3:8.1f} ms (CPU {row['cpu_seconds_median'] * 1e3:8.1f} ms)  "
                f"vs dense: {wall_ratio:.2f}x (CPU {cpu_ratio:.2f}x)",
                flush=True,
            )
    return rows


# -------------------------------------------------------------------------------------------------------------- step
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_llama(dtype: torch.dtype, *, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**MODEL, "num_hidden_layers": layers}, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


def decoder_row_masks(model, *, fraction: float = FRACTION, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in model.named_parameters():
        if name.endswith(".weight") and name.split(".")[-2] in DECODER_LINEARS:
            m = torch.zeros(p.shape[0], dtype=torch.bool)
            m[torch.randperm(p.shape[0], generator=g)[: round(fraction * p.shape[0])]] = True
            masks[name] = m
    return masks


def make_optimizer(kind: str, model, masks: dict, *, lr: float = LR):
    """The trainable set and optimizer of one case (see the module docstring)."""
    if kind == "dense_adamw":
        model.requires_grad_(True)
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    model.requires_grad_(False)
    if kind == "masked":
        params = dict(model.named_parameters())
        for n in masks:
            params[n].requires_grad_(True)
        low = next(model.parameters()).dtype != torch.float32
        return ak.SparseAdamW(
            [params[n] for n in masks],
            lr=lr,
            weight_decay=0.0,
            masks={params[n]: m for n, m in masks.items()},
            master_weights=low,
            backend="native" if _native.available() else "torch",
        )
    if kind == "row_delta":
        deltas = ak.attach_row_deltas(model, masks)
        return torch.optim.AdamW(deltas.values(), lr=lr, weight_decay=0.0, fused=True)
    raise ValueError(f"unknown case {kind!r}")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def state_bytes(opt) -> dict:
    master = moments = 0
    for st in opt.state.values():
        for key, t in st.items():
            if isinstance(t, torch.Tensor):
                if key == "master":
                    master += tensor_bytes([t])
                else:
                    moments += tensor_bytes([t])
    return dict(master=master, optimizer_state=moments)


STEP_CASES = ("dense_adamw", "masked", "row_delta")


class StepCase:
    def __init__(self, kind: str, dtype: torch.dtype, layers: int, tokens: int):
        self.model = build_llama(dtype, layers=layers)
        self.masks = decoder_row_masks(self.model)
        self.opt = make_optimizer(kind, self.model, self.masks)
        self.ids = torch.randint(0, MODEL["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(2))
        self.bytes: dict = {}

    def __call__(self) -> None:
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        if not self.bytes:
            grads = tensor_bytes(p.grad for p in self.model.parameters() if p.grad is not None)
            self.opt.step()
            self.bytes = dict(grads=grads, **state_bytes(self.opt))
            self.bytes["trained_params"] = tensor_bytes(p for p in self.model.parameters() if p.requires_grad)
            self.bytes["grads_master_optimizer"] = grads + self.bytes["master"] + self.bytes["optimizer_state"]
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def proc_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def live_tensor_bytes(case: StepCase) -> int:
    """Bytes of the distinct storages held between steps: parameters, buffers, optimizer state."""
    tensors = [*case.model.parameters(), *case.model.buffers()]
    tensors += [t for st in case.opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def peak_child(kind: str, dtype: torch.dtype, layers: int, tokens: int) -> dict:
    """In a fresh process, around one warm step: the peak of tensor memory (the bytes held between steps plus the
    largest net allocation during the step, from torch.profiler's allocation events: CPU tensors have no allocator
    statistics) and the process's resident memory (Linux VmHWM, which also counts what malloc keeps after a free)."""
    from torch.profiler import ProfilerActivity, profile

    case = StepCase(kind, dtype, layers, tokens)
    case()
    gc.collect()
    held = live_tensor_bytes(case)
    rss_before = proc_status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        case()
    rss_peak = proc_status()["VmHWM"]
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    net = peak_net = 0
    for _, nbytes in events:
        net += nbytes
        peak_net = max(peak_net, net)
    return dict(
        held_between_steps=held,
        peak_tensor_bytes=held + peak_net,
        rss_before_step=rss_before,
        peak_rss_during_step=rss_peak,
    )


def bench_step(args, dtype: torch.dtype) -> dict:
    tokens = args.tokens if dtype == torch.float32 else args.bf16_tokens
    rounds = args.rounds if dtype == torch.float32 else args.bf16_rounds
    cases = {kind: StepCase(kind, dtype, args.layers, tokens) for kind in STEP_CASES}
    for name, case in cases.items():
        case()  # warm-up step (allocates the optimizer state) and the byte counts
        print(f"step {dtype_name(dtype)} {name}: {json.dumps(case.bytes)}", flush=True)
    n_params = sum(p.numel() for p in cases["masked"].model.parameters())
    n_linear = sum(cases["masked"].model.get_parameter(n).numel() for n in cases["masked"].masks)
    n_selected = sum(
        int(m.sum()) * cases["masked"].model.get_parameter(n).shape[1] for n, m in cases["masked"].masks.items()
    )
    summary = summarize(*paired_rounds(cases, rounds), ("masked", "dense_adamw"))
    byte_counts = {name: case.bytes for name, case in cases.items()}
    del cases
    gc.collect()
    for name in STEP_CASES:
        cmd = [sys.executable, __file__, "--peak-child", name, "--dtypes", dtype_name(dtype)]
        cmd += ["--tokens", str(tokens), "--layers", str(args.layers)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        ok = res.returncode == 0 and lines
        summary[name]["peak"] = json.loads(lines[-1]) if ok else {"error": res.stderr[-2000:]}
    for name, row in summary.items():
        row["bytes"] = byte_counts[name]
        for base in ("masked", "dense_adamw"):
            if base != name:
                row[f"state_vs_{base}"] = (
                    byte_counts[name]["grads_master_optimizer"] / byte_counts[base]["grads_master_optimizer"]
                )
        print(
            f"step {dtype_name(dtype)} T={tokens} {name:>12}: {row['seconds_median']:.2f} s  "
            f"grads+master+opt {row['bytes']['grads_master_optimizer'] / 2**20:8.1f} MiB  "
            f"peak tensors {row['peak'].get('peak_tensor_bytes', 0) / 2**20:8.0f} MiB "
            f"RSS {row['peak'].get('peak_rss_during_step', 0) / 2**20:8.0f} MiB",
            flush=True,
        )
    return dict(
        dtype=dtype_name(dtype),
        tokens=tokens,
        layers=args.layers,
        params=n_params,
        decoder_linear_params=n_linear,
        selected_elements=n_selected,
        cases=summary,
    )


# -------------------------------------------------------------------------------------------------------------- zero
ZERO_CONFIGS = ("2-bfloat16", "3-bfloat16", "2-float32", "3-float32")


def zero_ds_config(stage: int, dtype: str) -> dict:
    zero = {"stage": stage, "reduce_bucket_size": 2**22, "allgather_bucket_size": 2**22}
    if stage == 3:
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 2**22})
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def zero_engine_bytes(engine, inner, seen_step: dict) -> dict:
    """Per-rank bytes read from a DeepSpeed engine after one step (see the module docstring)."""
    opt = engine.optimizer
    params = 0
    for p in engine.module.parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p
        params += local.numel() * local.element_size()
    grad_buffers = 0
    flat = getattr(opt, "grad_partitions_flat_buffer", None)  # ZeRO-3: persistent partitioned gradients
    if isinstance(flat, torch.Tensor):
        grad_buffers += tensor_bytes([flat])
    grad_buffers = max(grad_buffers, seen_step["grads_after_backward"])
    return dict(
        params=params,
        grads=grad_buffers,
        grads_fp32_at_step=seen_step["fp32_grads"],
        master=seen_step["master"],
        optimizer_state=tensor_bytes(t for st in inner.state.values() for t in st.values()),
    )


def zero_worker(args) -> None:
    import deepspeed

    from allo_kernels.integrations.deepspeed import skip_shm_comm_build

    skip_shm_comm_build()  # a training job never uses it; see its docstring
    deepspeed.init_distributed(dist_backend="gloo")
    import deepspeed.comm as dist

    rank = dist.get_rank()
    results = {}
    for cfg in args.zero_configs.split(","):
        stage, dtype = int(cfg.split("-")[0]), cfg.split("-")[1]
        for kind in STEP_CASES:
            model = build_llama(torch.float32, layers=args.layers)
            masks = decoder_row_masks(model)
            selected = sum(int(m.sum()) * model.get_parameter(n).shape[1] for n, m in masks.items())
            inner = make_optimizer(kind, model, masks)
            seen = {"fp32_grads": 0, "master": 0, "grads_after_backward": 0}
            step = inner.step

            def counting_step(*a, _step=step, _inner=inner, _seen=seen, **kw):
                ps = [p for g in _inner.param_groups for p in g["params"]]
                _seen["fp32_grads"] += tensor_bytes(p.grad for p in ps if p.grad is not None)
                _seen["master"] += tensor_bytes(ps)
                return _step(*a, **kw)

            inner.step = counting_step
            engine, *_ = deepspeed.initialize(model=model, optimizer=inner, config=zero_ds_config(stage, dtype))
            if isinstance(inner, ak.SparseAdamW):
                inner.bind(engine)
            g = torch.Generator().manual_seed(3 + rank)
            ids = torch.randint(0, MODEL["vocab_size"], (1, args.zero_tokens), generator=g)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            lowp = [p.grad for p in engine.module.parameters() if p.grad is not None]
            avg = getattr(engine.optimizer, "averaged_gradients", None)  # ZeRO-2: partitioned grads until step
            if isinstance(avg, dict):
                lowp += [t for v in avg.values() if v for t in v if isinstance(t, torch.Tensor)]
            seen["grads_after_backward"] = tensor_bytes(lowp)
            engine.step()
            row = zero_engine_bytes(engine, inner, seen)
            numel = {p: p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters()}
            row["trainable_elements"] = sum(n for p, n in numel.items() if p.requires_grad)
            row["model_elements"] = sum(numel.values())
            row["selected_elements"] = selected
            results[f"{cfg}-{kind}"] = row
            if rank == 0:
                print(f"zero {cfg} {kind}: {json.dumps(row)}", flush=True)
            del engine, inner, model
            gc.collect()
            dist.barrier()
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(results))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_zero(args) -> dict:
    world = 2
    with tempfile.TemporaryDirectory() as out:
        port = str(free_port())
        procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
            cmd = [sys.executable, __file__, "--zero-worker", "--out", out, "--layers", str(args.layers)]
            cmd += ["--zero-configs", args.zero_configs, "--zero-tokens", str(args.zero_tokens)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=None if rank == 0 else subprocess.DEVNULL))
        try:
            codes = [p.wait(timeout=3600) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(codes):
            raise RuntimeError(f"ZeRO workers exited with {codes}")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    return dict(world_size=world, tokens=args.zero_tokens, per_rank=ranks, derived_7b=derive_7b(ranks))


def llama7b_counts(fraction: float = FRACTION) -> dict:
    h, i, layers, v = LLAMA7B["hidden"], LLAMA7B["intermediate"], LLAMA7B["layers"], LLAMA7B["vocab"]
    linear = layers * (4 * h * h + 3 * h * i)
    total = linear + 2 * v * h + (2 * layers + 1) * h
    return dict(total=total, linear=linear, selected=round(fraction * linear))


def derive_7b(ranks: list[dict]) -> dict:
    """Per-rank bytes per 7B parameter on 1 and 8 GPUs, from the measured per-element figures at world size 2.

    Measured per element (summed over ranks): parameters per model element (deltas included; ZeRO-2 replicates
    them, so per rank), gradients and fp32 master per trainable element, optimizer state per element with state (the
    selected ones for SparseAdamW, whose state is compact; every trainable one otherwise). Gradients: the larger of
    the low-precision partition kept from backward to step and the fp32 partition DeepSpeed hands the optimizer. On G
    GPUs a rank holds params / G (ZeRO-3) or params (ZeRO-2), and everything else / G.
    """
    n7 = llama7b_counts()
    fields = ("params", "grads", "grads_fp32_at_step", "master", "optimizer_state")
    table = {}
    for key in ranks[0]:
        stage, _dtype, kind = key.split("-")  # "<stage>-<dtype>-<case>"
        stage = int(stage)
        rows = [r[key] for r in ranks]
        total = {f: sum(r[f] for r in rows) for f in fields}
        first = rows[0]
        per = dict(
            params=(total["params"] if stage == 3 else first["params"]) / first["model_elements"],
            grads=max(total["grads"], total["grads_fp32_at_step"]) / first["trainable_elements"],
            master=total["master"] / first["trainable_elements"],
            optimizer_state=total["optimizer_state"]
            / (first["selected_elements"] if kind == "masked" else first["trainable_elements"]),
        )
        trainable7 = {"dense_adamw": n7["total"], "masked": n7["linear"], "row_delta": n7["selected"]}[kind]
        count7 = dict(
            params=n7["total"] + (n7["selected"] if kind == "row_delta" else 0),
            grads=trainable7,
            master=trainable7,
            optimizer_state=n7["selected"] if kind == "masked" else trainable7,
        )
        out = {}
        for gpus in (1, 8):
            share = {f: (gpus if (f != "params" or stage == 3) else 1) for f in per}
            b = {f: per[f] * count7[f] / share[f] for f in per}
            out[f"{gpus}gpu"] = dict(
                **{f: v / n7["total"] for f, v in b.items()},
                total_bytes_per_param=sum(b.values()) / n7["total"],
                total_gb_per_rank=sum(b.values()) / 1e9,
            )
        table[key] = dict(measured_per_element=per, derived=out)
    return dict(model=dict(LLAMA7B, **n7), note="derived from the measured per-element bytes, not measured", rows=table)


# -------------------------------------------------------------------------------------------------------------- main
def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("transformers", "deepspeed"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--sections", default="layer,step,zero")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"])
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per fp32 step")
    ap.add_argument("--rounds", type=int, default=5, help="paired rounds of the fp32 step")
    ap.add_argument("--bf16-tokens", type=int, default=32)
    ap.add_argument("--bf16-rounds", type=int, default=3)
    ap.add_argument("--layer-tokens", default="64,256,1024")
    ap.add_argument("--layer-rounds", type=int, default=15)
    ap.add_argument("--bf16-layer-tokens", default="64")
    ap.add_argument("--bf16-layer-rounds", type=int, default=5)
    ap.add_argument("--zero-configs", default=",".join(ZERO_CONFIGS))
    ap.add_argument("--zero-tokens", type=int, default=8)
    ap.add_argument("--peak-child", help=argparse.SUPPRESS)
    ap.add_argument("--zero-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: CPU time measures work)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    if args.peak_child:
        print(json.dumps(peak_child(args.peak_child, dtypes[0], args.layers, args.tokens)))
        return
    if args.zero_worker:
        zero_worker(args)
        return
    sections = args.sections.split(",")
    report = dict(
        benchmark="row_delta-cpu",
        device=f"cpu ({os.cpu_count()} cores)",
        cpu=cpu_model(),
        threads=torch.get_num_threads(),
        model=dict(MODEL, row_fraction=FRACTION),
        versions=dict(torch=torch.__version__, python=platform.python_version(), **library_versions()),
        note=(
            "paired rounds: every case alive at once, one run each per round, order reversed every other round; "
            "time_vs_X: ours / X per round (< 1 is faster), median with 10th-90th percentiles. The 2-core machine "
            "is shared with other jobs."
        ),
    )
    if "layer" in sections:
        report["layer"] = {dtype_name(d): bench_layer(args, d) for d in dtypes}
    if "step" in sections:
        report["step"] = {dtype_name(d): bench_step(args, d) for d in dtypes}
    if "zero" in sections:
        report["zero"] = bench_zero(args)
        print(json.dumps(report["zero"]["derived_7b"], indent=1))
    if args.json:
        if args.json.exists():  # what ran now replaces its entries (section, or section and dtype); the rest stays
            old = json.loads(args.json.read_text())
            for key in ("layer", "step"):
                if key in old and key in report:
                    report[key] = {**old[key], **report[key]}
            report = {**old, **report}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
