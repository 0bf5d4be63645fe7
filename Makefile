# The README's commands call these targets; each does its own set-up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Engine configurations whose IPS models ship in agent/data/models/ (gpu:model:tp).
MODEL_CONFIGS := a100-sxm4-80gb:llama3-8b:1 a100-sxm4-40gb:llama2-13b:1 a100-sxm4-40gb:llama2-13b:2 \
                 a100-sxm4-40gb:llama2-13b:4 h100-sxm5-80gb:llama3-8b:1
PROFILE_ROWS  ?= 20000
# Engine sizes of the pool replays, profiled for capacity on both shipped traces (gpu:model).
POOL_ENGINE   := --gpu a100-sxm4-40gb --model llama2-13b
POOL_SIZES    := 1 2 4
CODE_ENGINE   := --chunked-context --max-num-tokens 512

.PHONY: setup demo demo-autoscale test lint bench models clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/throttllem demo

demo-autoscale: setup
	$(BIN)/throttllem demo --autoscale

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy agent/control agent/predict

bench: setup
	$(BIN)/throttllem bench sim --json
	$(BIN)/throttllem bench predictor --json
	$(BIN)/throttllem bench decide --json
	$(BIN)/throttllem bench sidecar --json

# Regenerates every shipped model from the twin and the traces, reproducibly (fixed seeds).
models: setup
	@set -e; for cfg in $(MODEL_CONFIGS); do \
	  set -- $$(echo $$cfg | tr : ' '); \
	  data=build/profiles/$$1-$$2-tp$$3.csv; rm -f $$data $$data.json; \
	  $(BIN)/throttllem profile --target twin --gpu $$1 --model $$2 --tp $$3 --samples $(PROFILE_ROWS) --seed 0 --out $$data --json; \
	  $(BIN)/throttllem train --data $$data --out agent/data/models/$$1/$$2-tp$$3 --seed 0 --json; \
	done
	$(BIN)/throttllem train-lengths --out agent/data/models/lengths/azure --seed 0 --json
	@set -e; for tp in $(POOL_SIZES); do \
	  $(BIN)/throttllem capacity $(POOL_ENGINE) --tp $$tp --trace azure-conv --seed 0 --json; \
	  $(BIN)/throttllem capacity $(POOL_ENGINE) --tp $$tp --trace azure-code $(CODE_ENGINE) --seed 0 --json; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
