"""The stages' ``sparsity`` key (allo_train/sparsity.py), single process: the config key and its errors, what delta
mode trains for row, layer, element and odd masks, the unset default, the copy the final save merges (no DeepSpeed),
and weight decay in both modes through the engines the stages build (one DeepSpeed process, in a subprocess).
The 2-rank runs in delta mode are in test_train_pipeline.py."""

from types import SimpleNamespace

import pytest
import torch

import allo_kernels as ak
from allo_train.config import load_config, training_settings
from allo_train.locate import select_masks
from allo_train.sparsity import SPARSITY_MODES, DeltaPlan, apply_delta_mode, attached_copy, plan_deltas
from allo_train.trainer import choose_sparsity


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def located(model, granularity: str, ratio: float = 0.2, exclude=None) -> dict:
    gen = torch.Generator().manual_seed(1)
    importance = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    kw = {} if exclude is None else {"exclude": exclude}
    return select_masks(importance, ratio=ratio, granularity=granularity, **kw)


def fake_run(**overrides):
    said = []
    cfg = load_config(None, {"model_name_or_path": "m", **overrides})
    return SimpleNamespace(cfg=cfg, say=said.append, said=said)


# ----------------------------------------------------------------------------------------------------- config
def test_key_defaults_to_unset_and_takes_the_two_modes():
    cfg = load_config()
    assert cfg.forget.sparsity is None and cfg.improve.sparsity is None  # decided by the stage from its masks
    assert SPARSITY_MODES == ("delta", "masked")
    cfg = load_config(None, {"locate.granularity": "row", "forget.sparsity": "delta", "improve.sparsity": "masked"})
    assert (cfg.forget.sparsity, cfg.improve.sparsity) == ("delta", "masked")
    assert training_settings(cfg, "forget")["forget.sparsity"] == "delta"  # compared on resume
    cfg = load_config(None, {"locate.granularity": "element", "improve.sparsity": "masked"})
    assert cfg.improve.sparsity == "masked"


def test_bad_values_are_named():
    with pytest.raises(ValueError, match=r"'forget.sparsity' must be one of \['delta', 'masked'\], got 'dense'"):
        load_config(None, {"forget.sparsity": "dense"})
    with pytest.raises(ValueError, match=r"unknown config key 'warmup.sparsity'"):
        load_config(None, {"warmup.sparsity": "delta"})  # warmup trains every parameter: no masks, no key


def test_delta_with_element_granularity_is_a_config_error():
    with pytest.raises(ValueError) as e:
        load_config(None, {"improve.sparsity": "delta"})  # locate.granularity defaults to element
    assert str(e.value) == (
        "config key 'improve.sparsity' is 'delta' but locate.granularity is 'element': element masks cannot be made "
        "compact (row deltas train whole rows); set improve.sparsity: masked, or locate.granularity: row or layer"
    )
    for granularity in ("row", "layer"):
        load_config(None, {"locate.granularity": granularity, "improve.sparsity": "delta"})
    # ILA's masks are whole layers, whatever locate.granularity says (the demo's "ALLO on ILA layers" row).
    cfg = load_config(None, {"pipeline.stages": ["ila", "forget", "improve"], "improve.sparsity": "delta"})
    assert cfg.improve.sparsity == "delta" and cfg.locate.granularity == "element"
    load_config(None, {"locate.method": "ila", "improve.sparsity": "delta"})
    with pytest.raises(ValueError, match=r"locate\.granularity is 'element'"):  # locate's masks win when both run
        load_config(None, {"pipeline.stages": ["ila", "locate", "improve"], "improve.sparsity": "delta"})


# ----------------------------------------------------------------------------------------------------- modes
def test_row_masks_become_row_deltas_and_everything_else_is_frozen():
    model = tiny_llama()
    masks = located(model, "row")
    run = fake_run(**{"locate.granularity": "row"})
    mode, plan = choose_sparsity(run, "forget", model, masks)
    assert mode == "delta" and plan.whole == []
    selecting = {n for n, m in masks.items() if m.any()}
    assert set(plan.rows) == selecting and all("layers." in n for n in selecting)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {n.removesuffix("weight") + "weight_delta" for n in selecting}
    for name in selecting:
        assert trainable[name.removesuffix("weight") + "weight_delta"].shape == (
            int(masks[name].sum()),
            model.get_parameter(name).shape[1],
        )
    n_rows = sum(int(masks[n].sum()) for n in selecting)
    assert run.said == [f"forget: sparsity delta: row deltas on {n_rows} rows of {len(selecting)} weights, every other "
                        "parameter frozen"]  # fmt: skip


def test_layer_masks_train_the_selected_layers_whole():
    model = tiny_llama()
    masks = located(model, "layer", ratio=0.5)
    mode, plan = choose_sparsity(fake_run(), "improve", model, masks)
    assert mode == "delta" and plan.rows == {}
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, m in masks.items() if m.any()) and trainable
    assert not any(isinstance(m, ak.ops.row_delta.RowDeltaLinear) for m in model.modules())


def test_element_masks_fall_back_to_masked_unless_delta_is_set():
    model = tiny_llama()
    masks = located(model, "element")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    run = fake_run()
    assert choose_sparsity(run, "forget", model, masks) == ("masked", None)
    (line,) = run.said
    assert line.startswith("forget: sparsity masked (SparseAdamW), the masks cannot be row deltas: mask 'model.")
    assert "element masks cannot be made compact" in line
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before  # nothing attached, nothing frozen
    run = fake_run()
    run.cfg.forget.sparsity = "delta"  # e.g. a masks file of element masks under locate.granularity: row
    with pytest.raises(ValueError, match=r"^config key 'forget.sparsity' is 'delta', but mask 'model\.") as e:
        choose_sparsity(run, "forget", model, masks)
    assert str(e.value).endswith("set forget.sparsity: masked to train these masks with SparseAdamW")
    run.cfg.forget.sparsity = "masked"
    assert choose_sparsity(run, "forget", model, masks) == ("masked", None)


def test_rows_outside_nn_linear_weights_cannot_be_deltas():
    model = tiny_llama()
    # exclude=[]: the embeddings, norms and lm_head are candidates too.
    masks = located(model, "row", ratio=0.5, exclude=[])
    head = {n: torch.zeros_like(m) for n, m in masks.items()}
    head["lm_head.weight"][:3] = True
    head["model.layers.0.mlp.up_proj.weight"][:2] = True
    with pytest.raises(ValueError, match=r"mask 'lm_head.weight' selects rows of the output embeddings \(lm_head\)"):
        plan_deltas(model, head)
    norm = {n: torch.zeros_like(m) for n, m in masks.items()}
    norm["model.norm.weight"][:3] = True
    norm["model.layers.0.mlp.up_proj.weight"][:2] = True
    with pytest.raises(ValueError, match=r"'model.norm.weight' is not the weight of a plain torch.nn.Linear"):
        apply_delta_mode(model, plan_deltas(model, norm))
    assert not any(p.numel() and not p.requires_grad for p in model.parameters())  # refused before any change
    run = fake_run()
    assert choose_sparsity(run, "improve", model, norm)[0] == "masked"
    with pytest.raises(ValueError, match="the masks select no parameter at all"):
        plan_deltas(model, {n: torch.zeros_like(m) for n, m in masks.items()})


def test_attached_copy_merges_without_touching_the_model_in_training(tmp_path):
    model = tiny_llama()
    masks = located(model, "row")
    plan = plan_deltas(model, masks)
    deltas = apply_delta_mode(model, plan)
    with torch.no_grad():
        for d in deltas.values():
            d.normal_(std=0.1)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
    live = {n: t.clone() for n, t in model.state_dict().items()}
    copy = attached_copy(model, model.state_dict(), plan.rows)
    ak.save_row_deltas(copy, tmp_path / "deltas.safetensors")
    assert sorted(ak.merge_row_deltas(copy)) == sorted(plan.rows)
    assert all(torch.equal(t, live[n]) for n, t in model.state_dict().items())  # the live model is as it was
    copy.save_pretrained(tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        # The model in training: 14 tokens take the additive form of the row-delta layer (equal up to rounding).
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-6, rtol=1e-5)
    fresh = tiny_llama()  # the starting model + deltas.safetensors = the merged model
    ak.load_row_deltas(fresh, tmp_path / "deltas.safetensors")
    ak.merge_row_deltas(fresh)
    assert all(torch.equal(t, merged.state_dict()[n]) for n, t in fresh.state_dict().items())


def test_delta_plan_describes_itself():
    assert DeltaPlan(whole=["a", "b"]).describe().startswith("2 whole parameters trained")


# ----------------------------------------------------------------------------------------------------- weight decay
DECAY_RUN = """
import sys
import torch
import allo_kernels as ak
from allo_train.engine import deepspeed_config, init_distributed, initialize

init_distributed()
ds = deepspeed_config(None, micro_batch_size=1, gradient_accumulation_steps=1, max_grad_norm=1.0, bf16=False)
kw = dict(ds_config=ds, learning_rate=0.1, weight_decay=0.5, lr_scheduler_type="constant", total_steps=3)
rows = torch.tensor([True, False, True, False, False, True, False, False])
out = {}
for mode in ("delta", "masked"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    out["base"] = model[0].weight.detach().clone()
    if mode == "delta":  # as the stage does it: the deltas trainable, everything else frozen
        model.requires_grad_(False)
        ak.attach_row_deltas(model, {"0.weight": rows})
    masks = {"0.weight": rows} if mode == "masked" else None
    engine = initialize(model, masks=masks, stock_optimizer=mode == "delta", warmup_steps=0, **kw)
    for _ in range(3):
        engine.backward(engine(torch.ones(2, 4)).sum() * 0.0)  # zero gradients: only the decay moves a weight
        engine.step()
    if mode == "delta":
        ak.merge_row_deltas(model)
    out[mode] = model[0].weight.detach().clone()
torch.save(out, sys.argv[1])
"""


def test_weight_decay_pulls_toward_the_starting_weights_in_delta_mode_and_toward_zero_in_masked_mode(tmp_path):
    """The engines the stages build (allo_train.engine.initialize), one process, ZeRO stage 0, weight decay 0.5 and
    zero gradients for 3 steps: AdamW's decoupled decay shrinks the delta, which stays 0 (the selected rows keep the
    starting weights), while SparseAdamW shrinks the selected rows themselves by (1 - lr * wd) per step."""
    import subprocess
    import sys

    from test_train_faults import ROOT, cli_env

    path = tmp_path / "weights.pt"
    r = subprocess.run(
        [sys.executable, "-c", DECAY_RUN, str(path)],
        cwd=ROOT,
        env=cli_env(tmpdir=tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    w = torch.load(path)
    rows = torch.tensor([True, False, True, False, False, True, False, False])
    assert torch.equal(w["delta"], w["base"])
    assert torch.equal(w["masked"][~rows], w["base"][~rows])
    torch.testing.assert_close(w["masked"][rows], w["base"][rows] * (1 - 0.1 * 0.5) ** 3, atol=0, rtol=1e-6)
