# ComfyUI-GLM-Image: build, test, demo. Everything is installed explicitly into this checkout
# (.venv, .host, .cache, tests/browser/node_modules); Debian chromium is the only system package.
#
#   make test       the whole suite (core, parity, host, server, browser) on ComfyUI 0.3.75, and the
#                   host-dependent tiers (host, server, browser) on ComfyUI 0.33.0: what CI runs (.ci/run)
#   make demo       tiny checkpoint -> real ComfyUI server -> workflows/api/glm_image_t2i_api.json -> demo-output/
#   make help       all targets

SHELL := /bin/bash
.DEFAULT_GOAL := help
.NOTPARALLEL:
.DELETE_ON_ERROR:

PY       := .venv/bin/python
TINY     := .cache/models/diffusers/GLM-Image-tiny
ART      := test-artifacts
# Per-test timeout in seconds (pytest-timeout; fixture setup counts, e.g. a server start).
TIMEOUT  ?= 600
PYTEST_ARGS ?=
PYTEST   := OMP_NUM_THREADS=1 $(PY) -m pytest
# HOST=33: run a tier target against the ComfyUI 0.33.0 host (make host33) instead of 0.3.75
ifeq ($(HOST),33)
PYTEST   := OMP_NUM_THREADS=1 COMFYUI_DIR=$(CURDIR)/.host33/ComfyUI COMFY_PYTHON=$(CURDIR)/.venv33/bin/python \
            .venv33/bin/python -m pytest
endif
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

.PHONY: help host host33 tiny browser-deps test test-core test-fast test-host test-server test-browser \
        workflows-check demo bench bench-ar-deep bench-stock bench-train bench-ar-train bench-gguf memory fullsize fullsize-gguf gpu-bundle gpu-check gpu-rehearsal gpu-rehearsal-env registry-check clean distclean

help:
	@echo "make host          install the ComfyUI 0.3.75 test host + venv (scripts/install_host.sh; idempotent)"
	@echo "make host33        install the ComfyUI 0.33.0 test host + its venv (scripts/install_host33.sh; idempotent)"
	@echo "make tiny          write the tiny random-weight checkpoint to $(TINY) (when missing or stale)"
	@echo "make browser-deps  Debian chromium + playwright-core for the browser tier (scripts/install_browser.sh)"
	@echo "make test          both hosts + browser deps, then the WHOLE suite on both hosts (per-test timeout $(TIMEOUT)s)"
	@echo "make test-core     core tier only (plain PyTorch)"
	@echo "make test-fast     everything except the server and browser tiers"
	@echo "make test-host | test-server | test-browser   one tier (ComfyUI 0.3.75; HOST=33 for 0.33.0)"
	@echo "make workflows-check  committed workflows/api/*_api.json == conversion of their UI twins"
	@echo "make demo          run workflows/api/glm_image_t2i_api.json on the tiny checkpoint; PNG -> demo-output/"
	@echo "make bench         pack vs official pipeline, medium checkpoint, CPU (bench/run.py \$$BENCH_ARGS; ~5 min)"
	@echo "make bench-stock   the stock-sampler path and EasyCache on the DiT's MODEL, medium checkpoint (bench/bench_stock.py)"
	@echo "make bench-ar-deep AR per-token overhead at the official depth, pack vs transformers (bench/bench_ar.py --checkpoint deep; ~6 min)"
	@echo "make bench-train   a DiT LoRA trained with the stock Train LoRA node, medium checkpoint, ComfyUI 0.33 (bench/bench_train.py; ~4 min)"
	@echo "make bench-ar-train  an AR LoRA trained with GLM-Image Train AR LoRA, medium checkpoint (bench/bench_ar_train.py)"
	@echo "make bench-gguf    GGUF Q8_0/Q5_K/Q4_K vs bf16 and fp8: size, memory, speed, error (bench/bench_gguf.py; ~8 min)"
	@echo "make memory        GPU memory plan of a 1024² t2i (bench/memory.py \$$MEMORY_ARGS, e.g. --cpu-check; measured when CUDA is there)"
	@echo "make fullsize      the official-size random checkpoint on this machine: loading RSS, parity, whole t2i (~20 min + ~2.3 h for fp8; not in make test)"
	@echo "make fullsize-gguf the full-size DiT and AR converted to GGUF Q4_K, loaded quantized, vs bf16 (~30 min; not in make test)"
	@echo "make gpu-bundle    (here, with network) the wheels + ComfyUI source a GPU day needs, in .gpu-bundle/ (<= 64 MiB)"
	@echo "make gpu-check     on the lent GPU machine, offline, its own python3 + torch: pack vs official at full size, ..."
	@echo "make gpu-rehearsal the GPU day rehearsed here: a twin of the device image, offline, gpu_check --dry-run"
	@echo "make clean         remove caches, artifacts, demo output, node_modules (keeps .venv/.host)"
	@echo "make distclean     clean + remove .venv, .host, .venv33 and .host33"

host:
	bash scripts/install_host.sh

host33:
	bash scripts/install_host33.sh

tiny: host $(TINY)/model_index.json

# Rewritten when the writer changes; written to a temporary folder first so a half-written
# checkpoint is never picked up.
$(TINY)/model_index.json: glm_image_core/testing/tiny_checkpoint.py glm_image_core/loading/configs.py
	rm -rf $(TINY).tmp
	OMP_NUM_THREADS=1 $(PY) -m glm_image_core.testing.tiny_checkpoint $(TINY).tmp --size tiny
	rm -rf $(TINY) && mv $(TINY).tmp $(TINY) && touch $@

browser-deps:
	bash scripts/install_browser.sh

# The whole suite on both hosts (scripts/run_tests.sh); pytest's exit code (0 only when both runs
# passed) is kept in $(ART)/pytest-exit-code and one line per host in $(ART)/hosts.txt for .ci/run.
test: host host33 browser-deps gpu-rehearsal-env registry-check
	TIMEOUT=$(TIMEOUT) bash scripts/run_tests.sh $(PYTEST_ARGS)

test-core: host
	$(PYTEST) tests -q -rfEsx -m core --timeout=$(TIMEOUT) $(PYTEST_ARGS)

test-fast: host
	$(PYTEST) tests -q -rfEsx -m "not server and not browser" --timeout=$(TIMEOUT) $(PYTEST_ARGS)

test-host: host
	$(PYTEST) tests -q -rfEsx -m host --timeout=$(TIMEOUT) $(PYTEST_ARGS)

test-server: host
	$(PYTEST) tests -q -rfEsx -m server --timeout=$(TIMEOUT) $(PYTEST_ARGS)

test-browser: host browser-deps
	$(PYTEST) tests -q -rfEsx -m browser --timeout=$(TIMEOUT) $(PYTEST_ARGS)

workflows-check: host tiny
	$(PY) scripts/workflow_to_api.py --all --check

demo: host tiny
	$(PY) scripts/run_demo.py

# Writes bench/results/latest.{md,json}; e.g. BENCH_ARGS="--size tiny --reps 1" or "--profile".
BENCH_ARGS ?=
bench: host
	$(PY) bench/run.py $(BENCH_ARGS)

# The stock-sampler path: own vs SamplerCustomAdvanced vs EasyCache (bench/results/stock.{md,json}).
bench-stock: host
	OMP_NUM_THREADS=1 $(PY) bench/bench_stock.py $(BENCH_STOCK_ARGS)

# AR decode overhead at the official depth (40 layers, tiny width): bench/results/ar-deep.{md,json}.
bench-ar-deep: host
	OMP_NUM_THREADS=1 $(PY) bench/bench_ar.py --checkpoint deep --reps 5 $(BENCH_AR_ARGS)

# A DiT LoRA with the stock Train LoRA node, medium checkpoint: bench/results/train.{md,json} (~4 min).
bench-ar-train: host
	OMP_NUM_THREADS=1 $(PY) bench/bench_ar_train.py $(BENCH_AR_TRAIN_ARGS)

bench-train: host33
	COMFYUI_DIR=$(CURDIR)/.host33/ComfyUI OMP_NUM_THREADS=1 .venv33/bin/python bench/bench_train.py $(BENCH_TRAIN_ARGS)

bench-gguf: host
	OMP_NUM_THREADS=1 $(PY) bench/bench_gguf.py $(BENCH_GGUF_ARGS)

# Device-memory plan (any machine); on a CUDA machine it also runs the stages and measures them.
memory: host tiny
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) bench/memory.py $(MEMORY_ARGS)

# Opt-in heavy tier (tests/fullsize): writes .cache/models/diffusers/GLM-Image-full-bf16 (~34 GB) once,
# then bench/results/fullsize.{md,json}. Runs on the 0.33 host when installed. FULLSIZE_ARGS: e.g. -k t2i.
FULLSIZE_ARGS ?=
FULLSIZE_HOST = $(if $(wildcard .host33/ComfyUI/main.py),COMFYUI_DIR=$(CURDIR)/.host33/ComfyUI .venv33/bin/python,$(PY))
fullsize: host
	GLM_FULLSIZE=1 OMP_NUM_THREADS=$$(nproc) $(FULLSIZE_HOST) -m pytest tests/fullsize -q -rfEsx -p no:cacheprovider \
	  --junitxml=$(ART)/fullsize-junit.xml $(FULLSIZE_ARGS)

# The GGUF part of the full-size tier alone: Q4_K conversion (streamed), quantized loads, outputs vs bf16.
fullsize-gguf:
	$(MAKE) fullsize FULLSIZE_ARGS="-k gguf"

# The one prepared script for a lent GPU (bench/gpu_check.py; --dry-run runs in make test). Runs the
# pack on the 0.33 host (dynamic VRAM on, as ComfyUI's default on NVIDIA) when it is installed.
# The GPU day (docs/testing.md, "A GPU day"). gpu-bundle runs here, with network; gpu-check runs on the lent
# machine with its image's own python3 and torch and nothing from the network (scripts/gpu_check_device.sh);
# gpu-rehearsal runs that same script here in a twin of the device image, offline (scripts/gpu_rehearsal.py).
GPU_PYTHON ?= 3.12
gpu-bundle:
	python3 scripts/gpu_bundle.py --python-version $(GPU_PYTHON)

gpu-check:
	bash scripts/gpu_check_device.sh $(GPU_CHECK_ARGS)

# The Comfy Registry's own check of pyproject.toml's [tool.comfy] table and the package (comfy-cli, in its
# own venv: its dependencies are not ComfyUI's). Part of make test.
COMFY_CLI = .cache/comfy-cli/bin/comfy
$(COMFY_CLI):
	python3 -m venv .cache/comfy-cli && .cache/comfy-cli/bin/pip install -q --disable-pip-version-check comfy-cli==1.23.0

registry-check: $(COMFY_CLI)
	$(COMFY_CLI) --skip-prompt --no-enable-telemetry node validate

gpu-rehearsal-env: host host33
	python3 scripts/gpu_rehearsal.py prepare

gpu-rehearsal: gpu-rehearsal-env
	python3 scripts/gpu_rehearsal.py run $(GPU_CHECK_ARGS)

clean:
	rm -rf .cache $(ART) demo-output tests/browser/node_modules
	find . -path ./.venv -prune -o -path ./.host -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf .venv .host .venv33 .host33
