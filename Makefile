# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The local CPU wheel; any other torch spec pulls GBs of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# Chromium for the browser test (root only; without it that test skips and says why).
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ]; then apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1 || echo "warning: could not install chromium; the browser test will skip"; fi
	# CLIP's BPE vocabulary for the tiny test pipelines, taken from the open-clip-torch wheel (not installed).
	$(BIN)/python -m diffusion_sae.models.clip_bpe || echo "warning: CLIP BPE unavailable; tests needing it will skip"
	# torchvision has no CPU build here and, merely installed, breaks `import diffusers`.
	@if $(BIN)/pip show torchvision >/dev/null 2>&1; then echo "error: torchvision is installed in $(VENV); remove it (pip uninstall torchvision)"; exit 1; fi
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/diffusion-sae demo --out demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info
