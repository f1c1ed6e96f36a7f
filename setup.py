"""Build hook: compiles the optional native CPU library (allo_kernels/csrc, via CMakeLists.txt) at install time.

Everything else lives in pyproject.toml. The native library is a plain C++ shared object loaded with ctypes, so the
build needs only a C++ compiler and CMake, never torch. When CMake or a compiler is missing the install still
succeeds: allo_kernels then warns once and uses its torch fallback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _cmake_executable() -> str | None:
    exe = shutil.which("cmake")
    if exe:
        return exe
    try:  # the `cmake` package from PyPI, if the user has it
        import cmake  # type: ignore

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except Exception:
        return None


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        cmake = _cmake_executable()
        if cmake is None:
            print(
                "allo: cmake not found; skipping the native CPU optimizer library (torch fallback will be used)",
                file=sys.stderr,
            )
            return
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("ALLO_NATIVE_BUILD_TYPE", "Release")
        try:
            subprocess.run(
                [
                    cmake,
                    "-S",
                    str(ROOT),
                    "-B",
                    str(build_dir),
                    f"-DCMAKE_BUILD_TYPE={cfg}",
                    f"-DALLO_OUTPUT_FILE={out_path}",
                ],
                check=True,
            )
            subprocess.run(
                [cmake, "--build", str(build_dir), "--config", cfg, "-j", str(os.cpu_count() or 1)], check=True
            )
        except (subprocess.CalledProcessError, OSError) as exc:
            if os.environ.get("ALLO_REQUIRE_NATIVE") == "1":
                raise
            print(
                f"allo: building the native CPU library failed ({exc}); the torch fallback will be used",
                file=sys.stderr,
            )


ext_modules = [CMakeExtension("allo_kernels._native")] if (ROOT / "CMakeLists.txt").exists() else []

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
