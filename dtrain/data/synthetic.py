"""Random tokens, fixed per sample index: data that costs nothing, for benchmarks and tests."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class SyntheticTokens(Dataset):
    def __init__(self, split: str, seq_len: int, vocab_size: int = 256, num_samples: int = 100_000):
        self.seq_len, self.vocab_size, self.num_samples = seq_len, vocab_size, num_samples
        self.offset = 0 if split == "train" else 10**9
        self.fingerprint = f"synthetic:{vocab_size}:{num_samples}"

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(self.offset + index)
        return torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=generator, device="cpu")
