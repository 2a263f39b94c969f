# Two entry points: `make demo` and `make test`. Both create .venv on first use.
# `make bench` also builds .bench-venv (benchmark peers; see below).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-slow test-gpu bench bench-venv bench-sae clean world

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
	$(BIN)/ruff check .
	# The public API as users call it (tests/typing/public_api.py), type-checked ([tool.mypy] in pyproject.toml).
	$(BIN)/python -m mypy --config-file pyproject.toml tests/typing/public_api.py
	$(BIN)/python -m pytest -q

# Rebuild every shipped ShapesCanvas asset from nothing (hours of CPU; resumable: rerun after a kill),
# then copy it over diffusion_sae/world/assets/ (a developer step: the library never writes there).
# The shipped v2 was fine-tuned from the v1 pipeline (git history, before world v2 landed):
# WORLD_FLAGS="--init-from <v1 pipeline> --unet-steps 1500 --keep-classifier <v1 classifier>".
WORLD_OUT   ?= build/world
WORLD_FLAGS ?= --unet-steps 8000
world: $(STAMP)
	$(BIN)/diffusion-sae world rebuild --out $(WORLD_OUT) $(WORLD_FLAGS)
	rm -rf diffusion_sae/world/assets/shapescanvas diffusion_sae/world/assets/classifier
	cp -r $(WORLD_OUT)/shapescanvas $(WORLD_OUT)/classifier diffusion_sae/world/assets/
	# every SAE folder is replaced (the presets file, params.json, stays: `tune` makes it)
	find diffusion_sae/world/assets/saes -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
	cp -r $(WORLD_OUT)/saes/. diffusion_sae/world/assets/saes/
	cp $(WORLD_OUT)/rebuild.json $(WORLD_OUT)/world-eval.json diffusion_sae/world/assets/

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# On a machine with a CUDA GPU (and a CUDA build of torch in .venv): every path in half precision on the GPU
# (tests/test_gpu.py), then the GPU cost benchmark at SD 1.5 / SDXL size (benchmarks/gpu.py).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m "gpu or not slow" tests/test_gpu.py tests/test_devices.py
	$(BIN)/python benchmarks/gpu.py --json gpu-benchmark.json

# Bench venv: the peers that benchmarks/sae_train.py compares against (SAELens, EleutherAI sparsify),
# pinned in benchmarks/requirements-peers.txt and never project dependencies. One resolve of this
# project + peers under benchmarks/constraints-bench.txt (torch held at the local CPU 2.13.0 wheel;
# torchvision/timm/open-clip made unsatisfiable so nothing can pull them in).
BENCH_VENV  := .bench-venv
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): pyproject.toml benchmarks/requirements-peers.txt benchmarks/constraints-bench.txt
	test -x $(BENCH_VENV)/bin/python || $(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/pip install -q -c benchmarks/constraints-bench.txt -e . -r benchmarks/requirements-peers.txt
	@bad="$$($(BENCH_VENV)/bin/pip list 2>/dev/null | grep -i -E '^(nvidia|torchvision)')"; \
	if [ -n "$$bad" ]; then echo "error: $(BENCH_VENV) has CUDA/torchvision packages:"; echo "$$bad"; exit 1; fi
	$(BENCH_VENV)/bin/python -c "import sys, torch; sys.exit(None if torch.__version__.split('+')[0] == '2.13.0' else 'error: torch ' + torch.__version__ + ' in $(BENCH_VENV); expected 2.13.0')"
	touch $(BENCH_STAMP)

bench-venv: $(BENCH_STAMP)

# All benchmarks with .venv's python, except sae_train.py, which run_all.py runs with BENCH_PYTHON.
bench: $(STAMP) $(BENCH_STAMP)
	BENCH_PYTHON=$(BENCH_VENV)/bin/python $(BIN)/python benchmarks/run_all.py

bench-sae: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python benchmarks/sae_train.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) build dist *.egg-info
