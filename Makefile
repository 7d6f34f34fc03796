# Quick start: `make demo` (set up + a real conversion) and `make test` (set up + the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo-out

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	@echo "Setting up $(VENV) (the first time downloads torch, about 5 GB: a few minutes) ..."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO)
	$(BIN)/gnsurgeon convert timm:resnet18 --num-classes 10 --recipe recipes/gn-g32.yaml \
		-o $(DEMO)/resnet18-gn.safetensors --json $(DEMO)/convert.json
	$(BIN)/gnsurgeon inspect $(DEMO)/resnet18-gn.safetensors --json $(DEMO)/inspect.json

lint: $(STAMP)
	$(BIN)/python -m ruff check gnsurgeon tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/convert_speed.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
