# Quick start: `make demo` (train + evaluate + draw on the synthetic set) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= work_dirs/demo
DEMO_CFG ?= atss_r18_fpn_synth
# bf16 autocast training: same AP as fp32 on the demo, 1.35x faster on an AVX512-BF16 CPU (docs/benchmarks.md);
# `make demo DEMO_ARGS=` trains in fp32 (CPUs without bf16 instructions emulate it slowly).
DEMO_ARGS ?= runtime.amp=true

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# the optional extras too, so that `make test` (CI) runs the ONNX export / onnxruntime, tracker and video tests
	# instead of skipping them
	$(PY) -m pip install -q -e '.[dev,export,tensorboard,mlflow,video]'
	touch $(STAMP)

demo: venv
	$(VENV)/bin/densedet data synth --out data/synth
	$(VENV)/bin/densedet train $(DEMO_CFG) $(DEMO_ARGS) --work-dir $(DEMO_DIR)
	$(VENV)/bin/densedet test $(DEMO_CFG) $(DEMO_DIR) --out $(DEMO_DIR)/test
	$(VENV)/bin/densedet predict $(DEMO_CFG) $(DEMO_DIR) data/synth/val --out $(DEMO_DIR)/predictions --limit 12
	@echo "Curves: $(DEMO_DIR)/curves.png  Drawn predictions: $(DEMO_DIR)/predictions/"

test: venv
	# the layer contracts of pyproject.toml (docs/architecture.md): imports point one way
	$(VENV)/bin/lint-imports --no-cache
	# two workers (each test process runs torch on one thread, tests/conftest.py): the 2-core CI machine is kept busy;
	# a file's tests stay on one worker (module fixtures are built once)
	$(PY) -m pytest -q -x -n 2 --dist loadfile --durations=15

lint: venv
	$(VENV)/bin/ruff check densedet tests benchmarks

clean:
	rm -rf $(VENV) work_dirs data/synth
