# Everyday commands. PY is the venv's Python when there is one: make test PY=python3 to override.
PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
LINT_IMPORTS ?= $(if $(wildcard .venv/bin/lint-imports),.venv/bin/lint-imports,lint-imports)
BENCH_ARGS ?=

.PHONY: help test test-fast lint bench bench-embed bench-ui

help:
	@echo "make test       full test suite (the README's command)"
	@echo "make test-fast  tests not marked slow (79 s on a quiet 2-core machine)"
	@echo "make lint       ruff check, ruff format --check, mypy, lint-imports"
	@echo "make bench      retrieval quality and speed on ../shared/data (BENCH_ARGS=... passes options)"
	@echo "make bench-embed  embedding throughput on generated images; make bench-ui: browser speed on retrieve-demo/index"

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(LINT_IMPORTS)

bench:
	$(PY) benchmarks/bench_datasets.py $(BENCH_ARGS)

bench-embed:
	$(PY) benchmarks/bench_embed.py $(BENCH_ARGS)

bench-ui:
	$(PY) benchmarks/bench_ui.py --index retrieve-demo/index $(BENCH_ARGS)
