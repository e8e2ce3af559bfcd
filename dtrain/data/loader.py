"""A data-parallel-aware loader whose position is one number: the global index of the next sample.

Global sample ``g`` is dataset item ``perm_e[g mod N]`` with ``e = g div N`` and ``perm_e`` a seeded
permutation per epoch. Step ``s`` consumes global samples ``[s*G, (s+1)*G)``; data-parallel rank
``r`` of ``D`` takes the contiguous slice ``[s*G + r*G/D, s*G + (r+1)*G/D)``. So the union of what
the ranks see is independent of ``D``: a run saved at 2 ranks resumes at 1 or 4 ranks without
skipping or repeating a sample, and a 2-rank run sees exactly the batches of a 1-rank run.
"""

from __future__ import annotations

import signal
from typing import Any, Iterator

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Sampler


def ignore_preemption_signals(worker_id: int) -> None:
    """In a DataLoader worker: leave preemption to the trainer. torchrun and Kubernetes signal the
    whole process group, so a worker that died of SIGTERM would crash the loop before the trainer
    could save. The trainer ends them itself (:meth:`ResumableLoader.close`): the SIGTERM with which
    multiprocessing ends leftover children at interpreter exit is ignored too."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


class EpochPermutation:
    """Seeded permutation of ``range(n)`` per epoch, caching the current one."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64, device="cpu")

    def __call__(self, global_index: int) -> int:
        epoch, offset = divmod(global_index, self.n)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            generator = torch.Generator("cpu").manual_seed(self.seed * 7919 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator, device="cpu")
        return int(self._perm[offset])


class RankSliceSampler(Sampler[list[int]]):
    """Yields this rank's dataset indices for each step, starting at global sample ``start``."""

    def __init__(self, n: int, global_batch: int, dp_rank: int, dp_size: int, seed: int, start: int,
                 shuffle: bool = True, steps: int | None = None):
        self.global_batch, self.dp_rank, self.local_batch = global_batch, dp_rank, global_batch // dp_size
        self.start, self.steps = start, steps
        self.order = EpochPermutation(n, seed, shuffle)

    def __iter__(self) -> Iterator[list[int]]:
        step = 0
        while self.steps is None or step < self.steps:
            first = self.start + step * self.global_batch + self.dp_rank * self.local_batch
            yield [self.order(g) for g in range(first, first + self.local_batch)]
            step += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless sampler has no length")
        return self.steps


class ResumableLoader:
    """Iterator of per-rank batches ``[G/D, T+1]`` with ``state_dict()``/``load_state_dict()``."""

    def __init__(self, dataset: Dataset, global_batch: int, dp_rank: int, dp_size: int, seed: int,
                 num_workers: int = 0):
        if global_batch % dp_size:
            raise ValueError(f"global batch {global_batch} is not divisible by data-parallel size {dp_size}")
        self.dataset, self.global_batch, self.dp_rank, self.dp_size = dataset, global_batch, dp_rank, dp_size
        self.seed, self.num_workers = seed, num_workers
        self.next_sample = 0
        self._iterator: Iterator[torch.Tensor] | None = None

    def _make_iterator(self) -> Iterator[torch.Tensor]:
        sampler = RankSliceSampler(len(self.dataset), self.global_batch, self.dp_rank, self.dp_size,
                                   self.seed, self.next_sample)
        # A generator of its own: creating a DataLoader iterator draws its workers' base seed from the
        # global RNG otherwise, and a resumed run creates its iterator at another point of that stream
        # than the uninterrupted run did, which would shift every dropout mask after a resume.
        generator = torch.Generator("cpu").manual_seed(self.seed)
        return iter(DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                               persistent_workers=False, generator=generator,
                               worker_init_fn=ignore_preemption_signals if self.num_workers else None))

    def __iter__(self) -> "ResumableLoader":
        return self

    def __next__(self) -> torch.Tensor:
        if self._iterator is None:
            self._iterator = self._make_iterator()
        batch = next(self._iterator)
        self.next_sample += self.global_batch
        return batch

    def close(self) -> None:
        """Shut the worker processes down now (dropping the iterator does: persistent_workers=False).
        Left to interpreter exit after an error, multiprocessing would join workers that ignore its
        SIGTERM, and the rank would hang until its launcher kills it."""
        self._iterator = None

    def state_dict(self) -> dict[str, Any]:
        return {"next_sample": self.next_sample, "global_batch": self.global_batch, "seed": self.seed,
                "dataset_len": len(self.dataset), "fingerprint": getattr(self.dataset, "fingerprint", None)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved global sample index (valid for any data-parallel size)."""
        if state["dataset_len"] != len(self.dataset) or state.get("fingerprint") != getattr(
                self.dataset, "fingerprint", None):
            raise ValueError(f"the checkpoint's data ({state['dataset_len']} samples, fingerprint "
                             f"{state.get('fingerprint')}) is not this run's data ({len(self.dataset)} samples, "
                             f"fingerprint {getattr(self.dataset, 'fingerprint', None)})")
        if state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's data order used seed {state['seed']}, this run uses {self.seed}")
        self.next_sample = int(state["next_sample"])
        self._iterator = None


def eval_batches(dataset: Dataset, global_batch: int, dp_rank: int, dp_size: int, steps: int) -> Iterator[torch.Tensor]:
    """The first ``steps`` global batches of the validation set, in order: the same every evaluation."""
    n_steps = min(steps, len(dataset) // global_batch)
    sampler = RankSliceSampler(len(dataset), global_batch, dp_rank, dp_size, seed=0, start=0, shuffle=False,
                               steps=n_steps)
    return iter(DataLoader(dataset, batch_sampler=sampler, generator=torch.Generator("cpu").manual_seed(0)))


def build_dataset(cfg: DictConfig, split: str) -> Dataset:
    """Instantiate ``cfg.data`` (built-in or a user's ``_target_``) for one split."""
    return instantiate(cfg, split=split)
