# Two commands on a fresh machine: `make quickstart` (install + a 2-rank DDP run) and `make test`.
.PHONY: setup setup-dev quickstart test test-all

setup:
	bash scripts/setup.sh

setup-dev:
	bash scripts/setup.sh dev

quickstart: setup
	.venv/bin/torchrun --standalone --nproc-per-node=2 -m dtrain experiment=quickstart

# the suite CI runs (~20 min on 2 cores); `test-all` adds the slow variants (every pipeline schedule,
# activation checkpointing, compile, ...: another ~5 min)
test: setup-dev
	.venv/bin/python -m pytest -q -m "not slow"

test-all: setup-dev
	.venv/bin/python -m pytest -q
