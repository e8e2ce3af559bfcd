# Two commands on a fresh machine: `make quickstart` (install + a 2-rank DDP run) and `make test`.
.PHONY: setup setup-dev quickstart test test-fast bench

setup:
	bash scripts/setup.sh

setup-dev:
	bash scripts/setup.sh dev

quickstart: setup
	.venv/bin/torchrun --standalone --nproc-per-node=2 -m dtrain experiment=quickstart

test: setup-dev
	.venv/bin/python -m pytest -q

test-fast: setup-dev
	.venv/bin/python -m pytest -q -m "not slow"
