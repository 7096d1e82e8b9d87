# Quick start: `make demo` (train + evaluate + draw on the synthetic set) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= work_dirs/demo
DEMO_CFG ?= atss_r18_fpn_synth
# bf16 autocast training where the CPU computes bf16 natively (AVX512-BF16 or AMX): same AP as fp32 on the demo,
# 1.35x faster (docs/benchmarks.md). Other CPUs emulate bf16 several times slower than fp32, so the demo trains in
# fp32 there. `make demo DEMO_ARGS=` forces fp32, `make demo DEMO_ARGS=runtime.amp=true` bf16.
DEMO_ARGS ?= $(shell $(PY) -c "from densedet.models.precision import bf16_emulation_note as note; \
	print('' if note('cpu') else 'runtime.amp=true')")

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
	@echo "training $(DEMO_CFG) with: $(or $(DEMO_ARGS),fp32) (bf16 autocast only where the CPU has native bf16)"
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
