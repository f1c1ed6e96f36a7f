"""The embedded demo (``allo-train demo``) in its quick variant: every stage runs through the real pipeline, the
table and plots are written, and the numbers in them are real held-out exact-match accuracies."""

import json
import re

import pytest

from allo_train.demo import QUICK, exact_match, make_problems, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    # The CLI runs the ops' torch path on CPU; the conftest's TRITON_INTERPRET=1 would put them under the (slow)
    # Triton interpreter instead. "native" = torch ops + the native SparseAdamW kernel, as a plain CPU run uses.
    mp = pytest.MonkeyPatch()
    mp.setenv("ALLO_KERNELS_BACKEND", "native")
    try:
        yield out, run_demo(str(out), seed=0, quick=True)
    finally:
        mp.undo()


def test_files_and_table(demo):
    out, result = demo
    for name in ("results.md", "results.json", "accuracy.png", "loss_curves.png", "mask_heatmap.png"):
        assert (out / name).is_file(), name
    for png in ("accuracy.png", "loss_curves.png", "mask_heatmap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "results.json").read_text())["table"] == result["table"]
    md = (out / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    names = [tuple(c.strip() for c in line.strip("|").split("|"))[:2] for line in rows if "---" not in line]
    assert [n[0] for n in names] == ["base", "SFT", "SFT-only", "full DPO", "ALLO", "ALLO", "ALLO"]
    assert [n[1].split()[0] for n in names[4:]] == ["warmup", "forget", "improve"]
    for line in rows:
        if "---" in line:
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert re.fullmatch(r"\d+\.\d", cells[2]) and 0.0 <= float(cells[2]) <= 100.0, line
        assert cells[5] == "0", line  # the seed


def test_accuracies_are_real(demo):
    out, result = demo
    rows = {(r["model"], r["stage"].split()[0]): r for r in result["rows"]}
    assert all(0.0 <= r["exact_match"] <= 100.0 for r in result["rows"])
    n_held = QUICK.held_out
    assert all(
        abs(r["exact_match"] * n_held / 100 - round(r["exact_match"] * n_held / 100)) < 1e-6 for r in result["rows"]
    )  # a count of right answers out of the held-out problems
    base, sft = rows[("base", "random")], rows[("SFT", "sft")]
    assert base["exact_match"] <= 2.0  # random weights: (almost) never the exact sum
    # >= 5 points: at 250 tiny SFT steps the held-out count (5-7 of 100 here) moves by a few problems with last-bit
    # changes in the loss kernels, so the margin is the claim, not one more lucky problem.
    assert sft["exact_match"] >= base["exact_match"] + 5.0  # SFT learned something
    # Re-evaluating a saved model reproduces the reported number (greedy decoding is deterministic).
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    held = make_problems(0, QUICK)["held_out"]
    assert exact_match(out / "sft" / "sft" / "model", tok, held) == sft["exact_match"]


def test_located_rows_and_budget(demo):
    out, result = demo
    assert 0 < result["located_rows"] < result["candidate_rows"]
    rows = {(r["model"], r["stage"].split()[0]): r for r in result["rows"]}
    allo = rows[("ALLO", "improve")]
    assert 0.0 < allo["trained_params_pct"] < 100.0
    assert allo["steps_after_sft"] == rows[("full DPO", "dpo")]["steps_after_sft"] == QUICK.align_budget
    assert rows[("SFT-only", "sft")]["steps_after_sft"] == QUICK.align_budget
    assert result["data"]["preference_pairs"] > 0
    pairs = [json.loads(line) for line in (out / "data" / "preference.jsonl").read_text().splitlines()]
    held = {json.loads(line)["prompt"] for line in (out / "data" / "held_out.jsonl").read_text().splitlines()}
    for p in pairs:  # chosen = the true sum, rejected = a wrong own answer, never a held-out problem
        a, b = map(int, p["prompt"][:-1].split("+"))
        assert p["chosen"] == str(a + b) != p["rejected"]
        assert p["prompt"] not in held
    forget = [json.loads(line) for line in (out / "data" / "forget.jsonl").read_text().splitlines()]
    assert [(f["prompt"], f["rejected"], f["corrected"]) for f in forget] == [
        (p["prompt"], p["rejected"], p["chosen"]) for p in pairs
    ]
    # The located masks were used: ALLO's final model kept the unselected rows of the SFT model.
    from safetensors.torch import load_file

    from allo_train.locate import load_masks

    masks = load_masks(out / "allo" / "locate")
    sft = load_file(str(out / "sft" / "sft" / "model" / "model.safetensors"))
    final = load_file(str(out / "allo" / "improve" / "model" / "model.safetensors"))
    for name, m in masks.items():
        keep = ~m if m.shape == sft[name].shape else ~m.view(-1, *([1] * (sft[name].dim() - 1))).expand_as(sft[name])
        assert (final[name][keep] == sft[name][keep]).all(), name
