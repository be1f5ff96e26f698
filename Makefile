# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Every pip call pins torch through constraints.txt (an unpinned torch pulls a multi-GB CUDA build).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/python -m pip
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg

.PHONY: demo test test-fast test-slow lint install bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Re-installs only when the dependency lists change (stamp file). Everything: the core (task-model MAS),
# [llm] (Hugging Face models) and [dev] (tests, lint, notebook runner). A user who only needs task models:
# pip install -c constraints.txt .
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -c constraints.txt -e ".[llm,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/llm-mas demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=1200 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check llm_mas tests recipes bench
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
