# One-command entry points. Settings are EL_ environment variables (README: Settings).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
EXTRAS ?= serve,dev
BIN := $(VENV)/bin
DATASET ?= wikimel
SPLIT ?= test

# Benchmark data: EL_DATA_DIR wins; else the shared mirror beside the checkout; else data/mel (make data).
ifeq ($(strip $(EL_DATA_DIR)),)
  ifneq ($(wildcard ../shared/data/mel/WikiMEL),)
    export EL_DATA_DIR := $(abspath ../shared/data/mel)
  else
    export EL_DATA_DIR := $(abspath data/mel)
  endif
endif

.PHONY: install index serve serve-ray worker scale-report test test-fast eval fit-calibration bench train model-card data lint clean

install: $(VENV)/.installed

# Reinstalls only when pyproject.toml changes, so later `make serve` runs start in seconds.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

index: install
	$(BIN)/el build-index --if-missing

serve: index
	exec $(BIN)/el serve

# Scale-out (README: Scaling out; the `scale` extra): the API as REPLICAS Ray Serve replicas on EL_HOST:EL_PORT
# (a local Ray head, or the cluster at EL_RAY__ADDRESS), and a job worker on the shared store.
REPLICAS ?= 2
serve-ray: index
	exec $(BIN)/el serve --ray --replicas $(REPLICAS)

worker: index
	exec $(BIN)/el worker

# Throughput with 1 vs 2 replicas and 1 vs 2 job workers (writes reports/scale.json).
scale-report: index
	$(BIN)/python scripts/bench_scaleout.py

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

eval: index
	$(BIN)/el eval --dataset $(DATASET) --split $(SPLIT)

# Refit the served confidence and NIL rule on the dev splits (writes models/weights/calibration.json).
fit-calibration: index
	$(BIN)/el fit-calibration

bench: index
	$(BIN)/el bench

# Retrain the shipped heads (models/weights/): teacher, then distilled student; then refresh the model card.
train: install
	$(BIN)/el train
	$(BIN)/python -m models.model_card

model-card: install
	$(BIN)/python -m models.model_card

data:
	bash scripts/get_data.sh data/mel

lint: install
	$(BIN)/ruff check service models kg_index tests

clean:
	rm -rf artifacts reports/*.png .pytest_cache
