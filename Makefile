# Two entry points that work on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo demo-quick test lint docs setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/trt-prune demo --out out/demo

demo-quick: setup
	$(BIN)/trt-prune demo --quick --out out/demo-quick

test: setup
	$(BIN)/ruff check trt_prune kernels tests bench
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not timing" tests
	$(BIN)/python -m pytest -q -m timing tests

lint: setup
	$(BIN)/ruff check trt_prune kernels tests bench

docs: setup
	$(BIN)/mkdocs build --strict --site-dir out/site

clean:
	rm -rf out .pytest_cache
