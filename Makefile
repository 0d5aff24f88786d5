# Entry points for a fresh machine with Python 3.11 and pip:  make demo  /  make test
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STAMP_TEST := $(VENV)/.installed-test

.PHONY: install install-test test demo demo-ov2 clean

# The training install (no torch).
install: $(STAMP)

# Reinstall when the dependency list changes; otherwise a no-op.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e .
	touch $(STAMP)

# Test tools, the `export` extra (torch, open_clip: the export parity tests are part of the suite) and `viz`
# (TensorBoard, which reads the runs' event files in a test).
install-test: $(STAMP_TEST)

$(STAMP_TEST): $(STAMP)
	$(PY) -m pip install --quiet --no-compile -e ".[test,export,viz]"
	touch $(STAMP_TEST)

test: install-test
	$(PY) -m pytest tests -n 2 --dist worksteal

demo: install
	$(PY) train.py configs/demo.yml

# OpenVision 2 (caption loss only, visual token masking) on the same data, evaluated by caption likelihood.
demo-ov2: install
	$(PY) train.py configs/demo_ov2.yml

clean:
	rm -rf $(VENV) build *.egg-info
