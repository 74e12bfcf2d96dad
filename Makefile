# One command sets up and tests (`make test`), one sets up and runs the main job (`make run`).
# The virtual environment lives in .venv. torch is installed first, as the build TORCH_BUILD names, so that the
# package's torch range is already satisfied and pulls nothing else:
#   TORCH_BUILD=cpu  (default) the CPU-only wheel torch==$(TORCH_VERSION)+cpu (about 200 MB, no CUDA libraries):
#                    from the indexes pip is configured with when one has it, else from PyTorch's CPU index.
#   TORCH_BUILD=cuda the public index's (PyPI's) Linux wheel torch==$(TORCH_VERSION), built with CUDA; its CUDA
#                    libraries and Triton come with it (several GB).
# A plain `pip install torch` from PyPI on Linux is the CUDA build. To switch builds: `make clean`, then
# `make test TORCH_BUILD=...`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_BUILD ?= cpu
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

ifeq ($(TORCH_BUILD),cpu)
INSTALL_TORCH = $(PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" \
	|| $(PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" --extra-index-url $(TORCH_CPU_INDEX)
else ifeq ($(TORCH_BUILD),cuda)
INSTALL_TORCH = $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
else
$(error TORCH_BUILD must be cpu or cuda, not "$(TORCH_BUILD)")
endif

.PHONY: setup test run clean

setup: $(VENV)/.installed

# setuptools >= 77 reads pyproject.toml's SPDX license string (the wheel test builds without build isolation).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77"
	$(INSTALL_TORCH)
	$(PY) -m pip install -q -e ".[test]"
	echo $(TORCH_BUILD) > $@

test: setup
	$(PY) -m pytest -q tests

run: setup
	$(PY) scripts/main_job.py

clean:
	rm -rf $(VENV) outputs
