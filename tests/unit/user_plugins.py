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
