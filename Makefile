# mnemo: `make train` and `make test` each set themselves up on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
ARGS   ?=

export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled

.PHONY: setup train test clean

# Torch goes in first and pinned: a loose requirement in an empty venv pulls a multi-GB CUDA build.
# An existing torch (e.g. a GPU image's) is kept.
$(VENV)/.installed: pyproject.toml
	@# --system-site-packages: a GPU image's own CUDA torch stays visible and is used as is.
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) -m train config=configs/tiny.yaml $(ARGS)

# The CPU suite (any GPU hidden: what CI runs), then, where a GPU is present, the GPU tests (tests/conftest.py).
test: setup
	$(PY) -m pytest -q -ra --durations=15 $(ARGS)
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		echo "a GPU is present: the GPU session (pytest --device cuda)"; \
		$(PY) -m pytest -q -ra --device cuda $(ARGS); \
	fi

clean:
	rm -rf $(VENV) runs .pytest_cache
