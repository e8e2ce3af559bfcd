"""At scale one rank reads: on start-up and restore only rank 0 lists the store and reads manifests,
configs, trainer state and DCP's metadata; the others get them by broadcast and read only their own
RNG file and their slice of the checksum verification."""

from __future__ import annotations

import torch

from tests.helpers import spawn_workers

COMMON = ["model=gpt_tiny", "model.n_layer=2", "model.d_model=32", "model.n_head=2", "data=synthetic",
          "data.seq_len=16", "data.vocab_size=64", "run.name=reads", "trainer.global_batch_size=8",
          "trainer.micro_batch_size=2", "trainer.max_steps=4", "trainer.eval_every=0", "trainer.sample_tokens=0",
          "logging.progress=off", "checkpoint.interval_steps=2", "strategy=ddp"]


def _count_reads(rank: int, world: int, run_dir: str) -> None:
    from dtrain.checkpoint import storage as storage_module
    from dtrain.checkpoint.preflight import preflight
    from dtrain.config.validate import load_config
    from dtrain.distributed.env import discover_env
    from dtrain.torch_private import FsspecReader
    from dtrain.trainer import Trainer

    cfg = load_config([*COMMON, f"run.dir={run_dir}"], world)
    env = discover_env()
    first = Trainer.build(cfg, env, torch.device("cpu"))
    first.advance(), first.advance()  # saves step 2
    first.checkpoints.finalize()
    first.checkpoints.close()
    first.preemption.close()

    calls: list[tuple[str, str]] = []
    originals = {name: getattr(storage_module.Storage, name) for name in ("listdir", "read_bytes")}

    def counting(name):
        def call(self, relative: str = "", *args, **kwargs):
            calls.append((name, relative))
            return originals[name](self, relative, *args, **kwargs)
        return call

    real_metadata = FsspecReader.read_metadata

    def metadata(self, *args, **kwargs):
        calls.append(("read_metadata", ""))
        return real_metadata(self, *args, **kwargs)

    for name in originals:
        setattr(storage_module.Storage, name, counting(name))
    FsspecReader.read_metadata = metadata
    try:
        preflight(cfg, env)
        second = Trainer.build(cfg, env, torch.device("cpu"))
    finally:
        for name, original in originals.items():
            setattr(storage_module.Storage, name, original)
        FsspecReader.read_metadata = real_metadata
    assert second.step == 2
    second.checkpoints.close()
    second.preemption.close()
    if rank == 0:
        assert ("listdir", "") in calls and ("read_metadata", "") in calls, calls
        assert any(path.endswith("manifest.json") for _, path in calls), calls
    else:
        assert calls == [], f"rank {rank} read the store itself: {calls}"


def test_only_rank_zero_lists_and_reads_manifests_at_start_up_and_restore(tmp_path):
    spawn_workers(_count_reads, 2, str(tmp_path))
