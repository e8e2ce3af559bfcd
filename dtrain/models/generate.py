"""Sampling text from a trained model (plain autoregressive decoding, no KV cache: small models only)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], new_tokens: int, context: int, temperature: float = 0.8,
             seed: int = 0, device: torch.device | str = "cpu") -> list[int]:
    """Same prompt and seed give the same tokens on every rank, so sharded models can decode in lockstep."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    for _ in range(new_tokens):
        logits = model(tokens[:, -context:])[:, -1, :].float()
        if temperature <= 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator)
        tokens = torch.cat([tokens, next_token], dim=1)
    model.train(was_training)
    return tokens[0, len(prompt):].tolist()
