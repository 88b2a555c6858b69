# The few commands a newcomer needs. Everything installs itself into .venv.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# A CPU build of torch lies on disk on our machines; on a GPU machine use your own CUDA build:
#   make install TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo prefer-demo test test-fast lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

## The main job, the whole story on the example task (structured extraction into JSON) with the
## default model (SmolLM2-135M-Instruct): check the data, quote the run (memory, time, advice),
## prompt baselines (0- and 3-shot), a LoRA fine-tune evaluated on the test set with a forgetting
## check, and the comparison table.
DEMO := runs/demo-$(shell date +%Y%m%d-%H%M%S)
TUNELAB := $(VENV)/bin/tunelab
demo: install
	$(TUNELAB) data check examples/extract/train.jsonl --eval examples/extract/test.jsonl --model smollm2-135m-instruct
	$(TUNELAB) plan examples/extract/train.yaml
	$(TUNELAB) baseline --model smollm2-135m-instruct --data examples/extract/test.jsonl \
		--train examples/extract/train.jsonl --shots 0,3 --metric examples/extract/metric.py:field_accuracy \
		eval.max_new_tokens=96 --out $(DEMO)-baseline
	$(TUNELAB) train examples/extract/train.yaml name=$(notdir $(DEMO)) train.output_dir=$(dir $(DEMO))
	$(TUNELAB) compare $(DEMO)-baseline/base-0shot $(DEMO)-baseline/base-3shot $(DEMO)/eval/finetuned --out $(DEMO)

## The preference example (examples/prefer/README.md): a short LoRA SFT of the default model, DPO
## from it on pairs (correct JSON preferred over a typical mistake), then base, SFT and DPO
## compared on held-out pairs (preference accuracy) and on the extraction test set.
PREFER := runs/prefer-$(shell date +%Y%m%d-%H%M%S)
TASK_EVAL := --data examples/extract/test.jsonl --metric examples/extract/metric.py:field_accuracy eval.max_new_tokens=96
prefer-demo: install
	$(TUNELAB) data check examples/prefer/train.jsonl --eval examples/prefer/test.jsonl --model smollm2-135m-instruct
	$(TUNELAB) train examples/prefer/sft.yaml name=$(notdir $(PREFER))-sft train.output_dir=$(dir $(PREFER))
	$(TUNELAB) train examples/prefer/dpo.yaml model.name=$(PREFER)-sft name=$(notdir $(PREFER))-dpo train.output_dir=$(dir $(PREFER))
	$(TUNELAB) eval smollm2-135m-instruct --name base --data examples/prefer/test.jsonl --out $(PREFER)-pairs
	$(TUNELAB) eval $(PREFER)-sft --name sft --data examples/prefer/test.jsonl --out $(PREFER)-pairs
	$(TUNELAB) eval $(PREFER)-dpo --name dpo --data examples/prefer/test.jsonl --out $(PREFER)-pairs
	$(TUNELAB) eval smollm2-135m-instruct --name base $(TASK_EVAL) --out $(PREFER)-task
	$(TUNELAB) eval $(PREFER)-sft --name sft $(TASK_EVAL) --out $(PREFER)-task
	$(TUNELAB) eval $(PREFER)-dpo --name dpo $(TASK_EVAL) --out $(PREFER)-task
	$(TUNELAB) compare $(PREFER)-pairs/base $(PREFER)-pairs/sft $(PREFER)-pairs/dpo --out $(PREFER)-pairs
	$(TUNELAB) compare $(PREFER)-task/base $(PREFER)-task/sft $(PREFER)-task/dpo --out $(PREFER)-task

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
