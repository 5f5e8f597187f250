# Set-up and entry points. Every target creates .venv on first use and reuses it after.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo clean-demo

install: $(STAMP)

# torch is installed on its own first, pinned, so that no later requirement can pull another build
# (a CUDA wheel of several GB). The stamp depends on pyproject.toml, so a changed dependency list
# re-runs the install.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: $(STAMP)
	$(PY) scripts/demo.py --output-dir runs/demo

clean-demo:
	rm -rf runs/demo
