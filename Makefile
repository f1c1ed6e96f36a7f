# One-command set-up on our CPU machines and CI: a virtualenv in .venv with the local CPU torch, never a CUDA wheel.
# On a GPU box, install your own torch first and then `pip install -e ".[dev]"` (or ".[dev,gpu]").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
STAMP := $(VENV)/.allo-installed

.PHONY: install lint format test test-gpu demo quickstart bench bench-cpu clean

$(STAMP): pyproject.toml setup.py $(wildcard CMakeLists.txt) $(wildcard allo_kernels/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23" "setuptools>=64" wheel
	# torch first, pinned, so nothing below can pull the registry's CUDA build.
	$(PIP) install -q "$(TORCH_SPEC)"
	# DeepSpeed ships an sdist whose setup.py imports torch: build it against the torch above, no JIT ops.
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Lint and format check first: a ruff finding fails `make test` (and so CI).
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest -q tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q tests -m gpu

demo: $(STAMP)
	$(PY) -m allo_train.cli demo --output-dir demo_out

quickstart: $(STAMP)
	$(PY) examples/quickstart.py

# Results go to the git-ignored .bench-results/; `make bench-cpu SAVE=1` updates the committed benchmarks/results/.
BENCH_SAVE := $(if $(SAVE),--save)

bench-cpu: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-min-rounds=3 $(BENCH_SAVE)

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only $(BENCH_SAVE)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
