# walkforge — every target installs what it needs first (idempotent).
PYTHON ?= python3
STAMP := build/.installed

.PHONY: install demo test test-fast lint bench regress goldens gpu-check gpu-bench gpu-table clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q -e '.[cpu,compile,text,serve,ray,dev]'
	@mkdir -p build && touch $(STAMP)

install: $(STAMP)

## The main job: compile tiny pi0, run it, print actions, parity vs torch and latency.
demo: $(STAMP)
	$(PYTHON) -m walkforge.cli demo -o build/pi0-tiny

## The test suite (CPU only; GPU/TensorRT tests skip with a reason), the recipe regression vs the
## goldens included (tests/test_regress.py). TEST_WORKERS pytest-xdist workers share one cache of
## compiled bundles (tests/bundles.py); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PYTHON) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadgroup

test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PYTHON) -m ruff check .

## Benchmarks (not run in CI): bundles vs the torch reference, each backend in its own process.
bench: $(STAMP)
	$(PYTHON) -m walkforge.cli compile vae --variant sd -o build/vae-sd --force
	$(PYTHON) -m walkforge.cli bench build/vae-sd --dim height=32 --dim width=32 --report reports
	$(PYTHON) -m walkforge.cli bench build/vae-sd --backends cpu,torch --dim height=64 --dim width=64 \
		--warmup 1 --iters 3  # 512x512 decode
	$(PYTHON) -m walkforge.cli bench build/vae-sd --backends cpu,torch --dim height=128 --dim width=128 \
		--setting tiled=1 --setting tile_size=512 --warmup 0 --iters 1  # 1024x1024, tiled as SD's VAE
	$(PYTHON) -m walkforge.cli compile pi0 --variant small -o build/pi0-small --force
	$(PYTHON) -m walkforge.cli bench build/pi0-small --report reports
	$(PYTHON) -m walkforge.cli compile pi0 --variant small --precision int8 -o build/pi0-small-int8 --force
	$(PYTHON) -m walkforge.cli bench build/pi0-small-int8 --backends cpu,torch,torch-bf16 --report reports
	$(PYTHON) -m walkforge.cli compile pi0 --variant small --precision fp8 -o build/pi0-small-fp8 --force
	$(PYTHON) -m walkforge.cli verify build/pi0-small-fp8 --report reports
	$(PYTHON) -m walkforge.cli compile smolvla --variant small -o build/smolvla-small --force
	$(PYTHON) -m walkforge.cli compile smolvla --variant small --precision int8 -o build/smolvla-small-int8 --force
	$(PYTHON) -m walkforge.cli inputs build/smolvla-small -o build/smolvla-small-2cam.npz  # both cameras on:
	$(PYTHON) -c "import numpy as n; f='build/smolvla-small-2cam.npz'; d=dict(n.load(f)); \
		d['image_masks'][:]=True; n.savez(f, **d)"
	$(PYTHON) -m walkforge.cli bench build/smolvla-small --backends cpu,torch --inputs build/smolvla-small-2cam.npz \
		--report reports
	$(PYTHON) -m walkforge.cli bench build/smolvla-small-int8 --backends cpu,torch \
		--inputs build/smolvla-small-2cam.npz --report reports  # issue 30: cpu int8 <= 0.35x torch
	$(PYTHON) scripts/make_full_folder.py build/smolvla-full-folder --kind smolvla  # published size, random
	$(PYTHON) -m walkforge.cli compile smolvla --checkpoint build/smolvla-full-folder \
		--tokenizer build/smolvla-full-folder-vlm --precision int8 -o build/smolvla-full-int8 --force  # ~17 min
	$(PYTHON) -m walkforge.cli inputs build/smolvla-full-int8 -o build/smolvla-full-2cam.npz
	$(PYTHON) -c "import numpy as n; f='build/smolvla-full-2cam.npz'; d=dict(n.load(f)); \
		d['image_masks'][:]=True; n.savez(f, **d)"
	$(PYTHON) -m walkforge.cli bench build/smolvla-full-int8 --backends cpu,torch --warmup 1 --iters 3 \
		--inputs build/smolvla-full-2cam.npz --report reports  # issue 30: 2 x 512^2, 10 steps, <= 1.5 s
	$(PYTHON) -m walkforge.cli compile bagel --variant small -o build/bagel-small --force
	$(PYTHON) -m walkforge.cli bench build/bagel-small --backends cpu,torch --dim height=256 --dim width=256 \
		--setting num_timesteps=50 --warmup 0 --iters 2 --report reports  # 256x256, 50 timesteps, CFG

## Recipe regression vs walkforge/tools/goldens (CI). `make goldens` rewrites them after an intended change.
regress: $(STAMP)
	$(PYTHON) -m walkforge.cli regress

goldens: $(STAMP)
	$(PYTHON) -m walkforge.cli regress --update-goldens

## GPU checks on a CUDA machine: the gpu-marked tests, then gpu-bench: verify and bench of a pi0
## bundle on each GPU backend this machine runs (one that cannot says why in one line and is left
## out). No install step: the lent GPU machines have no network and their own torch/Triton; put
## onnxruntime-gpu first on PYTHONPATH to include the cuda backend. GPU_VARIANT=tiny is quicker.
GPU_VARIANT ?= small
GPU_BUNDLE = build/pi0-$(GPU_VARIANT)-gpu
GPU_ENV = PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH}
WALKFORGE = $(GPU_ENV) $(PYTHON) -m walkforge.cli

gpu-check:
	$(GPU_ENV) $(PYTHON) -m pytest -m gpu tests/gpu -rs
	$(MAKE) --no-print-directory gpu-bench

gpu-bench:
	$(WALKFORGE) compile pi0 --variant $(GPU_VARIANT) -o $(GPU_BUNDLE) --force
	-$(WALKFORGE) build $(GPU_BUNDLE) --target trt
	@ran=torch; for backend in torch-cuda cuda trt; do \
	  echo "walkforge verify $(GPU_BUNDLE) --backend $$backend"; \
	  $(WALKFORGE) verify $(GPU_BUNDLE) --backend $$backend; rc=$$?; \
	  if [ $$rc -eq 0 ]; then ran=$$ran,$$backend; elif [ $$rc -ne 2 ]; then exit $$rc; fi; \
	done; \
	echo "walkforge bench $(GPU_BUNDLE) --backends $$ran"; \
	$(WALKFORGE) bench $(GPU_BUNDLE) --backends $$ran

## The issue-17 table on a GPU (< 8 min on an H200): Triton and AOT kernels vs eager, paged attention
## GB/s vs HBM and SDPA, full-size pi0 bf16 torch eager vs torch-cuda; one markdown table on stdout.
gpu-table:
	$(GPU_ENV) timeout 480 $(PYTHON) tests/gpu/gpu_check.py

clean:
	rm -rf build reports
