# lrnserve developer entry points. A newcomer needs two: `make serve` and `make test`.
#
# Both create .venv on first use. In CPU environments torch==2.13.0 is installed first,
# from PyTorch's CPU wheel index when it is reachable (else from pip's configured
# sources), so that pip never pulls the multi-GB CUDA build. On a GPU machine
# (nvidia-smi present) the default PyPI build, which bundles CUDA, is installed instead.
# Override with TORCH_SPEC / TORCH_INDEX, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
CPU_TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test install prometheus container-test lint typecheck bench gpu-wheels gpu-check clean

serve: $(VENV)/.installed
	$(BIN)/lrnserve serve --plaintext $(ARGS)

test: $(VENV)/.installed prometheus
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The metrics tests run a real Prometheus and promtool: Debian's package, installed when missing.
prometheus:
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
		echo "installing Debian's prometheus package (server + promtool) for the metrics tests"; \
		$$sudo apt-get update -qq && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
		|| echo "could not install prometheus; the metrics tests will fail and say so" >&2; \
	else \
		echo "no apt-get: install Prometheus and promtool yourself; the metrics tests need them" >&2; \
	fi

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif [ -n "$(TORCH_INDEX)" ]; then \
		$(BIN)/python -m pip install "$(TORCH_SPEC)" --extra-index-url "$(TORCH_INDEX)"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing the CUDA build of $(TORCH_SPEC) from PyPI"; \
		$(BIN)/python -m pip install "$(TORCH_SPEC)"; \
	elif $(BIN)/python -c "import urllib.request as u; u.urlopen('$(CPU_TORCH_INDEX)/torch/', timeout=5)" 2>/dev/null; then \
		echo "CPU only: installing $(TORCH_SPEC) from $(CPU_TORCH_INDEX)"; \
		$(BIN)/python -m pip install "$(TORCH_SPEC)" --extra-index-url "$(CPU_TORCH_INDEX)"; \
	else \
		echo "CPU only, $(CPU_TORCH_INDEX) unreachable: installing $(TORCH_SPEC) from pip's configured sources"; \
		$(BIN)/python -m pip install "$(TORCH_SPEC)"; \
	fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Build the image with podman and test it for real (root; see deploy/docker/container-test.sh).
container-test: $(VENV)/.installed
	bash deploy/docker/container-test.sh $(BIN)/python

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

bench: $(VENV)/.installed
	$(BIN)/python bench/ops.py

# The GPU check (bench/gpu_check.py): gpu-wheels here, with the package registries; gpu-check on
# the GPU machine, which has no network (it uses its own python3, torch and Triton). Without a GPU,
# `make gpu-check ARGS=--dry-run` checks the wheels and the commands.
gpu-wheels: $(VENV)/.installed
	$(BIN)/python bench/gpu_check.py download

gpu-check:
	$(PYTHON) bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
