# Two commands on a fresh machine: `make quickstart` (install + a 2-rank DDP run) and `make test`.
.PHONY: setup setup-dev quickstart test test-all

setup:
	bash scripts/setup.sh

setup-dev:
	bash scripts/setup.sh dev

quickstart: setup
	.venv/bin/torchrun --standalone --nproc-per-node=2 -m dtrain experiment=quickstart

# the suite CI runs (19-33 min of pytest time on 2 cores, depending on the VM); `test-all` adds the
# slow cases (compile under FSDP, DeepSpeed at 4 ranks, the 4-rank hang test, ...: another ~5 min)
test: setup-dev
	.venv/bin/python -m pytest -q -m "not slow"

test-all: setup-dev
	.venv/bin/python -m pytest -q
