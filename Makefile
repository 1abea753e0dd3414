# Everything a fresh machine needs goes through the venv at .venv/ (created on first use).
#   make test                       run the test suite (what CI runs)
#   make data                       build the processed Beauty / Sports / Toys datasets
#   make ablations [PROFILE=smoke]  run the ablation grid, then the aggregation notebooks
#   make lab                        JupyterLab with this project's environment
#                                   (headless / root: no browser and --allow-root are added by themselves;
#                                    any other options: make lab LAB_ARGS="--no-browser --ip=0.0.0.0 --port 8899")
#   make bench                      GPU speed benchmarks (needs CUDA)
# GPU users: pick a CUDA build of torch, e.g.
#   make install TORCH_SPEC='torch==2.11.0' TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
EXTRAS ?= all
PROFILE ?= full
STAMP := $(VENV)/.installed-$(EXTRAS)
# JupyterLab refuses to run as root and opens a browser: without a display there is none to open
LAB_ARGS ?= $(if $(DISPLAY)$(WAYLAND_DISPLAY),,--no-browser) $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: install test data ablations lab bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	@touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

data: $(STAMP)
	$(PY) -m gbla.data.build --all

# the smoke profile runs on a synthetic dataset; every other profile needs the processed data:
# only datasets not built yet are built (a build with other settings, e.g. another embedding model, is kept)
ablations: $(STAMP)
	$(if $(filter smoke,$(PROFILE)),,$(PY) -m gbla.data.build --all --if-missing)
	$(PY) -m gbla.grid --profile $(PROFILE)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $(LAB_ARGS)

bench: $(STAMP)
	$(PY) -m gbla.bench.layer_speed

clean-venv:
	rm -rf $(VENV)
