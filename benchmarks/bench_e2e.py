"""One ALLO training step end to end on a Llama-shaped model: ours against the official-ALLO-style loop.

Cases (``case`` in the results): ``forget`` (token-weighted NPO on a batch of responses to forget) and ``improve``
(masked DPO on a ``[chosen; rejected]`` batch: the rejected responses keep their 10% lowest log-ratio tokens). One
step = forward, loss, backward, optimizer step, ``zero_grad(set_to_none=True)``. Single device, no DeepSpeed.

* ``allo``      what ``allo_train`` runs: ``allo_train.model.PolicyHiddenStates`` (final hidden states, the model's
                lm_head never called), the fused-linear kernels through ``allo_kernels.forgetting_loss`` /
                ``preference_loss(mask_fraction=0.9, mask_by="highest")`` with precomputed per-token reference
                log-probs, and ``allo_kernels.SparseAdamW`` with 10% row masks (Adam state and, for bf16 models, fp32
                master rows for the selected rows only).
* ``official``  the official ALLO loop (RUCAIBox/ALLO ``train_forgetting.py`` / ``train_improving.py``) on one device,
                written here from its code: full logits ``.float()``, shifted ``.contiguous()`` copy,
                ``CrossEntropyLoss(reduction="none")`` per token, the improving stage's per-row Python top-k mask loop
                (``gen_mask``: a CPU tensor filled row by row, ``k = int(eps * T)``), and ``MaskAdamW_HF``: dense fp32
                ``exp_avg``/``exp_avg_sq`` for every trainable weight, the update multiplied by a dense mask that
                lives on the host and is copied to the device at every step. For a bf16 model it updates dense fp32
                master weights (what DeepSpeed's bf16 optimizer keeps) and copies them back.
* ``official_devmask`` the same with the dense masks resident on the device instead of copied from the host at every
                step (the official code's per-step copy of 2 bytes per trainable weight is part of ``official``; this
                variant shows the loop without it). CUDA only (on CPU it is ``official``).

Both use the same model, the same trainable weights (the attention and MLP projections of every layer, 10% of the
rows of each selected at random; embeddings, norms and lm_head frozen, as ``allo_train``'s default ``exclude``),
the same masks and the same per-token reference log-probs given as inputs. Left out of the baseline, so it is a lower
bound of the official cost: its improving stage also runs a reference model forward every step (TRL 0.8.2 with a
``ref_model``), and it trains (with dense state) the embeddings and lm_head too.

GPU shape: a ~1.3B Llama (hidden 2048, 16 layers, 16 heads, intermediate 5504, vocab 128256) built randomly from a
``LlamaConfig`` (no download), bf16, T=1024, 2 pairs (4 rows; the forget batch is 4 rows too). CPU: the tiny Llama of
``allo_train.model.build_tiny_llama`` with the character tokenizer, fp32, T=64.

Recorded per row: median step time, ``tokens_per_s`` (rows * T / time), and on CUDA ``peak_mem_mb`` = the ABSOLUTE
peak allocated during one step (weights, gradients, optimizer state, activations, logits: unlike the other suites,
not only the memory beyond the inputs) and ``static_mb`` = what stays allocated between steps. DESIGN targets (GPU):
``allo`` >= 1.5x tokens/s and <= 0.5x peak memory of ``official``.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import allo_kernels as ak
from allo_kernels._backend import select_backend
from benchmarks.conftest import (
    bench_device,
    dtype_name,
    format_shape,
    free_memory,
    full_shapes,
    is_oom,
    record_skip,
    run_benchmark,
    sync,
    timing_fields,
)

SUITE = "e2e_step"
DEVICE = bench_device()
BETA = 0.1
EPS_KEEP = 0.1  # improving stage: keep the 10% lowest log-ratio rejected tokens
ROW_FRACTION = 0.1  # neurons (rows) trained per weight
LR = 5e-6
TRAINABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = ("forget", "improve")
IMPLS = ("allo", "official", "official_devmask")


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int  # 0: the character tokenizer's
    seq_len: int
    pairs: int
    dtype: torch.dtype

    def params(self, vocab: int) -> dict:
        return {"H": self.hidden, "L": self.layers, "V": vocab, "T": self.seq_len, "rows": 2 * self.pairs}


GPU_SPEC = ModelSpec(
    hidden=2048, layers=16, heads=16, intermediate=5504, vocab=128256, seq_len=1024, pairs=2, dtype=torch.bfloat16
)
CPU_SPEC = ModelSpec(hidden=64, layers=2, heads=4, intermediate=256, vocab=0, seq_len=64, pairs=2, dtype=torch.float32)
SPEC = GPU_SPEC if full_shapes() else CPU_SPEC


# ------------------------------------------------------------------------------------------------ the official loop
class OfficialMaskAdamW(torch.optim.Optimizer):
    """``MaskAdamW_HF`` of RUCAIBox/ALLO on one device (world size 1), for the baseline.

    Dense fp32 ``exp_avg``/``exp_avg_sq`` of every param's full shape; HF-style bias correction
    (``step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)``, ``denom = sqrt(v) + eps``); the update is multiplied by the
    mask: ``p.addcdiv_(exp_avg * mask, denom, value=-step_size)``; weight decay (0 in ALLO's scripts) unmasked, after.
    The masks (``{param: bool/float tensor of p's shape, or [R] rows}``) are kept as dense bf16 tensors on the host
    and copied to the param's device at every step, as the official code does. ``master_weights=True`` (bf16/fp16
    params): the update goes to a dense fp32 master copy (DeepSpeed bf16's), gradients upcast per param, and the
    param is overwritten with the master.
    """

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=0.0,
        *,
        masks: dict,
        master_weights: bool = False,
        masks_on_host: bool = True,
    ):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.master_weights = master_weights
        self.host_masks = {}
        for p, m in masks.items():
            m = m.detach().to("cpu")
            if m.dim() == 1 and p.dim() > 1:
                m = m.view(-1, *([1] * (p.dim() - 1))).expand(p.shape)
            m = m.to(torch.bfloat16).contiguous()  # gen_neuron_mask.py saves bf16 masks
            # masks_on_host=False: resident on the device instead (no copy per step, device memory instead)
            self.host_masks[p] = m if masks_on_host else m.to(p.device)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                mask = self.host_masks[p].to(p.device)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    if self.master_weights:
                        state["master"] = p.detach().float().clone()
                target = state["master"] if self.master_weights else p
                grad = p.grad.float() if p.grad.dtype != torch.float32 else p.grad
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                target.addcdiv_(exp_avg * mask, denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    target.add_(target, alpha=-group["lr"] * group["weight_decay"])
                if self.master_weights:
                    p.copy_(target)
                del grad, denom, mask
        return None


def official_shifted_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logits.float()``; ``shift_logits = logits[..., :-1, :].contiguous()``; ``-CrossEntropyLoss(reduction="none")``
    against ``labels[..., 1:]`` (0 at ignored labels). Returns [B, T-1]."""
    logits = logits.float()
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    v = shift_logits.shape[-1]
    logp = -F.cross_entropy(shift_logits.view(-1, v), shift_labels.view(-1), reduction="none")
    return logp.view(shift_labels.shape)


def official_forget_loss(logits, labels, ref, reward, *, beta: float = BETA) -> torch.Tensor:
    """``LlamaForFGNPO.forward``: ``sum(-r * logsigmoid(-beta * (logp - ref))) / #{r != 0}``; ``ref``/``reward``
    are [B, T-1], already aligned with the shifted labels."""
    logp = official_shifted_logprobs(logits, labels).view(-1)
    reward, ref = reward.reshape(-1), ref.reshape(-1)
    num_label = torch.sum(torch.ne(reward, 0.0))
    loss = -reward * F.logsigmoid(-beta * (logp - ref))
    return loss.sum() / num_label


def official_gen_mask(epsilon: float, t: torch.Tensor, c: float) -> torch.Tensor:
    """``MaskDPOTrainer.dpo_loss.gen_mask``: a CPU mask filled row by row from one top-k per row."""
    with torch.no_grad():
        num_selected = int(t.size(-1) * epsilon)
        mask = torch.zeros(t.size(0), t.size(1))
        for i in range(t.size(0)):
            cand_tensor = t[i, :] * c
            cand_tensor = torch.where(cand_tensor == 0, -1e10, cand_tensor)
            tk = cand_tensor.topk(num_selected).values[-1]
            mask[i, :] = torch.where(cand_tensor >= tk, 1.0, 0.0)
        return mask.to(t.device)


def official_improve_loss(logits, labels, ref, *, eps: float = EPS_KEEP, beta: float = BETA) -> torch.Tensor:
    """``MaskDPOTrainer``: per-token log-probs of ``[chosen; rejected]`` (0 at ignored), chosen log-ratio summed,
    rejected log-ratio masked by ``gen_mask(eps, ., -1)`` (its ``int(eps * T)`` lowest tokens), sigmoid DPO."""
    valid = (labels[..., 1:] != -100).float()
    logp = official_shifted_logprobs(logits, labels) * valid
    ref = ref * valid
    half = labels.shape[0] // 2
    chosen_logratios = logp[:half] - ref[:half]
    rejected_logratios = logp[half:] - ref[half:]
    mask = official_gen_mask(eps, rejected_logratios, -1)
    margin = chosen_logratios.sum(-1) - (rejected_logratios * mask).sum(-1)
    return (-F.logsigmoid(beta * margin)).mean()


# ------------------------------------------------------------------------------------------------------------ ours
def allo_forget_loss(hidden, lm_head_weight, labels, ref, reward, *, beta: float = BETA) -> torch.Tensor:
    """hidden [B, T, H] of the full sequence; ``ref``/``reward`` [B, T-1] aligned with ``labels[:, 1:]``."""
    return ak.forgetting_loss(
        hidden[:, :-1], labels[:, 1:], lm_head_weight=lm_head_weight, ref_logprobs=ref, weights=reward, beta=beta
    )[0]


def allo_improve_loss(hidden, lm_head_weight, labels, ref, *, eps: float = EPS_KEEP, beta: float = BETA):
    return ak.preference_loss(
        hidden[:, :-1],
        labels[:, 1:],
        lm_head_weight=lm_head_weight,
        ref_logprobs=ref,
        beta=beta,
        mask_fraction=1.0 - eps,
        mask_by="highest",
        mask_side="rejected",
    )[0]


# ----------------------------------------------------------------------------------------------------------- model
_MODEL: dict = {}


def get_model(spec: ModelSpec):
    """The benchmarked causal LM (cached: both implementations train the same instance)."""
    if spec not in _MODEL:
        _MODEL.clear()
        free_memory(DEVICE)
        from transformers import AutoModelForCausalLM, LlamaConfig

        if spec.vocab == 0:
            from allo_train.model import build_tiny_llama, load_causal_lm
            from allo_train.tokenizer import build_char_tokenizer

            tokenizer = build_char_tokenizer()
            with tempfile.TemporaryDirectory(prefix="allo-bench-e2e-") as tmp:
                path = build_tiny_llama(
                    tokenizer,
                    f"{tmp}/tiny",
                    hidden_size=spec.hidden,
                    num_layers=spec.layers,
                    num_heads=spec.heads,
                    intermediate_size=spec.intermediate,
                    max_position_embeddings=max(256, spec.seq_len),
                )
                model = load_causal_lm(path, dtype=spec.dtype)
        else:
            config = LlamaConfig(
                vocab_size=spec.vocab,
                hidden_size=spec.hidden,
                intermediate_size=spec.intermediate,
                num_hidden_layers=spec.layers,
                num_attention_heads=spec.heads,
                num_key_value_heads=spec.heads,
                max_position_embeddings=max(4096, spec.seq_len),
                tie_word_embeddings=False,
            )
            torch.manual_seed(0)
            with torch.device(DEVICE):  # initialise on the device: a CPU init of 1.3B params takes minutes
                model = AutoModelForCausalLM.from_config(config, dtype=spec.dtype, attn_implementation="sdpa")
        model.to(DEVICE)
        model.train()
        for m in model.modules():  # dropout off, as TRL does; Llama has none at p=0 anyway
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        _MODEL[spec] = model
    return _MODEL[spec]


def trainable_masks(model, *, fraction: float = ROW_FRACTION, seed: int = 0) -> dict:
    """{param: bool row mask}: ``fraction`` of the rows of every attention/MLP projection, chosen at random; every other
    parameter frozen. Sets ``requires_grad`` accordingly."""
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and any(f"{t}." in name for t in TRAINABLE):
            p.requires_grad_(True)
            rows = p.shape[0]
            k = max(1, round(fraction * rows))
            m = torch.zeros(rows, dtype=torch.bool)
            m[torch.randperm(rows, generator=gen)[:k]] = True
            masks[p] = m.to(p.device)
        else:
            p.requires_grad_(False)
    return masks


def make_batch(spec: ModelSpec, vocab: int, case: str, *, seed: int = 0):
    """input ids [R, T] (R = 2 * pairs), labels (-100 on the first quarter: the prompt), and per-token reference
    log-probs (and forget weights) [R, T-1] aligned with ``labels[:, 1:]``, 0 at ignored positions."""
    rows, t = 2 * spec.pairs, spec.seq_len
    gen = torch.Generator().manual_seed(seed + (1 if case == "improve" else 0))
    low = 4 if vocab > 8 else 0  # skip the special tokens of the character tokenizer
    ids = torch.randint(low, vocab, (rows, t), generator=gen)
    labels = ids.clone()
    labels[:, : t // 4] = -100
    valid = labels[:, 1:] != -100
    ref = torch.where(valid, -math.log(vocab) - 0.5 + torch.randn(rows, t - 1, generator=gen), 0.0)
    reward = torch.where(valid, torch.rand(rows, t - 1, generator=gen), 0.0)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, ref=ref, reward=reward)
    return {k: v.to(DEVICE) for k, v in batch.items()}


def make_step(impl: str, case: str, model, masks: dict, batch: dict):
    """(step function, optimizer) for one implementation and stage."""
    params = list(masks)
    low_precision = next(iter(params)).dtype in (torch.bfloat16, torch.float16)
    if impl == "allo":
        from allo_train.model import PolicyHiddenStates

        policy = PolicyHiddenStates(model)
        opt = ak.SparseAdamW(params, lr=LR, masks=masks, master_weights=low_precision)
        head = policy.lm_head.weight

        def loss_fn():
            hidden = policy(batch["input_ids"], batch["attention_mask"])
            if case == "forget":
                return allo_forget_loss(hidden, head, batch["labels"], batch["ref"], batch["reward"])
            return allo_improve_loss(hidden, head, batch["labels"], batch["ref"])

    else:
        opt = OfficialMaskAdamW(
            params, lr=LR, masks=masks, master_weights=low_precision, masks_on_host=impl == "official"
        )

        def loss_fn():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            if case == "forget":
                return official_forget_loss(logits, batch["labels"], batch["ref"], batch["reward"])
            return official_improve_loss(logits, batch["labels"], batch["ref"])

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, opt


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for t in st.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )


# ------------------------------------------------------------------------------------------------------------ cases
@pytest.mark.parametrize(("case", "impl"), [pytest.param(c, i, id=f"{c}-{i}") for c in CASES for i in IMPLS])
def test_e2e_step(benchmark, results, case, impl):
    spec = SPEC
    dname = dtype_name(spec.dtype)
    model = get_model(spec)
    vocab = model.config.vocab_size
    params = spec.params(vocab)
    if DEVICE.type != "cuda" and impl == "allo" and select_backend(DEVICE) == "triton":
        record_skip(
            results,
            suite=SUITE,
            case=case,
            impl=impl,
            params=params,
            dtype=dname,
            reason="Triton interpreter timings are meaningless: unset TRITON_INTERPRET for benchmarks",
        )
    if DEVICE.type != "cuda" and impl == "official_devmask":
        record_skip(
            results,
            suite=SUITE,
            case=case,
            impl=impl,
            params=params,
            dtype=dname,
            reason="CPU: host and device are the same memory (identical to official)",
        )
    masks = trainable_masks(model)
    batch = make_batch(spec, vocab, case)
    tokens = batch["input_ids"].numel()
    base = {
        "suite": SUITE,
        "case": case,
        "impl": impl,
        "shape": format_shape(params),
        "params": params,
        "dtype": dname,
        "ours": impl == "allo",
    }
    step = opt = None
    try:
        step, opt = make_step(impl, case, model, masks, batch)
        assert torch.isfinite(step()), f"{impl} {case}: non-finite loss"
        m = run_benchmark(benchmark, step, device=DEVICE, track_memory=False)
        peak_mb = static_mb = None
        if DEVICE.type == "cuda":
            sync(DEVICE)
            static_mb = torch.cuda.memory_allocated(DEVICE) / 2**20
            torch.cuda.reset_peak_memory_stats(DEVICE)
            step()
            sync(DEVICE)
            peak_mb = torch.cuda.max_memory_allocated(DEVICE) / 2**20
        opt_state_mb = state_bytes(opt) / 2**20
    except Exception as exc:
        if not is_oom(exc):
            raise
        message = (str(exc).splitlines() or ["out of memory"])[0][:200]
        step = opt = None
        for p in model.parameters():
            p.grad = None
        free_memory(DEVICE)
        results.add({**base, "status": "oom", "error": message})
        pytest.skip(f"out of memory: {impl} {case}")
    finally:
        for p in model.parameters():
            p.grad = None
        del step, opt
        free_memory(DEVICE)
    if m is None:  # --benchmark-disable
        return
    results.add(
        {
            **base,
            "status": "ok",
            **timing_fields(m),
            "tokens_per_s": tokens / m.median_s,
            "peak_mem_mb": peak_mb,
            "static_mb": static_mb,
            "opt_state_mb": opt_state_mb,
            "note": _note(impl),
            "backend": select_backend(DEVICE) if impl == "allo" else None,
        }
    )
    benchmark.extra_info.update(
        {
            "median_ms": m.median_s * 1e3,
            "tokens_per_s": tokens / m.median_s,
            "peak_mem_mb": peak_mb,
            "opt_state_mb": opt_state_mb,
        }
    )


def _note(impl: str) -> str:
    if impl == "allo":
        where = "" if DEVICE.type == "cuda" else "; CPU: torch path of the kernels, native SparseAdamW"
        return "PolicyHiddenStates + fused-linear losses + SparseAdamW (10% rows)" + where
    if impl == "official":
        return "logits.float() + CE(none) + gen_mask loop + MaskAdamW_HF (dense fp32 state, host masks copied per step)"
    return "official with the dense bf16 masks resident on the device (no per-step copy; more device memory)"
