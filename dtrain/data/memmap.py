"""Flat binary token files (the nanoGPT layout: ``train.bin``/``val.bin`` of uint16 ids), memory-mapped."""

from __future__ import annotations

import os

import numpy as np

from dtrain.data.windows import TokenWindows


class MemmapTokens(TokenWindows):
    def __init__(self, split: str, seq_len: int, train_path: str, val_path: str | None = None,
                 vocab_size: int = 50257, dtype: str = "uint16"):
        path = train_path if split == "train" or val_path is None else val_path
        tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        if split != "train" and val_path is None:
            tokens = tokens[int(len(tokens) * 0.99):]  # no val file: hold out the last 1%
        elif split == "train" and val_path is None:
            tokens = tokens[: int(len(tokens) * 0.99)]
        super().__init__(tokens, seq_len)
        stat = os.stat(path)
        self.fingerprint = f"{os.path.basename(path)}:{stat.st_size}"

    @staticmethod
    def check_config(cfg) -> list[str]:
        problems = []
        try:
            itemsize = np.dtype(cfg.dtype).itemsize
        except TypeError:
            return [f"data.dtype={cfg.dtype!r} is not a numpy dtype; use uint16 (GPT-2 ids) or uint32"]
        for key in ("train_path", "val_path"):
            path = cfg.get(key)
            if path is None:
                continue
            if not os.path.isfile(path):
                problems.append(f"data.{key}={path} does not exist; point it at a flat {cfg.dtype} token file")
            elif os.path.getsize(path) < itemsize * (cfg.seq_len + 1):
                problems.append(f"data.{key}={path} holds fewer than seq_len+1={cfg.seq_len + 1} tokens")
        return problems
