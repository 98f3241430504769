# Two entry points: `make serve` and `make test`. Each builds the pinned venv it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= tiny-random
PORT ?= 8000
ARGS ?=

.PHONY: serve test lint format

# Triton also runs our kernels in its interpreter on CPU-only machines (tests/interpreted_kernels.py);
# a GPU box already has the triton its CUDA torch needs, and keeps that one.
$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q triton==3.9.0
	touch $@

serve: $(VENV)/.installed
	$(PY) server.py --model $(MODEL) --port $(PORT) $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
