# The few commands a newcomer needs. Everything installs itself into .venv.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# A CPU build of torch lies on disk on our machines; on a GPU machine use your own CUDA build:
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

## The main job: check the example task's data, then LoRA fine-tune the default model on it
## (SmolLM2-135M-Instruct, about 10 minutes on a 2-core CPU) with validation before and after.
demo: install
	$(VENV)/bin/tunelab data check examples/extract/train.jsonl --eval examples/extract/test.jsonl --model smollm2-135m-instruct
	$(VENV)/bin/tunelab train examples/extract/train.yaml

## Every test: unit, integration and slow (real tokenizer); gpu tests skip without CUDA.
test: install
	$(VENV)/bin/ruff check src tests bench examples
	$(PY) -m pytest -q

## The quick loop while developing (no real-model tests).
test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

format: install
	$(VENV)/bin/ruff format src tests bench examples
	$(VENV)/bin/ruff check --fix src tests bench examples

bench: install
	$(PY) bench/data_bench.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
