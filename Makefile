# Quick start: `make demo` (train a tiny Llama on the bundled sample corpus) and `make test`.
# Both create/reuse .venv and install everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install gpu-install clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt pytest
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

gpu-install: $(STAMP)
	$(PY) -m pip install -q packaging ninja
	MAMBA_FORCE_BUILD=TRUE $(PY) -m pip install --no-build-isolation -r requirements-gpu.txt

clean:
	rm -rf runs data/prepared
