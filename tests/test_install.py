"""What a fresh install gives: the console script without the train extra, numpy present, ALLO_NATIVE_ISA checked."""

import ctypes
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from allo_kernels import SparseAdamW
from allo_kernels.optim import _native
from allo_train import _entry

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# Runs `code` with the named top-level modules unimportable, as if their packages were not installed.
_BLOCKED = """
import sys
BLOCKED = set(sys.argv[1].split(","))


class Uninstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Uninstalled())
sys.argv = sys.argv[2:]
"""


def _python(code: str, *args: str, blocked: tuple[str, ...] = (), env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED + code, ",".join(blocked) or "-", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _requirement_name(spec: str) -> str:
    for sep in "<>=!~;[ ":
        spec = spec.split(sep, 1)[0]
    return spec.lower()


def test_console_script_is_the_checked_entry():
    assert _pyproject()["project"]["scripts"]["allo-train"] == "allo_train._entry:main"


def test_entry_checks_every_module_of_the_train_extra():
    dists = {_requirement_name(s) for s in _pyproject()["project"]["optional-dependencies"]["train"]}
    import_name = {"pyyaml": "yaml"}
    assert {import_name.get(d, d) for d in dists} == set(_entry.TRAIN_MODULES)


@pytest.mark.parametrize("blocked", [("yaml",), ("yaml", "deepspeed")])
def test_allo_train_without_the_train_extra_says_what_to_install(blocked):
    code = "from allo_train._entry import main\nrc = main()\nprint('torch imported:', 'torch' in sys.modules)\n"
    run = _python(code, "allo-train", "pipeline", "--config", "cfg.yaml", blocked=blocked)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("allo-train: the training CLI needs the train extra")
    assert lines[0].endswith('pip install "allo[train]"')
    assert all(repr(m) in lines[0] for m in blocked)
    assert run.stdout.strip() == "torch imported: False"  # checked before anything heavy is imported


def test_allo_train_entry_exits_2_and_runs_the_cli_when_the_extra_is_there():
    run = _python("from allo_train._entry import main\nsys.exit(main())", blocked=("tqdm",))
    assert run.returncode == 2 and "'tqdm'" in run.stderr and "Traceback" not in run.stderr
    sys_argv = "sys.argv = ['allo-train', '--help']\n"
    run = _python(sys_argv + "from allo_train._entry import main\nsys.exit(main())")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: allo-train")


def test_python_m_allo_train_cli_checks_the_train_extra_too():
    # `make demo` and the deepspeed launcher run the module, not the console script.
    code = "import runpy\nrunpy.run_module('allo_train.cli', run_name='__main__')\n"
    run = _python(code, "allo-train", "pipeline", "--config", "cfg.yaml", blocked=("yaml",))
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.splitlines()
    assert line.startswith("allo-train: the training CLI needs the train extra") and "'yaml'" in line


def test_numpy_is_a_core_dependency_and_imports_print_no_numpy_warning():
    assert "numpy" in {_requirement_name(s) for s in _pyproject()["project"]["dependencies"]}
    run = _python("import torch", blocked=("numpy",))  # what every import printed in a torch-only environment
    assert run.returncode == 0 and "Failed to initialize NumPy" in run.stderr
    run = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import allo_kernels"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "NumPy" not in run.stderr


@pytest.fixture
def fresh_native(monkeypatch):
    """_native as before its first load (restored afterwards); the library itself stays loaded in the process."""
    monkeypatch.setattr(_native, "_loaded", False)
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_error", None)
    return monkeypatch


@pytest.mark.parametrize("value", ["bogus", "AVX2", " avx2", "avx-512", "native"])
def test_native_isa_cap_rejects_unknown_values(fresh_native, value):
    fresh_native.setenv("ALLO_NATIVE_ISA", value)
    message = f"ALLO_NATIVE_ISA must be one of avx512|avx2|default .*got {value!r}"
    with pytest.raises(ValueError, match=message):
        _native.available()
    p = torch.zeros(4, 3, requires_grad=True)
    p.grad = torch.ones(4, 3)
    opt = SparseAdamW([p], masks={p: torch.tensor([True, False, True, False])}, backend="native")
    with pytest.raises(ValueError, match=message):  # the optimizer's first step, on the user's path
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(4, 3))
    fresh_native.delenv("ALLO_NATIVE_ISA")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "native library not available" where none is built
        opt.step()  # fixed: runs
    assert not torch.equal(p.detach(), torch.zeros(4, 3))


@pytest.mark.parametrize("value", ["avx512", "avx2", "default", "", None])
def test_native_isa_cap_accepts_the_builds_and_empty_or_unset(fresh_native, value):
    if value is None:
        fresh_native.delenv("ALLO_NATIVE_ISA", raising=False)
    else:
        fresh_native.setenv("ALLO_NATIVE_ISA", value)
    _native.available()  # no error; whether a library is built is another matter
    assert _native.load_error() is None or "ALLO_NATIVE_ISA" not in _native.load_error()


_LEVEL = """
import ctypes
print(ctypes.CDLL(sys.argv[0]).allo_native_isa_level())
"""


@pytest.mark.skipif(not _native.available(), reason="native library not built")
def test_native_library_reads_every_cap_python_accepts():
    # The library reads ALLO_NATIVE_ISA itself, once, when it first dispatches: each value in a fresh process (ctypes
    # only, no torch). Python's list (_native._ISA_NAMES: level -> name) must mean to the C++ what it says.
    ctypes.CDLL(_native.library_path())  # loadable here

    def level(value):
        env = {k: v for k, v in os.environ.items() if k != "ALLO_NATIVE_ISA"}
        if value is not None:
            env["ALLO_NATIVE_ISA"] = value
        run = _python(_LEVEL, _native.library_path(), env=env)
        assert run.returncode == 0, run.stderr
        return int(run.stdout)

    best = level(None)
    assert level("") == best
    for cap_level, name in _native._ISA_NAMES.items():
        assert level(name) == min(best, cap_level), name
