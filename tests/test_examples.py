"""The examples in examples/ run end to end on a tiny CPU model and do what they claim.

Each example's ``main(argv)`` returns a result dict; these tests run it with few steps and check the training signal
(loss down / preference margin up), SparseAdamW's contract on the trained model (unselected rows bit-identical,
selected rows moved) and, for TRL, that the allo loss equals DPOTrainer's own loss on the same batch.

The ops run on the torch path and SparseAdamW on the native CPU kernel (``ALLO_KERNELS_BACKEND=native``: what a CPU
user gets); one case runs the plain loop on the Triton kernels under the interpreter and compares the two.
"""

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"allo_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def strictly_better(values, *, higher: bool) -> bool:
    """Monotone improvement from step to step (what a few steps of a constant-LR run on one fixed batch give)."""
    pairs = list(itertools.pairwise(values))
    return all((b > a) if higher else (b < a) for a, b in pairs)


@pytest.fixture
def cpu_backend(monkeypatch):
    """On CPU: torch ops + the native SparseAdamW, not the (slow) Triton interpreter. On CUDA: the default (Triton)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("ALLO_KERNELS_BACKEND", "native")


def check_sparse_update(result):
    assert result["unselected_rows_identical"], "SparseAdamW wrote rows outside its masks"
    assert result["selected_rows_changed"], "SparseAdamW left selected rows untouched"


def test_plain_pytorch_dpo(cpu_backend):
    result = load_example("plain_pytorch_dpo").main(["--steps", "8", "--quiet"])
    margins = result["margins"]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0
    assert strictly_better(margins, higher=True), margins
    assert margins[-1] > 0.2
    assert result["losses"][0] == pytest.approx(math.log(2), abs=1e-5)
    assert strictly_better(result["losses"], higher=False), result["losses"]
    check_sparse_update(result)
    # Adam state for the selected rows only: k = 10% of the rows of each MLP weight.
    assert result["adam_state_rows"] == result["selected_rows"]


def test_plain_pytorch_dpo_triton_matches_torch(monkeypatch):
    """The same loop on the Triton kernels (CUDA, or the interpreter on CPU: tests/conftest.py sets TRITON_INTERPRET)
    gives the same losses and margins as the plain-torch ops and optimizer."""
    example = load_example("plain_pytorch_dpo")
    args = ["--steps", "3", "--quiet", "--hidden-size", "32", "--num-layers", "1"]
    monkeypatch.setenv("ALLO_KERNELS_BACKEND", "torch")
    reference = example.main(args)
    monkeypatch.setenv("ALLO_KERNELS_BACKEND", "triton")
    triton = example.main(args)
    assert triton["margins"] == pytest.approx(reference["margins"], abs=1e-4)
    assert triton["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert triton["margins"][-1] > triton["margins"][0]
    check_sparse_update(triton)


def test_hf_trainer_sft(cpu_backend):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the dev extra installs it)")
    result = load_example("hf_trainer_sft").main(["--steps", "8", "--quiet"])
    assert result["optimizer"] == "SparseAdamW"
    # batch 3 x 2 accumulation steps = the whole 6-example data set: the first logged loss (before any update) is the
    # token-mean over the data set, which checks the num_items_in_batch normalisation under gradient accumulation.
    assert result["step_losses"][0] == pytest.approx(result["loss_before"], rel=1e-3)
    assert strictly_better(result["step_losses"], higher=False), result["step_losses"]
    assert result["loss_after"] < result["loss_before"] - 0.2
    check_sparse_update(result)


def test_trl_dpo(cpu_backend):
    pytest.importorskip("trl", reason="TRL is an optional dev dependency")
    result = load_example("trl_dpo").main(["--steps", "5", "--quiet", "--allo-mask-fraction", "0.5"])
    assert result["optimizer"] == "SparseAdamW"
    margins = result["margins"]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)
    assert strictly_better(margins, higher=True), margins
    assert strictly_better(result["losses"], higher=False), result["losses"]
    # Unmasked, the allo loss is DPOTrainer's own sigmoid DPO loss on the trained policy (a non-trivial value).
    assert result["trl_loss"] < math.log(2) - 0.01
    assert result["allo_loss_unmasked"] == pytest.approx(result["trl_loss"], abs=1e-5)
    check_sparse_update(result)


def test_trl_dpo_rejects_unsupported_options(cpu_backend, tmp_path):
    pytest.importorskip("trl", reason="TRL is an optional dev dependency")
    example = load_example("trl_dpo")
    args = example.parse_args(["--quiet"])
    with pytest.raises(ValueError, match="loss_type"):
        example.build_trainer(args, str(tmp_path), loss_type=["sppo_hard"])
    with pytest.raises(ValueError, match="f_divergence_type"):
        example.build_trainer(args, str(tmp_path), f_divergence_type="js_divergence")
