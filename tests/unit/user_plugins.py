"""A user's own model and dataset, as a dtrain user would write them (no dtrain imports)."""

import torch
from torch import nn
from torch.utils.data import Dataset


class BigramLM(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens)


class CountingData(Dataset):
    """Sequences i, i+1, i+2, ... modulo the vocabulary."""

    def __init__(self, split: str, seq_len: int, vocab_size: int):
        self.seq_len, self.vocab_size = seq_len, vocab_size

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> torch.Tensor:
        return (torch.arange(self.seq_len + 1) + index) % self.vocab_size


class StallingData(CountingData):
    """Like CountingData, but after ``stall_after`` samples every load takes ``stall_s`` seconds: a data
    source that hangs, so a step cannot reach its boundary (for preemption-deadline tests; loads in the
    training process, i.e. without data workers)."""

    def __init__(self, split: str, seq_len: int, vocab_size: int, stall_after: int = 10**9, stall_s: float = 600.0):
        super().__init__(split, seq_len, vocab_size)
        self.stall_after, self.stall_s, self.loads = stall_after, stall_s, 0

    def __getitem__(self, index: int) -> torch.Tensor:
        self.loads += 1
        if self.loads > self.stall_after:
            import time

            time.sleep(self.stall_s)
        return super().__getitem__(index)
