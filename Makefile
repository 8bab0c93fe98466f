# Quick start: `make demo` (train a tiny Llama on the bundled sample corpus) and `make test`.
# Both create/reuse .venv and install everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-triton sm90-compile test-compat test-slurm test-gpu lint format install gpu-install clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

# The Triton kernels on CPU through Triton's interpreter, and each one compiled for sm_90 (H100/H200).
# triton goes into .triton-site, outside the venv, so `make test` keeps skipping these files; the
# version is pinned so CI and developers interpret the same Triton.
TRITON_INTERPRETER ?= triton==3.9.0
TRITON_TESTS := tests/decode/test_triton_decode.py tests/decode/test_triton_gemv.py tests/decode/test_triton_mamba_step.py tests/decode/test_triton_tele_readout.py tests/decode/test_triton_tele_update.py tests/decode/test_gluon_chain.py \
	tests/decode/test_sm90_compile.py tests/models/test_causal_conv_triton.py \
	tests/models/test_ssd_step_triton.py experiments/test_stream_read.py experiments/test_decode_attention_bench.py \
	experiments/test_causal_conv_tiles.py experiments/test_tele_readout_precision.py
test-triton: $(STAMP)
	test -d .triton-site || $(PY) -m pip install -q --no-deps --target .triton-site "$(TRITON_INTERPRETER)"
	TRITON_INTERPRET=1 PYTHONPATH=.triton-site OMP_NUM_THREADS=1 $(PY) -m pytest -q $(TRITON_TESTS)

# Every kernel compiled for sm_90 with the Triton the GPU host runs (3.6, torch 2.11's), the Gluon
# step's included (its API is that release's): registers and stack bytes per kernel, a JSON line each.
TRITON_DEVICE ?= triton==3.6.0
sm90-compile: $(STAMP)
	test -d .triton-device-site || $(PY) -m pip install -q --no-deps --target .triton-device-site "$(TRITON_DEVICE)"
	PYTHONPATH=.triton-device-site $(PY) tests/decode/sm90_compile_cases.py

# scripts/slurm/train.sbatch on a one-node Slurm cluster started on localhost (as root; apt-installs slurmctld,
# slurmd and munge if missing): CPU ranks over gloo, cancel / time-limit signal / requeue, exact resume.
test-slurm: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slurm tests/scripts/test_slurm.py

# Exports against the loaders of the tools they target, each in its own folder so `make test` keeps
# skipping these: transformers at requirements.txt's floor (with the tokenizers / huggingface_hub it
# was released with) in .compat/transformers4, run in a subprocess; mamba_ssm built without CUDA in
# .compat/mamba_ssm, importable through tests/stubs (its Mamba-1 extension) and the Triton of test-triton.
COMPAT_TRANSFORMERS4 ?= transformers==4.48.0 tokenizers==0.21.0 huggingface-hub==0.27.1
COMPAT_MAMBA_SSM ?= mamba-ssm==2.3.2.post1
test-compat: $(STAMP)
	test -d .compat/transformers4 || $(PY) -m pip install -q --no-deps --target .compat/transformers4 $(COMPAT_TRANSFORMERS4)
	test -d .triton-site || $(PY) -m pip install -q --no-deps --target .triton-site "$(TRITON_INTERPRETER)"
	test -d .compat/mamba_ssm || MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE $(PY) -m pip install -q --no-deps \
		--no-build-isolation --target .compat/mamba_ssm "$(COMPAT_MAMBA_SSM)" einops
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/export/test_export_compat.py
	PYTHONPATH=tests/stubs:.compat/mamba_ssm:.triton-site OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/models/test_mamba_ssm_compat.py

# Every gpu-marked test (the experiments' kernel checks too); run on a CUDA host after `make gpu-install`.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests experiments

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

gpu-install: $(STAMP)
	$(PY) -m pip install -q packaging ninja
	MAMBA_FORCE_BUILD=TRUE $(PY) -m pip install --no-build-isolation -r requirements-gpu.txt

clean:
	rm -rf runs data/prepared
