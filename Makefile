# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# Both bootstrap .venv on first use. TORCH pins the CPU wheel this project is tested with;
# override it for a CUDA machine, e.g. `make demo TORCH='torch==2.13.0'` from another index.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= mposurgeon-out

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mposurgeon run recipes/quickstart.yaml -w "$(WORKDIR)" --force

test: $(STAMP)
	$(BIN)/ruff check mposurgeon tests benchmarks
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) mposurgeon-out .pytest_cache
