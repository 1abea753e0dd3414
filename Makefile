# Everything a fresh machine needs goes through the venv at .venv/ (created on first use).
#   make test                       run the test suite (what CI runs)
#   make data                       build the processed Beauty / Sports / Toys datasets (the committed
#                                   semantic IDs; SEMANTIC_IDS= to embed and cluster again)
#   make ablations [PROFILE=smoke]  run the ablation grid, then the aggregation notebooks
#   make lab                        JupyterLab with this project's environment
#                                   (headless / root: no browser and --allow-root are added by themselves;
#                                    any other options: make lab LAB_ARGS="--no-browser --ip=0.0.0.0 --port 8899")
#   make bench                      GPU speed benchmarks (needs CUDA)
# GPU users: pick a CUDA build of torch, e.g.
#   make install TORCH_SPEC='torch==2.11.0' TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 CONSTRAINTS=
# Machines without internet (README "Air-gapped GPU machines"): on a machine with internet
#   make wheelhouse WHEELHOUSE=wh PYTHON_VERSION=3.12 PLATFORM=manylinux_2_28_x86_64
# then, on the offline machine, with its Python that already has torch:
#   make install WHEELHOUSE=wh PYTHON=/path/to/python3
# `make install` remembers its settings in $(VENV)/install.mk; later targets reuse them (a setting
# given on the command line wins, and a changed one reinstalls).
SHELL := /bin/bash
VENV ?= .venv
-include $(VENV)/install.mk
PYTHON ?= python3
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
# a folder of wheels (`make wheelhouse`): install from it with no network, into a venv that sees the
# packages of $(PYTHON) (its torch, numpy, ...); empty: install from the package index
WHEELHOUSE ?=
EXTRAS ?= $(if $(WHEELHOUSE),run,all)
PROFILE ?= full
# code files of the semantic IDs the committed runs were trained on (gbla.data.semantic_ids): `make data`
# takes the codes from them instead of embedding + k-means, whose results depend on the CPU; empty
# (SEMANTIC_IDS=) recomputes them
SEMANTIC_IDS ?= outputs/data/semantic_ids
# pip constraints pinning the numerical stack (README "What is bit-reproducible"); with another torch
# than the pinned one (e.g. a CUDA build of another version) pass CONSTRAINTS= (empty)
CONSTRAINTS ?= constraints.txt
# the stamp names the install settings, so changing any of them reinstalls
INSTALL_KEY := $(shell printf '%s\n' '$(TORCH_SPEC)' '$(TORCH_INDEX_URL)' '$(EXTRAS)' '$(WHEELHOUSE)' '$(CONSTRAINTS)' | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(EXTRAS)-$(INSTALL_KEY)
# JupyterLab refuses to run as root and opens a browser: without a display there is none to open
LAB_ARGS ?= $(if $(DISPLAY)$(WAYLAND_DISPLAY),,--no-browser) $(if $(filter 0,$(shell id -u)),--allow-root)

# make wheelhouse: the target interpreter and platform (empty: this machine's), what to download
# (extras of pyproject.toml) and what the target already has. A package named in WHEELHOUSE_SKIP
# (fnmatch patterns) is left out with everything it depends on; the default is what a PyTorch GPU
# image has for certain. WHEELHOUSE_CONSTRAINTS: the target's `pip list --format=freeze` output,
# which pins the resolution to the target's versions and leaves out all it lists (the exact way).
PYTHON_VERSION ?=
PLATFORM ?=
WHEELHOUSE_EXTRAS ?= run
WHEELHOUSE_SKIP ?= torch triton numpy pandas scipy matplotlib seaborn pyarrow pyyaml tqdm
WHEELHOUSE_CONSTRAINTS ?=
# pip that resolves (default: that of a `python$(PYTHON_VERSION)` on PATH, else $(PYTHON)'s)
WHEELHOUSE_PIP ?=

.PHONY: install test data ablations lab bench wheelhouse clean-venv

$(STAMP): pyproject.toml $(CONSTRAINTS)
ifeq ($(strip $(WHEELHOUSE)),)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[$(EXTRAS)]"
else
	@test -d "$(WHEELHOUSE)" || { echo "WHEELHOUSE=$(WHEELHOUSE) is not a folder (make wheelhouse builds one)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@grep -qi '^include-system-site-packages *= *true' $(VENV)/pyvenv.cfg || { echo "$(VENV) does not see \
	the system's packages (torch, ...): make clean-venv, then make install WHEELHOUSE=$(WHEELHOUSE) again"; exit 1; }
	$(PY) -m pip install -q --disable-pip-version-check --no-index --find-links "$(WHEELHOUSE)" -e ".[$(EXTRAS)]"
endif
	@rm -f $(VENV)/.installed-*
	@printf '%s ?= %s\n' TORCH_SPEC '$(TORCH_SPEC)' TORCH_INDEX_URL '$(TORCH_INDEX_URL)' EXTRAS '$(EXTRAS)' \
	    WHEELHOUSE '$(WHEELHOUSE)' CONSTRAINTS '$(CONSTRAINTS)' > $(VENV)/install.mk
	@touch $@

install: $(STAMP)

# wheels to run the grid on a machine without internet (README "Air-gapped GPU machines")
wheelhouse:
	$(PYTHON) tools/wheelhouse.py --dest "$(or $(WHEELHOUSE),wheelhouse)" --extras "$(WHEELHOUSE_EXTRAS)" \
	    --python-version "$(PYTHON_VERSION)" --platform "$(PLATFORM)" --skip "$(WHEELHOUSE_SKIP)" \
	    --constraints "$(WHEELHOUSE_CONSTRAINTS)" --pip "$(WHEELHOUSE_PIP)"

test: $(STAMP)
	$(PY) -m pytest -q

data: $(STAMP)
	$(PY) -m gbla.data.build --all $(if $(SEMANTIC_IDS),--semantic-ids $(SEMANTIC_IDS))

# the smoke profile runs on a synthetic dataset; every other profile needs the processed data:
# only datasets not built yet are built (a build with other settings, e.g. another embedding model, is kept)
ablations: $(STAMP)
	$(if $(filter smoke,$(PROFILE)),,$(PY) -m gbla.data.build --all --if-missing $(if $(SEMANTIC_IDS),--semantic-ids $(SEMANTIC_IDS)))
	$(PY) -m gbla.grid --profile $(PROFILE)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $(LAB_ARGS)

bench: $(STAMP)
	$(PY) -m gbla.bench.layer_speed

clean-venv:
	rm -rf $(VENV)
