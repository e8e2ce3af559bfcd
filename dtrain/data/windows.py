"""Fixed-length training windows over a flat token array (shared by every built-in dataset)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class TokenWindows(Dataset):
    """Sample ``i`` is tokens ``[i*T, i*T + T + 1)``: inputs and next-token targets in one tensor.

    Windows do not overlap, so one epoch sees every token once; order comes from the sampler.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} tokens are fewer than one window of seq_len+1={seq_len + 1}")
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, index: int) -> torch.Tensor:
        start = index * self.seq_len
        return torch.from_numpy(np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))
