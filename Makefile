# Two commands on a fresh machine: `make demo` (the main job on its built-in default) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench

$(STAMP): setup.cfg setup.py
	$(PY) -m venv $(VENV)
	# The CPU build of torch first, so no dependency can pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,tensorboard,wandb]"
	@java -version >/dev/null 2>&1 || (echo "Java is missing: installing OpenJDK 17 (needed by pycocoevalcap)"; \
		apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vlmtrain demo --out demo_out

test: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
