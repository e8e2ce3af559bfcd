"""torch.compile per transformer block: blocks are identical, so one compiled graph serves all of them
(compiling the whole model would also trace the sharding hooks and recompile per stage).

``Module.compile()`` compiles in place, so parameter names do not gain an ``_orig_mod.`` prefix.
"""

from __future__ import annotations

from torch import nn


def apply_compile(blocks: nn.ModuleDict) -> None:
    for block in blocks.values():
        block.compile(fullgraph=False)
