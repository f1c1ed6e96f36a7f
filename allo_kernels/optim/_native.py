"""ctypes binding of the native CPU library (allo_kernels/csrc, built by CMakeLists.txt through setup.py).

The library is found as ``allo_kernels/_native*.so`` (``.dylib``/``.pyd`` alike) next to the package, or at the path
in ``ALLO_NATIVE_LIB``. It has a plain C ABI and no torch dependency; a missing or broken library is not an error here:
``available()`` is False and SparseAdamW warns once and uses its torch reference.
"""

from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path

import torch

from ._layout import Layout
from ._reference import StepScalars

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_lib = None
_error: str | None = None
_loaded = False


def library_path() -> str | None:
    env = os.environ.get("ALLO_NATIVE_LIB")
    if env:
        return env
    pkg = Path(__file__).resolve().parent.parent
    for pattern in ("_native*.so", "_native*.dylib", "_native*.pyd", "_native*.dll"):
        hits = sorted(glob.glob(str(pkg / pattern)))
        if hits:
            return hits[0]
    return None


# Vector builds of the native step by level (the library's allo_native_isa_level()). Also the values ALLO_NATIVE_ISA
# accepts as a cap, read by the library itself (csrc/sparse_adamw.cpp) and checked here first: the C++ ignores a value
# it does not know, so a misspelt cap would silently run the best build.
_ISA_NAMES = {0: "default", 1: "avx2", 2: "avx512"}
ISA_ENV = "ALLO_NATIVE_ISA"


def _check_isa_cap() -> None:
    cap = os.environ.get(ISA_ENV)
    if cap and cap not in _ISA_NAMES.values():
        allowed = "|".join(reversed(_ISA_NAMES.values()))
        raise ValueError(
            f"{ISA_ENV} must be one of {allowed} (or empty / unset for the best build the CPU runs), got {cap!r}"
        )


def _load():
    global _lib, _error, _loaded
    if _loaded:
        return _lib
    _check_isa_cap()  # before _loaded is set: a bad value is refused on every call until it is fixed
    _loaded = True
    path = library_path()
    if path is None:
        _error = "no allo_kernels/_native*.so found next to the package and ALLO_NATIVE_LIB is not set"
        return None
    try:
        lib = ctypes.CDLL(path)
        if lib.allo_native_abi_version() != 1:
            raise OSError(f"ABI version {lib.allo_native_abi_version()} != 1 (rebuild allo)")
        fn = lib.allo_sparse_adamw_step
        P, I64, F, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        fn.argtypes = [INT, INT, P, P, P, P, P, P, P, P, P, P, I64, I64, F, F, F, F, F, F, F, INT, INT, INT]
        fn.restype = INT
        _lib = lib
    except (OSError, AttributeError) as exc:
        _error = f"loading {path} failed: {exc}"
        _lib = None
    return _lib


def available() -> bool:
    return _load() is not None


def isa() -> str | None:
    """The vector build the native step runs: "avx512", "avx2" or "default" (portable); None without the library.

    Picked from cpuid when the library loads; ``ALLO_NATIVE_ISA=avx512|avx2|default`` caps it (benchmarks, bug
    reports); any other non-empty value is a ValueError.
    """
    lib = _load()
    if lib is None:
        return None
    return _ISA_NAMES.get(int(lib.allo_native_isa_level()), "default")


def load_error() -> str | None:
    _load()
    return _error


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def step(
    param: torch.Tensor,
    grad: torch.Tensor,
    layout: Layout,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    max_exp_avg_sq: torch.Tensor | None,
    master: torch.Tensor | None,
    sc: StepScalars,
) -> bool:
    """Run one update on CPU tensors; False when this dtype combination has no native kernel (use the reference)."""
    lib = _load()
    pcode, gcode = _DTYPE_CODE.get(param.dtype), _DTYPE_CODE.get(grad.dtype)
    if lib is None or pcode is None or gcode is None or param.device.type != "cpu" or grad.device.type != "cpu":
        return False
    seg_param, seg_state, seg_len, emask = layout.cpu_tables()
    rc = lib.allo_sparse_adamw_step(
        pcode,
        gcode,
        _ptr(param),
        _ptr(grad),
        _ptr(exp_avg),
        _ptr(exp_avg_sq),
        _ptr(max_exp_avg_sq),
        _ptr(master),
        _ptr(emask),
        _ptr(seg_param),
        _ptr(seg_state),
        _ptr(seg_len),
        int(seg_len.numel()),
        int(layout.n_compact),
        sc.decay,
        1 - sc.beta1,
        sc.beta2,
        1 - sc.beta2,
        sc.bias_correction2_sqrt,
        sc.eps,
        -sc.step_size,
        int(sc.weight_decay != 0),
        int(sc.maximize),
        torch.get_num_threads(),
    )
    return rc == 0
