# Two commands do everything on a fresh machine:
#   make demo   set up .venv and run the demo search (then derive + retrain) on built-in data
#   make test   set up .venv and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml constraints.txt constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -c constraints-cpu.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The Triton kernel tests run in their own process: TRITON_INTERPRET must be set before triton is imported.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not interpret"
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m interpret

# Search the demo supernet on the built-in digits, derive its architecture, retrain it, print a summary.
# Running it again continues (or just reports) the existing runs/demo; delete runs/demo to start over.
demo: $(STAMP)
	$(BIN)/python search.py
	$(BIN)/python derive.py runs/demo
	$(BIN)/python derive.py runs/demo --retrain

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_scan.py

clean:
	rm -rf $(VENV) .pytest_cache
