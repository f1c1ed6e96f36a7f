"""Test set-up: Triton kernels run under the interpreter on CPU machines; `gpu` tests need CUDA."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates our kernels (i.e. before allo_kernels is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def backend(monkeypatch):
    """Select an implementation for the duration of a test: backend('triton') / backend('torch')."""

    def use(name: str) -> None:
        monkeypatch.setenv("ALLO_KERNELS_BACKEND", name)

    return use


def tolerances(dtype: torch.dtype) -> dict:
    """Tolerances that mean something: fp32 1e-5; half types judged against an fp32 reference of the same inputs,
    where one rounding of the output to the half type is the only allowed difference."""
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-5)
    if dtype == torch.float16:
        return dict(atol=1e-5, rtol=2e-3)
    return dict(atol=1e-5, rtol=1.6e-2)
