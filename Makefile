# One command sets up and tests (`make test`), one sets up and runs the main job (`make run`).
# The virtual environment lives in .venv; torch is installed first as the CPU build 2.13.0 so the
# package's torch range does not pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup test run clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: setup
	$(PY) -m pytest -q tests

run: setup
	$(PY) scripts/main_job.py

clean:
	rm -rf $(VENV) outputs
