# Two entry points: `make demo` and `make test`. Both create .venv when missing and install
# through constraints.txt so pip never resolves torch by itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-out

.PHONY: install demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test,ray]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	bash scripts/demo.sh $(DEMO_DIR)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
