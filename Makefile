# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs the package (editable) with what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output

.PHONY: demo test install clean-demo bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install when the package metadata changes. Plain torch/torchvision: pip resolves a matching pair.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --progress-bar off -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/nnunet-kaz demo -o $(DEMO_DIR)

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean-demo:
	rm -rf $(DEMO_DIR)
