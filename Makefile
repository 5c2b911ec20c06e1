# Two commands on a fresh machine: `make demo` (the main job on its built-in default) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# lmms-eval's own venv (it pins wandb==0.25.0; vlmtrain ships 0.31): ~2.5 GB, 3-10 min on 2 cores, CPU torch only.
# `make test` builds it (once: the stamp), so CI runs the lmms tests; `make test-fast` does not need it (the
# tests that do are slow). Without it those tests skip, naming this target.
LMMS_ENV ?= $(HOME)/.cache/vlmtrain/lmms-venv
LMMS_STAMP := $(LMMS_ENV)/.installed

.PHONY: install demo test test-fast lint bench lmms-env test-lmms

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

test: $(STAMP) $(LMMS_STAMP)
	DS_ACCELERATOR=cpu VLMTRAIN_LMMS_ENV=$(LMMS_ENV) $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -m "not slow"

$(LMMS_STAMP): $(STAMP)
	rm -rf $(LMMS_ENV)  # no stamp: absent or a failed build
	VLMTRAIN_LMMS_ENV=$(LMMS_ENV) $(BIN)/vlmtrain eval lmms --setup
	touch $(LMMS_STAMP)

lmms-env: $(LMMS_STAMP)

test-lmms: $(LMMS_STAMP)
	DS_ACCELERATOR=cpu VLMTRAIN_LMMS_ENV=$(LMMS_ENV) $(BIN)/python -m pytest -q tests/test_lmms_eval.py tests/test_lmms_train.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
