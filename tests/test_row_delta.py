"""Row deltas (allo_kernels.ops.row_delta, allo_kernels.row_deltas): math, training equivalence, merge, files, errors.

The layer is checked against a dense reference (a trainable W' = W with the selected rows plus D), in float64 by
gradcheck, and by FLOP count (no weight-gradient GEMM for W). Training with deltas + torch.optim.AdamW is checked
against SparseAdamW's row-masked path, the merged model against the model in training (through save_pretrained /
from_pretrained), and the delta file against a fresh base model. DeepSpeed runs are in test_row_delta_zero.py.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import allo_kernels as ak
from allo_kernels.ops.row_delta import (
    ADDITIVE_BELOW,
    ADDITIVE_BELOW_TOKENS,
    FORMS,
    RowDeltaLinear,
    choose_form,
    effective_weight,
    row_delta_linear,
)
from allo_kernels.row_deltas import FROZEN_ONLY_ATTR

transformers = pytest.importorskip("transformers")

FP32 = dict(atol=1e-5, rtol=1e-5)  # docs/design.md: fp32 atol 1e-5
BF16_RTOL = 1.6e-2  # bf16 judged against an fp32 reference of the same inputs (a few bf16 roundings)
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_mask(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(n, dtype=torch.bool)
    m[torch.randperm(n, generator=g)[:k]] = True
    return m


def dense_reference(x, weight, bias, delta, index, axis):
    """y = x W'^T + b with W' = W (+ D on the selected rows/columns) as one trainable dense fp64/fp32 tensor."""
    w = weight.detach().clone()
    if axis == 0:
        w[index] += delta.detach().to(w.dtype)
    else:
        w[:, index] += delta.detach().to(w.dtype)
    w.requires_grad_()
    x = x.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    return F.linear(x, w, b), x, w, b


# --------------------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize(
    "x_shape,out_f,k",
    [((3, 7, 19), 37, 5), ((1, 19), 37, 1), ((4, 19), 37, 37), ((2, 5, 64), 96, 10)],
    ids=["3d", "one-token", "all-rows", "square-ish"],
)
def test_forward_backward_match_dense_reference_fp32(axis, x_shape, out_f, k, form):
    g = torch.Generator().manual_seed(0)
    in_f = x_shape[-1]
    weight = torch.randn(out_f, in_f, generator=g) * 0.2
    bias = torch.randn(out_f, generator=g).requires_grad_()
    n = out_f if axis == 0 else in_f
    index = random_mask(n, min(k, n), 1).nonzero().flatten()
    shape = (index.numel(), in_f) if axis == 0 else (out_f, index.numel())
    delta = (torch.randn(shape, generator=g) * 0.1).requires_grad_()
    x = torch.randn(x_shape, generator=g).requires_grad_()
    dy = torch.randn(*x_shape[:-1], out_f, generator=g)

    y = row_delta_linear(x, weight, delta, index, bias=bias, axis=axis, form=form)
    y.backward(dy)
    y_ref, x_ref, w_ref, b_ref = dense_reference(x, weight, bias, delta, index, axis)
    y_ref.backward(dy)

    tol = FP32
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(bias.grad, b_ref.grad, **tol)
    want_dd = w_ref.grad[index] if axis == 0 else w_ref.grad[:, index]
    torch.testing.assert_close(delta.grad, want_dd, **tol)
    assert weight.grad is None


@pytest.mark.parametrize("form", FORMS)
def test_non_contiguous_input_and_frozen_bias(form):
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(12, 8, generator=g), torch.randn(12, generator=g)
    index = torch.tensor([0, 5, 11])
    delta = torch.randn(3, 8, generator=g).requires_grad_()
    x = torch.randn(8, 6, generator=g).t().requires_grad_()  # [6, 8], strided
    y = row_delta_linear(x, weight, delta, index, bias=bias, form=form)
    y.sum().backward()
    y_ref, x_ref, w_ref, _ = dense_reference(x, weight, bias, delta, index, 0)
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(x.grad, x_ref.grad, **FP32)
    torch.testing.assert_close(delta.grad, w_ref.grad[index], **FP32)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.bfloat16])
def test_bf16_layer_against_fp32_reference_of_the_same_inputs(axis, delta_dtype, form):
    g = torch.Generator().manual_seed(3)
    weight = (torch.randn(48, 40, generator=g) * 0.2).bfloat16()
    index = random_mask(48 if axis == 0 else 40, 7, 4).nonzero().flatten()
    shape = (7, 40) if axis == 0 else (48, 7)
    delta = (torch.randn(shape, generator=g) * 0.05).to(delta_dtype).requires_grad_()
    x = torch.randn(3, 9, 40, generator=g).bfloat16().requires_grad_()
    dy = torch.randn(3, 9, 48, generator=g).bfloat16()
    y = row_delta_linear(x, weight, delta, index, axis=axis, form=form)
    y.backward(dy)
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and delta.grad.dtype == delta_dtype
    # fp32 reference of the same inputs: the bf16 path's only differences are its roundings (W[R] + D once, the output)
    y_ref, x_ref, w_ref, _ = dense_reference(x.float(), weight.float(), None, delta.float(), index, axis)
    y_ref.backward(dy.float())
    torch.testing.assert_close(y.float(), y_ref, atol=2e-2, rtol=BF16_RTOL)
    torch.testing.assert_close(x.grad.float(), x_ref.grad, atol=2e-2, rtol=BF16_RTOL)
    want_dd = w_ref.grad[index] if axis == 0 else w_ref.grad[:, index]
    torch.testing.assert_close(delta.grad.float(), want_dd, atol=2e-2, rtol=BF16_RTOL)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("axis", [0, 1])
def test_gradcheck_float64(axis, form):
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(9, 6, generator=g, dtype=torch.float64)
    bias = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([1, 4, 5]) if axis == 0 else torch.tensor([0, 3])
    shape = (3, 6) if axis == 0 else (9, 2)
    delta = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, d, b: row_delta_linear(x, weight, d, index, bias=b, axis=axis, form=form), (x, delta, bias)
    )


@pytest.mark.parametrize("form,skinny_gemms", [("effective_weight", 1), ("additive", 3)])
def test_no_weight_gradient_gemm(form, skinny_gemms):
    """GEMM FLOPs of forward + backward: x W^T and dy W (2 full GEMMs) plus skinny ones of k/out: dD (and, additive,
    x D^T and dy[..., R] D). No weight-gradient GEMM for W; a dense trainable layer costs 3 full GEMMs."""
    n_tok, in_f, out_f, k = 64, 32, 48, 6
    weight = torch.randn(out_f, in_f)
    index = random_mask(out_f, k, 0).nonzero().flatten()
    delta = torch.zeros(k, in_f, requires_grad=True)
    x = torch.randn(n_tok, in_f, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        row_delta_linear(x, weight, delta, index, form=form).sum().backward()
    gemm = 2 * n_tok * in_f * out_f
    assert counter.get_total_flops() == 2 * gemm + skinny_gemms * gemm * k // out_f
    dense = nn.Linear(in_f, out_f)
    with FlopCounterMode(display=False) as counter:
        dense(x).sum().backward()
    assert counter.get_total_flops() == 3 * gemm


def test_the_form_follows_the_cost_rule():
    """Few tokens: the additive form (no W_eff to form); many: W_eff (one GEMM forward). A cast copy of W (autocast)
    costs all of W, so there the switch depends on the selected rows too. Same values either way."""
    layer = nn.Sequential(nn.Linear(64, 40))
    ak.attach_row_deltas(layer, {"0.weight": random_mask(40, 4, 0)})
    lin = layer[0]
    rule = (lin.weight, lin.weight_delta_index, 0)
    limit = ADDITIVE_BELOW_TOKENS["cpu"]  # W_eff formed in place: tokens where the forms switch
    assert choose_form(limit - 1, *rule, torch.float32) == "additive"
    assert choose_form(limit, *rule, torch.float32) == "effective_weight"
    cast_limit = ADDITIVE_BELOW["cpu"] * 40 // 4  # W_eff as a bf16 cast copy of the fp32 W
    assert choose_form(cast_limit - 1, *rule, torch.bfloat16) == "additive"
    assert choose_form(cast_limit, *rule, torch.bfloat16) == "effective_weight"
    limit = max(limit, cast_limit)
    with torch.no_grad():
        lin.weight_delta.normal_()
    x = torch.randn(limit, 64)
    for form in FORMS:
        torch.testing.assert_close(
            row_delta_linear(x, lin.weight, lin.weight_delta, lin.weight_delta_index, bias=lin.bias, form=form),
            layer(x),
            **FP32,
        )
    with pytest.raises(ValueError, match="form must be one of"):
        row_delta_linear(x, lin.weight, lin.weight_delta, lin.weight_delta_index, form="dense")


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w_eff_formed_in_place_leaves_w_bit_identical_even_on_an_error(axis, dtype):
    """W's storage holds W_eff only during the GEMMs: afterwards (and after a GEMM that raised) every bit of W is
    back, autograd's version counter did not move (a W saved by another op still backpropagates), and the GEMMs saw
    exactly the W_eff a fresh copy would be."""
    torch.manual_seed(3)
    out_f, in_f, k = 24, 16, 5
    weight = torch.randn(out_f, in_f).to(dtype)
    before, version = weight.clone(), weight._version
    index = random_mask(weight.shape[axis], k, 2).nonzero().flatten()
    delta = (torch.randn(k, in_f) if axis == 0 else torch.randn(out_f, k)).requires_grad_()
    x = torch.randn(70, in_f).to(dtype).requires_grad_()  # >= ADDITIVE_BELOW_TOKENS["cpu"]: the W_eff form
    x_other = torch.randn(3, in_f).to(dtype).requires_grad_()
    other = x_other @ weight.t()  # saves W for its backward
    y = row_delta_linear(x, weight, delta, index, axis=axis)
    w_eff = effective_weight(weight, delta.detach(), index, axis, dtype)
    assert torch.equal(y, x.detach() @ w_eff.t())  # the same GEMM operands, bit for bit
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.equal(x.grad, dy @ w_eff)
    assert torch.equal(weight, before) and weight._version == version
    other.sum().backward()  # W's version counter is what that op saved: no "modified by an inplace operation"
    torch.testing.assert_close(x_other.grad, torch.ones(3, out_f, dtype=dtype) @ before, atol=0, rtol=0)
    with pytest.raises(RuntimeError):
        row_delta_linear(torch.randn(70, in_f + 1).to(dtype), weight, delta, index, axis=axis)  # the GEMM raises
    assert torch.equal(weight, before) and weight._version == version


@pytest.mark.parametrize("n_tokens", [4, 200], ids=["additive", "effective_weight"])
def test_autocast_computes_in_the_autocast_dtype_like_nn_linear(n_tokens):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 24))
    plain = copy.deepcopy(model)
    deltas = ak.attach_row_deltas(model, {"0.weight": random_mask(24, 5, 1)})
    x = torch.randn(n_tokens, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        y_plain = plain(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_plain, atol=0, rtol=0)  # zero delta: the same bf16 computation
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and deltas["0.weight"].grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ models and training
def tiny_llama(seed: int = 0, dtype=torch.float32, **kw):
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **kw,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def decoder_masks(model, fraction: float = 0.25, seed: int = 0) -> dict[str, torch.Tensor]:
    masks = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if any(f".{n}." in name for n in DECODER_LINEARS):
            masks[name] = random_mask(p.shape[0], max(1, round(fraction * p.shape[0])), seed + i)
    return masks


def batches(steps: int, seed: int = 1, vocab: int = 64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 12), generator=g) for _ in range(steps)]


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def train(model, opt, data):
    for ids in data:
        opt.zero_grad(set_to_none=True)
        lm_loss(model, ids).backward()
        opt.step()


def masked_optimizer(model, masks, *, lr, wd):
    """Today's path: the named weights trainable, SparseAdamW row-masked (torch backend: the reference)."""
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    for n in masks:
        params[n].requires_grad_(True)
    return ak.SparseAdamW(
        [params[n] for n in masks],
        lr=lr,
        weight_decay=wd,
        masks={params[n]: m for n, m in masks.items()},
        backend="torch",
    )


def train_masked(masks, data, *, lr, wd):
    model = tiny_llama()
    train(model, masked_optimizer(model, masks, lr=lr, wd=wd), data)
    return model


def train_deltas(masks, data, *, lr, wd):
    model = tiny_llama()
    model.requires_grad_(False)
    deltas = ak.attach_row_deltas(model, masks)
    opt = torch.optim.AdamW(deltas.values(), lr=lr, weight_decay=wd)
    train(model, opt, data)
    return model, deltas


def test_twelve_steps_match_sparse_adamw_row_masked_and_merge_keeps_unselected_bits():
    base = tiny_llama().state_dict()
    masks = decoder_masks(tiny_llama(), fraction=0.25)
    data = batches(12)
    masked = train_masked(masks, data, lr=1e-3, wd=0.0).state_dict()
    model, deltas = train_deltas(masks, data, lr=1e-3, wd=0.0)
    assert set(deltas) == set(masks)
    merged = ak.merge_row_deltas(model)
    assert sorted(merged) == sorted(masks)
    got = model.state_dict()
    assert list(got) == list(base)  # names (and order) as before attach
    assert all(type(m) is not RowDeltaLinear for m in model.modules())
    worst = 0.0
    for name, b in base.items():
        if name not in masks:
            assert torch.equal(got[name], b), name  # never trained
            continue
        m = masks[name]
        assert torch.equal(got[name][~m], b[~m]), name  # unselected rows: the same bits
        update = (masked[name][m] - b[m]).abs().max()
        assert update > 1e-4  # the selected rows did train
        worst = max(worst, float((got[name][m] - masked[name][m]).abs().max() / update))
    assert worst < 1e-5, worst


def test_column_deltas_match_sparse_adamw_column_element_masks():
    """axis=1 on the down projections equals SparseAdamW with element masks that select whole columns."""
    model = tiny_llama()
    names = [n for n, _ in model.named_parameters() if n.endswith("down_proj.weight")]
    params = dict(model.named_parameters())
    cols = {n: random_mask(params[n].shape[1], 12, i) for i, n in enumerate(names)}
    data = batches(6, seed=3)
    ref = tiny_llama()
    ref.requires_grad_(False)
    rp = dict(ref.named_parameters())
    for n in names:
        rp[n].requires_grad_(True)
    opt = ak.SparseAdamW(
        [rp[n] for n in names],
        lr=1e-3,
        masks={rp[n]: cols[n].expand_as(rp[n]).contiguous() for n in names},
        backend="torch",
    )
    train(ref, opt, data)
    model.requires_grad_(False)
    deltas = ak.attach_row_deltas(model, cols, axis=1)
    assert all(d.shape == (params[n].shape[0], 12) for n, d in deltas.items())
    train(model, torch.optim.AdamW(deltas.values(), lr=1e-3, weight_decay=0.0), data)
    ak.merge_row_deltas(model)
    for n in names:
        torch.testing.assert_close(params[n], rp[n], atol=1e-7, rtol=1e-5)


def test_weight_decay_pulls_deltas_toward_the_base_weights_not_zero():
    lr, wd = 1e-2, 0.1
    masks = decoder_masks(tiny_llama(), fraction=0.25)
    base = tiny_llama().state_dict()
    # one step from the same weights: same gradient, same Adam update; the decay differs by lr * wd * W[R]
    data = batches(1)
    masked = train_masked(masks, data, lr=lr, wd=wd).state_dict()
    model, _ = train_deltas(masks, data, lr=lr, wd=wd)
    ak.merge_row_deltas(model)
    got = model.state_dict()
    for name, m in masks.items():
        torch.testing.assert_close(got[name][m] - masked[name][m], lr * wd * base[name][m], atol=1e-7, rtol=1e-4)
    # zero gradients (the loss does not depend on the weights): the delta stays 0, the masked rows shrink to zero
    zero = [torch.zeros(2, 12, dtype=torch.long)] * 12

    class NoGrad(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, labels):
            return type("Out", (), {"loss": self.inner(input_ids=input_ids).logits.sum() * 0.0})()

    model, deltas = train_deltas(masks, [], lr=lr, wd=wd)
    opt = torch.optim.AdamW(deltas.values(), lr=lr, weight_decay=wd)
    train(NoGrad(model), opt, zero)
    ak.merge_row_deltas(model)
    for name, p in model.state_dict().items():
        assert torch.equal(p, base[name]), name
    masked = tiny_llama()
    params = dict(masked.named_parameters())
    train(NoGrad(masked), masked_optimizer(masked, masks, lr=lr, wd=wd), zero)
    for name, m in masks.items():
        torch.testing.assert_close(params[name][m], base[name][m] * (1 - lr * wd) ** 12, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_model_from_pretrained_gives_the_training_logits(tmp_path, dtype):
    tiny_llama().save_pretrained(tmp_path / "base")

    def load(path):  # both models built by from_pretrained: the same buffers (rotary inv_freq) and dtypes
        return transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=dtype).eval()

    model = load(tmp_path / "base")
    model.requires_grad_(False)
    deltas = ak.attach_row_deltas(model, decoder_masks(model, fraction=0.3))  # fp32 deltas on a bf16 model too
    train(model, torch.optim.AdamW(deltas.values(), lr=1e-2, weight_decay=0.0), batches(4))
    # 128 tokens: every layer takes the effective-weight form (few tokens take the additive one, equal up to rounding)
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        training_logits = model(input_ids=ids).logits
        few_tokens_logits = model(input_ids=ids[:1, :8]).logits
    ak.merge_row_deltas(model)
    model.save_pretrained(tmp_path / "merged")
    loaded = load(tmp_path / "merged")
    assert all(type(m) is not RowDeltaLinear for m in loaded.modules())
    with torch.no_grad():
        loaded_logits = loaded(input_ids=ids).logits
        loaded_few = loaded(input_ids=ids[:1, :8]).logits
    # the layer in training computes with round(W[R] + D), the very weights the merge writes: the same logits
    torch.testing.assert_close(loaded_logits, training_logits, atol=0, rtol=0)
    tol = FP32 if dtype == torch.float32 else dict(atol=2e-2, rtol=BF16_RTOL)
    torch.testing.assert_close(loaded_few, few_tokens_logits, **tol)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(loaded.state_dict()[name], load(tmp_path / "base").state_dict()[name])


def test_save_and_load_deltas_onto_a_fresh_base_model(tmp_path):
    masks = decoder_masks(tiny_llama(), fraction=0.25)
    down = {n: random_mask(48, 6, 7) for n in masks if n.endswith("down_proj.weight")}
    model = tiny_llama()
    model.requires_grad_(False)
    deltas = ak.attach_row_deltas(model, {n: m for n, m in masks.items() if n not in down})
    deltas |= ak.attach_row_deltas(model, down, axis=1)
    train(model, torch.optim.AdamW(deltas.values(), lr=1e-2), batches(3))
    counts = ak.save_row_deltas(model, tmp_path / "deltas.safetensors")
    assert counts == {n: int(m.sum()) for n, m in (masks | down).items()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ak.save_row_deltas(model, tmp_path / "deltas.safetensors")
    ids = batches(1, seed=9)[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    fresh = tiny_llama()
    loaded = ak.load_row_deltas(fresh, tmp_path / "deltas.safetensors")
    assert set(loaded) == set(deltas)
    for n, d in loaded.items():
        assert torch.equal(d, deltas[n]) and d.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, want, atol=0, rtol=0)
    ak.merge_row_deltas(model)
    ak.merge_row_deltas(fresh)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    assert not any(f.name.endswith(".tmp") for f in tmp_path.iterdir())


def test_checkpoint_of_the_attached_model_resumes_exactly():
    masks = decoder_masks(tiny_llama(), fraction=0.25)
    data = batches(6, seed=4)

    def fresh():
        model = tiny_llama()
        model.requires_grad_(False)
        deltas = ak.attach_row_deltas(model, masks)
        return model, torch.optim.AdamW(deltas.values(), lr=1e-2, weight_decay=0.01)

    model, opt = fresh()
    train(model, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    names = list(model.state_dict())
    assert {n for n in names if n.endswith((".weight_delta", ".weight_delta_index"))} == {
        f"{n[: -len('.weight')]}.{s}" for n in masks for s in ("weight_delta", "weight_delta_index")
    }
    train(model, opt, data[3:])
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed, opt2 = fresh()
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, data[3:])
    for (n, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_delta_gradients(use_reentrant):
    ids = batches(1)[0]
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama().train()
        model.requires_grad_(False)
        deltas = ak.attach_row_deltas(model, decoder_masks(model))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        lm_loss(model, ids).backward()
        grads.append({n: d.grad for n, d in deltas.items()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, **FP32)


def test_deepcopy_pickle_to_dtype_and_attach_twice():
    masks = decoder_masks(tiny_llama(), fraction=0.25)
    model = tiny_llama()
    first = {n: m for n, m in masks.items() if "layers.0." in n}
    second = {n: m for n, m in masks.items() if "layers.1." in n}
    d1 = ak.attach_row_deltas(model, first)
    with pytest.raises(ValueError, match="already has a row delta"):
        ak.attach_row_deltas(model, {next(iter(first)): first[next(iter(first))]})
    d2 = ak.attach_row_deltas(model, second)
    assert set(d1) | set(d2) == set(masks)
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    unpickled = torch.load(buf, weights_only=False)
    ids = batches(1)[0]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for other in (clone, unpickled):
            torch.testing.assert_close(other(input_ids=ids).logits, want, atol=0, rtol=0)
    model.to(torch.float64)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.weight_delta.dtype == torch.float64 and layer.weight_delta_index.dtype == torch.int64
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits.float(), want, atol=1e-5, rtol=1e-5)
    assert sorted(ak.merge_row_deltas(model)) == sorted(masks)
    assert ak.merge_row_deltas(model) == []


def test_requires_grad_is_restored_and_empty_masks_freeze_only():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    model[1].weight.requires_grad_(False)
    deltas = ak.attach_row_deltas(
        model, {"0.weight": torch.zeros(6, dtype=torch.bool), "1.weight": torch.tensor([True, False, True])}
    )
    assert list(deltas) == ["1.weight"]  # an empty mask adds no delta ...
    found = ak.row_delta_parameters(model)  # found again, keyed as attach returned them
    assert list(found) == ["1.weight"] and found["1.weight"] is deltas["1.weight"] is model[1].weight_delta
    assert not model[0].weight.requires_grad and type(model[0]) is nn.Linear  # ... and only freezes
    assert model[0].bias.requires_grad  # not named: untouched
    with pytest.raises(ValueError, match="already named"):
        ak.attach_row_deltas(model, {"0.weight": torch.ones(6, dtype=torch.bool)})
    model[1].weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="must stay frozen"):
        model(torch.randn(2, 4))
    model[1].weight.requires_grad_(False)
    ak.merge_row_deltas(model)
    assert ak.row_delta_parameters(model) == {}
    assert model[0].weight.requires_grad and not model[1].weight.requires_grad  # as before attach
    assert not hasattr(model[0], FROZEN_ONLY_ATTR)


def test_partitioned_deltas_must_be_gathered_before_merge_or_save(tmp_path):
    """A ZeRO-3 partition leaves an empty local delta: merging or saving it is an error, and nothing is written."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    ak.attach_row_deltas(
        model, {"0.weight": torch.ones(6, dtype=torch.bool), "1.weight": torch.ones(3, dtype=torch.bool)}
    )
    before = model[0].weight.clone()
    model[1].weight_delta = nn.Parameter(torch.empty(0))  # what a ZeRO-3 rank holds outside a gather
    with pytest.raises(ValueError, match=r"'1.weight' has shape \(0,\), expected \(3, 6\).*gathered first"):
        ak.merge_row_deltas(model)
    assert type(model[0]) is RowDeltaLinear and torch.equal(model[0].weight, before)  # the first one not merged
    with pytest.raises(ValueError, match="gathered first"):
        ak.save_row_deltas(model, tmp_path / "d.safetensors")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------- bad input
class NotALinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def small_model():
    model = nn.ModuleDict(
        {"lin": nn.Linear(4, 6), "emb": nn.Embedding(10, 4), "norm": nn.LayerNorm(4), "sub": NotALinear(4, 4)}
    )
    return model


@pytest.mark.parametrize(
    "masks,err,pattern",
    [
        ({"lin.wieght": torch.ones(6, dtype=torch.bool)}, ValueError, r"'lin.wieght' is not a parameter.*lin.weight"),
        ({"emb.weight": torch.ones(10, dtype=torch.bool)}, ValueError, r"'emb.weight'.*Embedding"),
        ({"norm.weight": torch.ones(4, dtype=torch.bool)}, ValueError, r"'norm.weight'.*LayerNorm"),
        ({"lin.bias": torch.ones(6, dtype=torch.bool)}, ValueError, r"'lin.bias'.*'bias' parameter"),
        ({"sub.weight": torch.ones(4, dtype=torch.bool)}, ValueError, r"'sub.weight'.*NotALinear"),
        ({"lin.weight": torch.ones(5, dtype=torch.bool)}, ValueError, r"'lin.weight'.*shape \(6,\).*shape=\(5,\)"),
        ({"lin.weight": torch.ones(6, 1, dtype=torch.bool)}, ValueError, r"'lin.weight'.*shape=\(6, 1\)"),
        ({"lin.weight": torch.ones(6, dtype=torch.uint8)}, ValueError, r"'lin.weight'.*torch.bool.*uint8"),
        ({"lin.weight": torch.ones(6)}, ValueError, r"'lin.weight'.*torch.bool.*float32"),
        ({"lin.weight": torch.ones(6, 4, dtype=torch.bool)}, ValueError, r"'lin.weight'\] is an element.*SparseAdamW"),
        ({"lin.weight": [True] * 6}, TypeError, r"'lin.weight'.*list"),
        ({0: torch.ones(6, dtype=torch.bool)}, TypeError, r"parameter names"),
    ],
    ids=[
        "unknown",
        "embedding",
        "norm",
        "bias",
        "linear-subclass",
        "short",
        "2d",
        "uint8",
        "float",
        "element",
        "list",
        "int-key",
    ],
)
def test_bad_masks_name_the_parameter_and_change_nothing(masks, err, pattern):
    model = small_model()
    before = {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()}
    good = {"lin.weight": torch.ones(6, dtype=torch.bool)}  # checked first: nothing may change before the error
    with pytest.raises(err, match=pattern):
        ak.attach_row_deltas(model, good | masks if "lin.weight" not in masks else masks)
    assert type(model["lin"]) is nn.Linear
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1], n


def test_bad_options_and_tied_weights():
    model = small_model()
    ok = {"lin.weight": torch.ones(6, dtype=torch.bool)}
    with pytest.raises(TypeError, match="masks must be a dict"):
        ak.attach_row_deltas(model, [ok])
    with pytest.raises(ValueError, match=r"axis must be 0.*got 2"):
        ak.attach_row_deltas(model, ok, axis=2)
    with pytest.raises(ValueError, match=r"dtype must be one of.*int32"):
        ak.attach_row_deltas(model, ok, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"'lin.weight'.*shape \(4,\).*axis=1"):
        ak.attach_row_deltas(model, ok, axis=1)
    tied = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"'lm_head.weight' is tied to \['model.embed_tokens.weight'\]"):
        ak.attach_row_deltas(tied, {"lm_head.weight": torch.ones(64, dtype=torch.bool)})
    shared = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    shared[1].weight = shared[0].weight
    with pytest.raises(ValueError, match=r"'0.weight' is tied to \['1.weight'\]"):
        ak.attach_row_deltas(shared, {"0.weight": torch.ones(4, dtype=torch.bool)})


def test_bad_delta_files_name_the_file_and_entry(tmp_path):
    from safetensors.torch import load_file, save_file

    model = nn.Sequential(nn.Linear(4, 6))
    with pytest.raises(ValueError, match="no row deltas attached"):
        ak.save_row_deltas(model, tmp_path / "none.safetensors")
    ak.attach_row_deltas(model, {"0.weight": torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool)})
    path = tmp_path / "d.safetensors"
    ak.save_row_deltas(model, path)
    with pytest.raises(FileNotFoundError):
        ak.load_row_deltas(nn.Sequential(nn.Linear(4, 6)), tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"d.safetensors entry '0.weight'.*shape \[6, 4\].*shape \[6, 5\]"):
        ak.load_row_deltas(nn.Sequential(nn.Linear(5, 6)), path)
    with pytest.raises(ValueError, match=r"'0.weight' is not a parameter"):
        ak.load_row_deltas(nn.Sequential(nn.Identity(), nn.Linear(4, 6)), path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    bad = dict(tensors, **{"0.weight_delta_index": torch.tensor([5, 1, 2])})
    save_file(bad, str(tmp_path / "unsorted.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"unsorted.safetensors entry '0.weight'.*sorted distinct int64"):
        ak.load_row_deltas(nn.Sequential(nn.Linear(4, 6)), tmp_path / "unsorted.safetensors")
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a row-delta file"):
        ak.load_row_deltas(nn.Sequential(nn.Linear(4, 6)), tmp_path / "plain.safetensors")
    target = nn.Sequential(nn.Linear(4, 6))
    ak.attach_row_deltas(target, {"0.weight": torch.ones(6, dtype=torch.bool)})
    with pytest.raises(ValueError, match="already has a row delta"):
        ak.load_row_deltas(target, path)


@pytest.mark.gpu
def test_cuda_layer_matches_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(256, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    index = random_mask(256, 25, 0).nonzero().flatten().cuda()
    delta = (torch.randn(25, 128, device="cuda", generator=g) * 0.05).requires_grad_()
    x = torch.randn(4, 64, 128, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    y = row_delta_linear(x, weight, delta, index)
    y.float().sum().backward()
    y_ref, x_ref, w_ref, _ = dense_reference(x.float(), weight.float(), None, delta, index, 0)
    y_ref.sum().backward()
    torch.testing.assert_close(y.float(), y_ref, atol=5e-2, rtol=BF16_RTOL)
    torch.testing.assert_close(x.grad.float(), x_ref.grad, atol=5e-2, rtol=BF16_RTOL)
    torch.testing.assert_close(delta.grad, w_ref.grad[index], atol=5e-2, rtol=BF16_RTOL)
