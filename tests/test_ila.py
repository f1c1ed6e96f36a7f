"""ILA (allo_train.ila): learned layer gates on PEFT LoRA increments.

A tiny Llama with a planted answer: in layers 0 and 2 the attention output and MLP down projections are zero, and
LoRA goes only on q/v/gate/up, so those layers' increments cannot change anything; the gates must rank layers 1 and 3
first. The run goes through the pipeline with ``locate.method: ila`` and then ``improve``, so the masks are also
checked to round-trip into a training stage; a second run with the same seed must give the same gates bit for bit.
"""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from allo_train import ila
from allo_train.config import load_config

DEAD, LIVE = (0, 2), (1, 3)
TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj"]  # o_proj / down_proj of a dead layer stay exactly zero


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from allo_train.model import build_tiny_llama
    from allo_train.tokenizer import build_char_tokenizer

    d = tmp_path_factory.mktemp("ila_assets")
    tok = build_char_tokenizer("0123456789+=", save_dir=d / "tok")
    build_tiny_llama(tok, d / "base", hidden_size=32, num_layers=4, num_heads=2, max_position_embeddings=32, seed=0)
    weights = load_file(str(d / "base" / "model.safetensors"))
    for i in DEAD:
        for name in (f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"):
            weights[name] = torch.zeros_like(weights[name])
    save_file(weights, str(d / "base" / "model.safetensors"), metadata={"format": "pt"})
    build_tiny_llama(tok, d / "no_layers", hidden_size=32, num_layers=0, num_heads=2, max_position_embeddings=32)
    g = torch.Generator().manual_seed(0)
    with open(d / "sft.jsonl", "w") as f, open(d / "pref.jsonl", "w") as p:
        for _ in range(32):
            a, b = (int(x) for x in torch.randint(10, 50, (2,), generator=g))
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")
            p.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}) + "\n")
    return d


def config(assets: Path, out: Path, **over):
    raw = {
        "model_name_or_path": str(assets / "base"),
        "output_dir": str(out),
        "seed": 3,
        "per_device_train_batch_size": 8,
        "max_length": 16,
        "max_prompt_length": 8,
        "logging_steps": 5,
        "save_steps": 10**9,
        "deepspeed": {"zero_optimization": {"stage": 0}},
        "pipeline": {"stages": ["locate", "improve"]},
        "locate": {"method": "ila"},
        "ila": {
            "objective": "sft",
            "data_path": str(assets / "sft.jsonl"),
            "target_modules": TARGETS,
            "learning_rate": 1e-2,
            "lora_steps": 15,
            "gate_steps": 30,
            "gate_learning_rate": 0.2,
            "keep_layers": 2,
        },
        "improve": {"data_path": str(assets / "pref.jsonl"), "max_steps": 2, "learning_rate": 1e-2},
    }
    for dotted, value in over.items():
        node = raw
        *path, last = dotted.split("__")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    from allo_train.config import config_from_dict

    return config_from_dict(raw)


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """The pipeline (locate by ILA -> improve) and, separately, the ila stage alone with the same seed."""
    from allo_train.trainer import run_pipeline, run_stage

    mp = pytest.MonkeyPatch()
    mp.setenv("ALLO_KERNELS_BACKEND", "native")  # torch ops + native optimizer, as a plain CPU run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("ila_runs")
        run_pipeline(config(assets, root / "pipeline"))
        printed = io.StringIO()  # not a terminal: progress must come as log lines, no bars
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            run_stage(config(assets, root / "alone", pipeline__stages=["ila"]), "ila")
        (root / "alone" / "printed.txt").write_text(printed.getvalue())
        yield root / "pipeline", root / "alone"
    finally:
        torch.set_num_threads(threads)
        mp.undo()


def report_of(out: Path, stage: str = "ila") -> dict:
    return json.loads((out / stage / ila.LAYER_IMPORTANCE_FILE).read_text())


def test_planted_layers_rank_first(runs):
    report = report_of(runs[0])
    assert report["ranking"][:2] == list(LIVE) and report["selected_layers"] == list(LIVE)
    scores = {int(k): v for k, v in report["scores"].items()}
    assert min(scores[i] for i in LIVE) > max(scores[i] for i in DEAD)
    # No gradient reaches a dead layer's LoRA: its increment stays exactly zero (B starts at 0) ...
    for layer, modules in report["modules"].items():
        assert set(modules) == {"self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}
        assert all((m["lora_norm"] > 0) == (int(layer) in LIVE) for m in modules.values()), layer
    # ... and its gate sees the sparsity penalty alone: Adam on gate_penalty * mean(gamma) and nothing else.
    s = torch.full((4,), ila.GATE_INIT, requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.2)
    for _ in range(30):
        (0.1 * torch.sigmoid(s).mean()).backward()  # gate_penalty 0.1 (the default)
        opt.step()
        opt.zero_grad()
    assert scores[DEAD[0]] == scores[DEAD[1]] == pytest.approx(torch.sigmoid(s[0]).item(), abs=1e-6)
    losses = report["losses"]
    assert losses["all_layers"] < losses["no_layers"]  # phase 1 learned something
    assert losses["selected_layers"] == losses["all_layers"]  # the dead layers' increments change nothing at all


def test_outputs_and_masks_round_trip_into_improve(runs, assets):
    out = runs[0]
    for stage in ("ila", "locate"):
        d = out / stage
        assert (d / ila.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
        assert report_of(out, stage) == report_of(out, "ila")
    assert (out / "ila" / ila.LORA_DIR / "adapter_model.safetensors").is_file()
    masks = load_file(str(out / "locate" / "masks.safetensors"))
    base = load_file(str(assets / "base" / "model.safetensors"))
    assert set(masks) == set(base)  # locate's format: every parameter of the model, by its own name
    for name, mask in masks.items():
        layer = ila.layer_index(name)
        assert mask.dtype == torch.bool and mask.shape == base[name].shape[:1]
        assert bool(mask.all()) == (layer in LIVE and "norm" not in name) and bool(mask.any()) == bool(mask.all())
    improved = load_file(str(out / "improve" / "model" / "model.safetensors"))
    changed = {name for name in base if not torch.equal(improved[name], base[name])}
    assert changed and all(masks[name].all() for name in changed)  # only the ILA layers trained
    assert any(name.startswith("model.layers.1.") for name in changed)
    assert any(name.startswith("model.layers.3.") for name in changed)


def test_gate_progress_without_a_terminal_is_log_lines(runs):
    printed = (runs[1] / "printed.txt").read_text()
    assert "[allo-train] ila: gates: step 30/30 (100%) loss " in printed
    assert "\r" not in printed


def test_same_seed_same_gates(runs):
    a, b = report_of(runs[0]), report_of(runs[1])
    assert a["gate_history"] == b["gate_history"] and a["scores"] == b["scores"] and a["losses"] == b["losses"]
    masks_a = load_file(str(runs[0] / "ila" / "masks.safetensors"))
    masks_b = load_file(str(runs[1] / "ila" / "masks.safetensors"))
    assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)


@pytest.mark.parametrize(
    "over, key",
    [
        ({"ila__keep_layers": 0}, "'ila.keep_layers'"),
        ({"ila__keep_layers": 1.5}, "'ila.keep_layers'"),
        ({"ila__gate_target_layers": 0.0}, "'ila.gate_target_layers'"),
        ({"ila__objective": "ppo"}, "'ila.objective'"),
        ({"ila__target_modules": []}, "'ila.target_modules'"),
        ({"locate__method": "grad", "locate__importance": "delta"}, "'locate.method'"),
    ],
)
def test_bad_config_names_the_key(assets, tmp_path, over, key):
    with pytest.raises(ValueError, match=key):
        config(assets, tmp_path, **over)


@pytest.mark.parametrize(
    "over, key",
    [
        ({"ila__keep_layers": 5}, r"'ila\.keep_layers' must be in \[1, 4\]"),
        ({"ila__target_modules": ["q_proj", "qproj"]}, r"'ila\.target_modules' names 'qproj'.*self_attn\.q_proj"),
        ({"ila__target_modules": ["input_layernorm"]}, r"'ila\.target_modules' names 'input_layernorm'"),
        ({"model_name_or_path": "no_layers"}, r"'model_name_or_path'.*no numbered decoder layers"),
    ],
)
def test_bad_config_found_at_the_model_stops_before_training(assets, tmp_path, over, key):
    from allo_train.trainer import run_stage

    if "model_name_or_path" in over:
        over = {"model_name_or_path": str(assets / over["model_name_or_path"])}
    cfg = config(assets, tmp_path / "out", pipeline__stages=["ila"], **over)
    with pytest.raises(ValueError, match=key):
        run_stage(cfg, "ila")
    assert not (tmp_path / "out" / "ila" / "metrics.jsonl").exists()  # no step was trained


def test_locate_importance_is_the_earlier_name_of_method():
    assert load_config(None, ["locate.importance=delta"]).locate.method == "weight_delta"
    assert load_config(None, ["locate.importance=grad"]).locate.method == "grad"
    assert load_config(None, ["locate.method=ila"]).locate.method == "ila"
    assert load_config(None).locate.method == "weight_delta"


def test_keep_layers_count_or_fraction():
    assert ila.layer_count(3, 32, key="k") == 3
    assert [ila.layer_count(f, 32, key="k") for f in (0.25, 0.1, 1.0)] == [8, 4, 32]
    assert ila.layer_count(0.25, 2, key="k") == 1 and ila.layer_count(0.3, 10, key="k") == 3  # rounded up, exactly


# ------------------------------------------------------------------------------------------- the gate on PEFT's LoRA
class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"proj": torch.nn.Linear(6, 5)}) for _ in range(2))

    def forward(self, x):
        for block in self.layers:
            x = x + block["proj"](x)[..., :1]
        return x


def test_a_gate_scales_exactly_its_layers_lora_increment():
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = Toy()
    targets = ila.lora_targets(model, [ila.ALL_LINEAR], key="k", model_key="m")
    assert [(t.name, t.layer, t.module) for t in targets] == [
        ("layers.0.proj", 0, "proj"),
        ("layers.1.proj", 1, "proj"),
    ]
    ila.attach_lora(model, targets, SimpleNamespace(lora_r=2, lora_alpha=4.0, lora_dropout=0.0))
    layer = model.layers[0]["proj"]
    torch.nn.init.normal_(layer.lora_B[ila.ADAPTER].weight)
    x = torch.randn(3, 6)
    base = layer.base_layer(x)
    a, b, s = layer.lora_A[ila.ADAPTER].weight, layer.lora_B[ila.ADAPTER].weight, layer.scaling[ila.ADAPTER]
    increment = s * x @ a.T @ b.T
    gates = ila.LayerGates(model, targets, per_module=False)
    with torch.no_grad():
        gates.logits.copy_(torch.tensor([0.4, -2.0]))
    torch.testing.assert_close(layer(x), base + torch.sigmoid(torch.tensor(0.4)) * increment)
    with gates.fixed(torch.tensor([0.0, 1.0])):
        torch.testing.assert_close(layer(x), base, rtol=0, atol=0)
    gates.remove()
    torch.testing.assert_close(layer(x), base + increment)  # hooks gone: plain PEFT LoRA again
    norms = ila.lora_increment_norms(model, targets)
    assert norms["layers.0.proj"] == pytest.approx(float((s * b @ a).detach().norm()), rel=1e-6)


# ------------------------------------------------------------------------------------------- compare-layers
def test_compare_layers(tmp_path, capsys):
    from allo_train import cli

    for name, kept, ranking in (("a", [1, 3, 5], [3, 1, 5, 0, 2, 4]), ("b", [3, 4, 5], [4, 3, 5, 1, 0, 2])):
        (tmp_path / f"{name}.json").write_text(json.dumps({"selected_layers": kept, "ranking": ranking}))
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    o = ila.layer_overlap(ila.read_selection(a), ila.read_selection(b))
    assert o.common == [3, 5] and o.jaccard == 0.5
    assert cli.main(["compare-layers", a, b]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "common layers: [3, 5] (2); Jaccard 0.50"
    assert cli.main(["compare-layers", a, b, "--top", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "common layers: [3] (1); Jaccard 0.33"
    (tmp_path / "bad.json").write_text("{}")
    for argv in ([a, str(tmp_path / "bad.json")], [a, b, "--top", "7"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["compare-layers", *argv])
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "bad.json: not a readable layer_importance.json" in err and "--top must be in [1, 6]" in err
