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

# The whole workflow on a built-in default that needs no download: scikit-learn's handwritten digits
# (shipped inside the package) and a resnet18 BN teacher trained on them here, then
# convert + calibrate -> fine-tune at batch 8 with distillation -> ONNX export, verified.
DIGITS := $(DEMO)/digits
DIGITS_FLAGS := --num-classes 10 --input-size 3,32,32 --mean 0.25,0.25,0.25 --std 0.35,0.35,0.35 --crop-pct 1
demo: $(STAMP)
	$(BIN)/python benchmarks/digits.py $(DIGITS) --archs resnet18 --epochs 8
	$(BIN)/gnsurgeon run recipes/digits-demo.yaml timm:resnet18 $(DIGITS_FLAGS) \
		--weights $(DIGITS)/teacher-resnet18.safetensors --data $(DIGITS)/train --val $(DIGITS)/val \
		-o $(DEMO)/run --json $(DEMO)/run.json

lint: $(STAMP)
	$(BIN)/python -m ruff check gnsurgeon tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/convert_speed.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache
