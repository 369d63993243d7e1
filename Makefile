# Convenience targets that forward to ./dev (the commands live there, since make is not installed
# everywhere; bash is). `make quickstart` / `make test` on a fresh clone create .venv first:
# torch==2.13.0 (CPU build here; see ./dev help for the CUDA build), then pip install -e ".[test]".
# VENV=DIR points them at another virtual environment (.ci/run uses a throw-away one).
VENV ?= $(CURDIR)/.venv
export VENV

.PHONY: help setup quickstart test test-fast lint fix typecheck check

help setup quickstart test test-fast lint fix typecheck check:
	./dev $@
