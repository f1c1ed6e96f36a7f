import json

import pytest
import torch

from allo_train import locate as L


def reference_top_k(scores, k):
    """Exact reference: stable descending sort of everything (ties: earlier position first)."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order] = True
    out, offset = [], 0
    for s in scores:
        out.append(chosen[offset : offset + s.numel()].reshape(s.shape))
        offset += s.numel()
    return out


def toy_model_importance(seed=0, layers=3):
    g = torch.Generator().manual_seed(seed)
    imp = {"model.embed_tokens.weight": torch.rand(20, 8, generator=g) * 10}
    for i in range(layers):
        imp[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.rand(8, 8, generator=g)
        imp[f"model.layers.{i}.mlp.up_proj.weight"] = torch.rand(16, 8, generator=g)
        imp[f"model.layers.{i}.mlp.up_proj.bias"] = torch.rand(16, generator=g)
        imp[f"model.layers.{i}.input_layernorm.weight"] = torch.rand(8, generator=g) * 10
    imp["model.norm.weight"] = torch.rand(8, generator=g) * 10
    imp["lm_head.weight"] = torch.rand(20, 8, generator=g) * 10
    return imp


@pytest.mark.parametrize("force_radix", [False, True])
def test_top_k_is_exact_with_ties_by_position(monkeypatch, force_radix):
    if force_radix:
        monkeypatch.setattr(L, "_KTHVALUE_MAX_ELEMENTS", 0)
    g = torch.Generator().manual_seed(0)
    # Few distinct values -> many ties at the threshold; zeros and an inf included.
    scores = [
        torch.randint(0, 4, (7, 5), generator=g).float() / 4,
        torch.randint(0, 4, (13,), generator=g).float() / 4,
        torch.tensor([0.0, float("inf"), 0.5, -0.0]),
    ]
    total = sum(s.numel() for s in scores)
    for k in (0, 1, 5, 17, 24, 30, total - 1, total):
        got = L.top_k_masks(scores, k)
        want = reference_top_k(scores, k)
        assert sum(int(m.sum()) for m in got) == k
        for a, b in zip(got, want):
            assert torch.equal(a, b), k


def test_radix_select_matches_kthvalue_on_continuous_values(monkeypatch):
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(300, generator=g) * 1e-3, torch.rand(40, 10, generator=g) * 5e-7]
    want = L.top_k_masks(scores, 123)
    monkeypatch.setattr(L, "_KTHVALUE_MAX_ELEMENTS", 0)
    got = L.top_k_masks(scores, 123)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert all(torch.equal(a, b) for a, b in zip(got, reference_top_k(scores, 123)))


def test_element_global_selects_exactly_floor_ratio_of_candidates_and_excludes_defaults():
    imp = toy_model_importance()
    masks = L.select_masks(imp, ratio=0.1, granularity="element", scope="global")
    assert set(masks) == set(imp)
    candidates = [n for n in imp if not L.is_excluded(n, L.DEFAULT_EXCLUDE)]
    assert sorted(n for n in imp if n not in candidates) == sorted(
        ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
        + [f"model.layers.{i}.input_layernorm.weight" for i in range(3)]
    )
    for n in imp:
        assert masks[n].shape == imp[n].shape and masks[n].dtype == torch.bool
        if n not in candidates:
            assert not masks[n].any()  # excluded: present, all False
    n_cand = sum(imp[n].numel() for n in candidates)
    assert sum(int(masks[n].sum()) for n in candidates) == int(0.1 * n_cand)
    want = reference_top_k([imp[n] for n in candidates], int(0.1 * n_cand))
    assert all(torch.equal(masks[n], w) for n, w in zip(candidates, want))


def test_element_per_matrix_and_row_granularity():
    imp = toy_model_importance()
    per = L.select_masks(
        imp, ratio=0.25, granularity="element", scope="per_matrix", exclude=["*norm*", "*embed*", "lm_head*"]
    )
    for n, m in per.items():
        if "norm" in n or "embed" in n or n.startswith("lm_head"):
            assert not m.any()
        else:
            assert int(m.sum()) == imp[n].numel() // 4
            assert torch.equal(m, reference_top_k([imp[n]], imp[n].numel() // 4)[0])

    rows = L.select_masks(imp, ratio=0.3, granularity="row", scope="global")
    q = "model.layers.1.self_attn.q_proj.weight"
    assert rows[q].shape == (8,)
    cands = [n for n in imp if not L.is_excluded(n, L.DEFAULT_EXCLUDE)]
    row_scores = [imp[n].reshape(imp[n].shape[0], -1).mean(1) for n in cands]
    k = int(0.3 * sum(s.numel() for s in row_scores))
    assert sum(int(rows[n].sum()) for n in cands) == k
    assert all(torch.equal(rows[n], w) for n, w in zip(cands, reference_top_k(row_scores, k)))

    rows_pm = L.select_masks(imp, ratio=0.5, granularity="row", scope="per_matrix")
    assert int(rows_pm["model.layers.0.mlp.up_proj.weight"].sum()) == 8


def test_row_ties_go_to_the_earlier_row_and_count_for_ratio_is_decimal():
    imp = {"a.weight": torch.ones(4, 3), "b.weight": torch.ones(6, 2)}
    m = L.select_masks(imp, ratio=0.3, granularity="row", exclude=[])
    assert m["a.weight"].tolist() == [True, True, True, False] and not m["b.weight"].any()
    assert L.count_for_ratio(0.29, 100) == 29 and L.count_for_ratio(0.1, 30) == 3 and L.count_for_ratio(1.0, 7) == 7


def test_layer_granularity_selects_whole_layers_by_mean_importance():
    imp = toy_model_importance(layers=4)
    for name in imp:
        if ".layers.2." in name:
            imp[name] = imp[name] + 5.0  # layer 2 is the most changed
        if ".layers.0." in name:
            imp[name] = imp[name] + 2.0
    masks = L.select_masks(imp, ratio=0.5, granularity="layer")
    for name, m in masks.items():
        layer = L.layer_index(name)
        selected = layer in (0, 2) and not L.is_excluded(name, L.DEFAULT_EXCLUDE)
        assert m.shape == (imp[name].shape[0],)
        assert bool(m.all()) if selected else not m.any(), name
    with pytest.raises(ValueError, match="scope"):
        L.select_masks(imp, ratio=0.5, granularity="layer", scope="per_matrix")


def test_exclude_patterns_glob_and_regex():
    assert L.is_excluded("model.layers.0.mlp.up_proj.bias", ["*.bias"])
    assert L.is_excluded("transformer.h.3.attn.c_attn.weight", [r"re:\.h\.3\."])
    assert not L.is_excluded("transformer.h.13.attn.c_attn.weight", [r"re:\.h\.3\."])
    assert L.is_excluded("transformer.wte.weight", L.DEFAULT_EXCLUDE)
    assert L.is_excluded("transformer.h.0.ln_1.weight", L.DEFAULT_EXCLUDE)
    assert not L.is_excluded("transformer.h.0.mlp.c_fc.weight", L.DEFAULT_EXCLUDE)
    assert L.layer_index("transformer.h.11.mlp.c_fc.weight") == 11 and L.layer_index("lm_head.weight") is None
    assert L.module_type("model.layers.3.self_attn.q_proj.weight") == "self_attn.q_proj"


def test_bad_importance_and_arguments_are_named():
    with pytest.raises(ValueError, match=r"importance\['w'\] must be >= 0"):
        L.select_masks({"w": torch.tensor([1.0, -1.0])}, ratio=0.5, exclude=[])
    with pytest.raises(ValueError, match=r"importance\['w'\]"):
        L.select_masks({"w": torch.tensor([1.0, float("nan")])}, ratio=0.5, exclude=[])
    with pytest.raises(ValueError, match="ratio"):
        L.select_masks({"w": torch.ones(2)}, ratio=0.0)
    with pytest.raises(ValueError, match="granularity"):
        L.select_masks({"w": torch.ones(2)}, ratio=0.5, granularity="neuron")


def test_delta_and_grad_importance():
    start = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "step": torch.tensor(3)}
    warm = {"w": torch.tensor([[1.5, 2.0], [2.0, 4.25]], dtype=torch.bfloat16), "step": torch.tensor(4)}
    imp = L.delta_importance(start, warm)
    assert list(imp) == ["w"] and imp["w"].dtype == torch.float32  # integer buffers skipped
    assert imp["w"].tolist() == [[0.5, 0.0], [1.0, 0.25]]
    assert L.delta_importance(start, warm, learning_rate=0.5)["w"].tolist() == [[1.0, 0.0], [2.0, 0.5]]
    with pytest.raises(ValueError, match=r"'v'.*missing from the start"):
        L.delta_importance(start, {**warm, "v": torch.ones(1)})

    model = torch.nn.Linear(3, 2)
    acc = L.GradImportance()
    for sign in (1.0, -1.0):
        model.zero_grad()
        (sign * model(torch.ones(1, 3)).sum()).backward()
        acc.add_model(model)
    assert acc.num_updates == 2
    assert torch.equal(acc.importance["weight"], torch.full((2, 3), 2.0))
    assert torch.equal(acc.importance["bias"], torch.full((2,), 2.0))


def test_locate_writes_masks_stats_and_png_heatmap(tmp_path):
    imp = toy_model_importance()
    result = L.locate(imp, tmp_path, ratio=0.2, granularity="row")
    assert result.masks_path == tmp_path / "masks.safetensors"
    loaded = L.load_masks(tmp_path)
    assert set(loaded) == set(imp)
    assert all(torch.equal(loaded[n], result.masks[n]) for n in imp)

    stats = json.loads(result.stats_path.read_text())
    assert stats["granularity"] == "row" and stats["ratio"] == 0.2
    q = stats["params"]["model.layers.0.mlp.up_proj.weight"]
    assert q["rows"] == 16 and q["selected_elements"] == q["selected_rows"] * 8
    assert stats["params"]["lm_head.weight"]["excluded"] and stats["params"]["lm_head.weight"]["selected_elements"] == 0
    total_sel = sum(int(m.sum()) * (imp[n].numel() // m.numel()) for n, m in result.masks.items())
    assert stats["total"]["selected_elements"] == total_sel
    layer0 = stats["layers"]["0"]
    assert layer0["selected_elements"] == sum(
        v["selected_elements"] for n, v in stats["params"].items() if v["layer"] == 0
    )
    assert set(layer0["modules"]) == {"self_attn.q_proj", "mlp.up_proj", "input_layernorm"}

    png = result.heatmap_path
    assert png == tmp_path / "mask_heatmap.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no mask file"):
        L.load_masks(tmp_path / "nowhere")


def test_safetensors_state_is_a_lazy_mapping(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(tmp_path / "model-00001.safetensors"))
    save_file({"c": torch.full((1,), 2.0)}, str(tmp_path / "model-00002.safetensors"))
    state = L.SafetensorsState(tmp_path)
    assert sorted(state) == ["a", "b", "c"] and len(state) == 3 and state["c"].item() == 2.0
    L.save_importance({"w": torch.rand(3)}, tmp_path / "imp" / "importance.safetensors")
    assert L.load_importance(tmp_path / "imp" / "importance.safetensors")["w"].shape == (3,)


class TinyLM(torch.nn.Module):
    """Parameter names like a Hugging Face causal LM's, lm_head tied to the embedding when asked."""

    def __init__(self, tied=False):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(20, 8)
        self.model.layers = torch.nn.ModuleList([torch.nn.Linear(8, 16)])
        self.model.norm = torch.nn.LayerNorm(8)
        self.lm_head = torch.nn.Linear(8, 20, bias=False)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight


def full_masks(model, value=False):
    return {n: torch.full(p.shape[:1], value) for n, p in model.named_parameters()}


def test_masks_are_checked_against_the_model_before_training():
    model = TinyLM()
    masks = full_masks(model)
    masks["model.layers.0.weight"] = torch.ones(16, 8, dtype=torch.bool)  # an element mask
    L.check_masks_match_model(masks, model, source="masks file m.safetensors")

    # The masks of another model: unknown names.
    other = {n.replace("model.layers", "transformer.h"): m for n, m in masks.items()}
    with pytest.raises(ValueError, match=r"m\.safetensors: 2 mask\(s\) name parameters the model does not have: "):
        L.check_masks_match_model(other, model, source="masks file m.safetensors")
    # Missing lm_head / embeddings / norms: an error, never "train densely".
    partial = {n: m for n, m in masks.items() if n.startswith("model.layers")}
    with pytest.raises(ValueError) as info:
        L.check_masks_match_model(partial, model, source="masks file m.safetensors")
    msg = str(info.value)
    assert msg.startswith("masks file m.safetensors: no mask for 4 parameter(s) of the model: ")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.norm.bias", "lm_head.weight"):
        assert name in msg
    # Wrong shapes, including all-True and all-False masks (shape is checked before any value is read).
    for bad in (torch.ones(8, 16, dtype=torch.bool), torch.zeros(15, dtype=torch.bool), torch.ones(16, 8, 1).bool()):
        with pytest.raises(ValueError) as info:
            L.check_masks_match_model({**masks, "model.layers.0.weight": bad}, model, source="masks file m")
        assert f"mask 'model.layers.0.weight' in masks file m has shape {tuple(bad.shape)}" in str(info.value)
        assert "the parameter has shape (16, 8)" in str(info.value) and "or (16,) (rows)" in str(info.value)
    with pytest.raises(ValueError, match=r"dtype torch\.uint8"):
        L.check_masks_match_model({**masks, "model.layers.0.bias": torch.ones(16, dtype=torch.uint8)}, model)

    # Tied weights: a mask under either name covers the shared tensor.
    tied = TinyLM(tied=True)
    tied_masks = {n: m for n, m in full_masks(tied).items()}
    assert "lm_head.weight" not in tied_masks
    L.check_masks_match_model(tied_masks, tied)
    L.check_masks_match_model({**tied_masks, "lm_head.weight": torch.zeros(20, dtype=torch.bool)}, tied)


def test_masks_digest_tells_masks_apart():
    a = {"w": torch.tensor([True, False]), "v": torch.zeros(2, 2, dtype=torch.bool)}
    assert L.masks_digest(a) == L.masks_digest(dict(reversed(list(a.items()))))
    assert L.masks_digest(a) != L.masks_digest({**a, "w": torch.tensor([False, True])})
    assert L.masks_digest(a) != L.masks_digest({**a, "v": torch.zeros(4, dtype=torch.bool)})
