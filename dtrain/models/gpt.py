"""A GPT-2 style decoder: pre-norm blocks, SDPA causal attention, learned positions, tied embeddings.

Plain PyTorch only: no process groups, no ranks. Parallel plans live in ``gpt_plans.py`` and act on
the module tree by name, which is why blocks sit in a ``ModuleDict`` keyed "0".."L-1" (a pipeline
stage can drop blocks and keep every parameter's fully-qualified name) and why q, k, v are separate
projections (a column-wise tensor-parallel split needs no re-ordering).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, bias: bool, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds n_head / tp of them
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, bias: bool):
        super().__init__()
        self.fc_in = nn.Linear(d_model, hidden, bias=bias)
        self.fc_out = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, mlp_ratio: int, bias: bool, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = CausalSelfAttention(d_model, n_head, bias, dropout)
        self.ln_2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = MLP(d_model, mlp_ratio * d_model, bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.ln_1(x)))
        return x + self.resid_dropout(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """``forward(tokens[B, T]) -> logits[B, T, vocab]``. Pipeline stages may hold ``None`` for the parts
    (embeddings, final norm, head) that live on other stages; ``forward`` then passes hidden states."""

    def __init__(self, vocab_size: int, seq_len: int, n_layer: int = 2, n_head: int = 4, d_model: int = 128,
                 mlp_ratio: int = 4, dropout: float = 0.0, bias: bool = True, tie_embeddings: bool = True):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.vocab_size, self.seq_len, self.n_layer = vocab_size, seq_len, n_layer
        self.n_head, self.d_model, self.mlp_ratio, self.tie_embeddings = n_head, d_model, mlp_ratio, tie_embeddings
        self.wte: nn.Embedding | None = nn.Embedding(vocab_size, d_model)
        self.wpe: nn.Embedding | None = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleDict({str(i): Block(d_model, n_head, mlp_ratio, bias, dropout) for i in range(n_layer)})
        self.ln_f: nn.LayerNorm | None = nn.LayerNorm(d_model, bias=bias)
        self.lm_head: nn.Linear | None = nn.Linear(d_model, vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the input embedding with the output head. Call again after ``to_empty`` (which unties)."""
        if self.tie_embeddings and self.wte is not None and self.lm_head is not None:
            self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.wte is not None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            x = self.drop(self.wte(tokens) + self.wpe(positions))
        else:
            x = tokens  # hidden states from the previous pipeline stage
        for block in self.blocks.values():
            x = block(x)
        if self.ln_f is not None:
            x = self.ln_f(x)
        return self.lm_head(x) if self.lm_head is not None else x

    def init_tensor(self, name: str, shape: torch.Size, seed: int) -> torch.Tensor:
        """The initial value of parameter ``name``, a pure function of (seed, name, full shape).

        Because it does not depend on how the parameter is sharded, every strategy starts from
        bit-identical weights, which is what makes loss parity between strategies testable.
        """
        if self.tie_embeddings and name == "lm_head.weight":
            name = "wte.weight"  # a tied head is the embedding, also where it is a copy (a pipeline's last stage)
        # computed on the CPU, explicitly: the value must not depend on the default device or its RNG
        generator = torch.Generator("cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            return torch.zeros(shape, device="cpu")
        if ".ln_" in f".{name}" or name.startswith("ln_f"):
            return torch.ones(shape, device="cpu")
        std = 0.02
        if name.endswith("out_proj.weight") or name.endswith("fc_out.weight"):
            std = 0.02 / math.sqrt(2 * self.n_layer)  # GPT-2: scale residual projections by depth
        return torch.randn(shape, generator=generator, device="cpu") * std

    def num_params(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= sum(m.weight.numel() for m in (self.wte, self.wpe) if m is not None)
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N for the matmuls of N non-embedding weights (forward + backward),
        the head's 6*d*V, and 12*L*d*T for attention scores (PaLM appendix B)."""
        seq = seq_len or self.seq_len
        d, layers = self.d_model, self.n_layer
        per_layer = 4 * d * d + 2 * d * self.mlp_ratio * d  # q, k, v, out + the two MLP matrices
        matmul_params = layers * per_layer + d * self.vocab_size
        return 6.0 * matmul_params + 12.0 * layers * d * seq
