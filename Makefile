# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all conformance lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/onnxshard demo

test: $(STAMP)
	$(BIN)/ruff check onnxshard tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow and not gpu and not multinode" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -q -m "multinode and not slow" $(PYTEST_ARGS)

# The ONNX conformance suite's model and multi-node tests through a Ray pipeline (slow: 4-9 minutes, a pipeline
# start per model); run it by hand before a release. CI runs `make test` only, which holds the in-process run of
# the whole suite.
conformance: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests/test_onnx_backend.py $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check onnxshard tests benchmarks
	$(BIN)/ruff format --check onnxshard tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/pipeline_vs_ort.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
