"""Backend selection: which implementation of an op runs for a given tensor.

Every op has a Triton implementation and a plain-torch reference (the optimizer also has a native C++ CPU kernel).
The default is chosen by device:

* CUDA tensors             -> ``triton``
* CPU tensors              -> ``torch`` (or ``triton`` when ``TRITON_INTERPRET=1``: Triton's interpreter runs the
                              very same kernels on the CPU, which is how CI tests them)

``ALLO_KERNELS_BACKEND=triton|torch|native`` overrides the choice (read at call time, so tests and benchmarks can
switch per call). ``native`` only means something for the optimizer; ops without a native kernel treat it as ``torch``.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("triton", "torch", "native")


@functools.cache
def triton_available() -> bool:
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - triton is a hard dependency, but be graceful on exotic platforms
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def backend_override() -> str | None:
    value = os.environ.get("ALLO_KERNELS_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"ALLO_KERNELS_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def select_backend(device: torch.device, *, has_native: bool = False) -> str:
    """Return the backend that runs an op on ``device``.

    ``has_native`` says whether the op has a native C++ CPU kernel (only the optimizer does).
    """
    override = backend_override()
    if override == "native" and not has_native:
        override = "torch"
    if override == "triton":
        if not triton_available():
            raise RuntimeError("ALLO_KERNELS_BACKEND=triton but triton cannot be imported")
        if device.type != "cuda" and not interpreter_enabled():
            raise RuntimeError(
                "ALLO_KERNELS_BACKEND=triton on a CPU tensor needs TRITON_INTERPRET=1 (set before importing triton)"
            )
        return "triton"
    if override is not None:
        return override
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu" and interpreter_enabled() and triton_available():
        return "triton"
    if device.type == "cpu" and has_native:
        return "native"
    return "torch"
