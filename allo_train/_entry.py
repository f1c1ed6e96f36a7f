"""The ``allo-train`` console script: checks that the ``allo[train]`` extra is installed, then runs ``allo_train.cli``
(``python -m allo_train.cli`` makes the same check).

A plain ``pip install allo`` installs the command but none of the training dependencies; without this check the first
use ends in ``ModuleNotFoundError: No module named 'yaml'``. The check only looks the modules up (no import), so it
costs milliseconds and runs before anything heavy.
"""

from __future__ import annotations

import importlib.util
import sys

# Import names of the ``train`` extra's packages in pyproject.toml (pyyaml installs ``yaml``).
TRAIN_MODULES = ("yaml", "transformers", "deepspeed", "safetensors", "tqdm", "matplotlib", "peft")


def missing_train_modules() -> list[str]:
    missing = []
    for name in TRAIN_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install (or a finder refusing the name) counts as missing
            found = False
        if not found:
            missing.append(name)
    return missing


def missing_train_extra() -> int:
    """0 when the train extra is installed; else print the one-line fix and return the exit status 2."""
    missing = missing_train_modules()
    if not missing:
        return 0
    print(
        f"allo-train: the training CLI needs the train extra, which is not installed (no module named "
        f'{", ".join(repr(m) for m in missing)}): pip install "allo[train]"',
        file=sys.stderr,
    )
    return 2


def main() -> int:
    if missing_train_extra():
        return 2
    from .cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
