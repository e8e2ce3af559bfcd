#!/usr/bin/env bash
# Rendered by: dtrain launch torchrun --nodes 2 --nproc-per-node 8 launcher.gpus_per_node=8 strategy=fsdp model=gpt2_124m trainer.precision=bf16 hardware=h100 data.seq_len=1024 trainer.global_batch_size=128 trainer.micro_batch_size=8
# Regenerate it with that command instead of editing.
#
# Run this file on each of the 2 node(s), with the same variables everywhere:
#   MASTER_ADDR  node 0's host name (it hosts the rendezvous; the others wait until it answers)
#   MASTER_PORT  rendezvous port (default 29400)
#   DTRAIN_RUN_ID  one id per run (default dtrain); the run directory is runs/torchrun-<id>, so
#                reuse the id to resume a stopped run from its newest committed checkpoint
# e.g. MASTER_ADDR=node0 DTRAIN_RUN_ID=exp1 bash THIS_FILE
#
# Exit code (dtrain/exit_codes.py), the workers' own, not torchrun's:
#   0     done: nothing
#   2     bad config or unusable storage: never retried
#   75    preempted after a committed checkpoint: requeued; not counted as a failure
#   other a crash: retried a bounded number of times, and not when retries make no checkpoint progress
# SIGTERM/SIGUSR1 -> checkpoint -> exit 75; the grace period is 30 s (2 x ~1.5 s save + 15 s to stop, at least 30 s; save estimated from 124.5M parameters -> 1.49 GB of state, 0.75 GB per node at launcher.write_mb_s=500).
set -euo pipefail
exec python -m dtrain launch run \
  --nnodes=2 \
  --nproc-per-node=8 \
  --rdzv-backend=c10d \
  "--rdzv-endpoint=${MASTER_ADDR:?set MASTER_ADDR to the host name of node 0}:${MASTER_PORT:-29400}" \
  "--rdzv-id=${DTRAIN_RUN_ID:-dtrain}" \
  --rdzv-conf=join_timeout=900 \
  --max-restarts=0 \
  --signals-to-handle=SIGTERM,SIGINT,SIGUSR1 \
  --shutdown-timeout=30 \
  --host-timeout-s=900 \
  -- \
  launcher=torchrun \
  launcher.gpus_per_node=8 \
  strategy=fsdp \
  model=gpt2_124m \
  trainer.precision=bf16 \
  hardware=h100 \
  data.seq_len=1024 \
  trainer.global_batch_size=128 \
  trainer.micro_batch_size=8 \
  launcher.nodes=2 \
  launcher.nproc_per_node=8 \
  checkpoint.grace_period_s=30
