"""The design document is in the repository and linked; earlier public names still work as aliases of the new ones."""

from pathlib import Path

import torch

import allo_kernels as ak

ROOT = Path(__file__).resolve().parents[1]


def test_design_document_exists_and_is_what_references_point_to():
    design = ROOT / "docs" / "design.md"
    for section in (
        "## Layout",
        "## Public API contract",
        "## The data path of one training step",
        "## Performance targets",
        "## How we test",
    ):
        assert section in design.read_text(encoding="utf-8"), section
    assert "](docs/design.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
    sources = [*ROOT.glob("*.md"), *ROOT.glob("allo_*/**/*.py"), *ROOT.glob("benchmarks/*.md")]
    assert not [str(p) for p in sources if "DESIGN.md" in p.read_text(encoding="utf-8")]


def test_earlier_names_are_aliases():
    from allo_kernels.integrations import deepspeed as ak_deepspeed
    from allo_kernels.optim import zero_param_groups
    from allo_train import cli, generation

    assert ak.losses.masked_dpo_loss is ak.losses.kept_token_dpo_loss
    assert zero_param_groups is ak_deepspeed.zero_param_groups
    assert cli.correct_answers is generation.correct_answers
    s = ak.token_scores(torch.randn(1, 5, 7), torch.tensor([[1, 2, 3, -100, 4]]), mask_fraction=0.5)
    assert s.masked is s.dropped and int(s.dropped.sum()) == 2
