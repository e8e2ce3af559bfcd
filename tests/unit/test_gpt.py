"""The built-in GPT: shapes, tied weights, meta-device init that ignores sharding, honest FLOP counts."""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dtrain.models.gpt import GPT
from dtrain.parallel.materialize import materialize


def small(**kw):
    args = dict(vocab_size=256, seq_len=32, n_layer=2, n_head=4, d_model=64)
    args.update(kw)
    return GPT(**args)


def test_forward_shape_and_causality():
    model = small()
    materialize(model, torch.device("cpu"), seed=0)
    tokens = torch.randint(0, 256, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 256)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    # positions before 10 cannot see the change
    assert torch.equal(model(changed)[:, :10], logits[:, :10])
    assert not torch.equal(model(changed)[:, 10:], logits[:, 10:])


def test_meta_build_materializes_deterministically_and_keeps_tying():
    with torch.device("meta"):
        a = small()
    materialize(a, torch.device("cpu"), seed=7)
    with torch.device("meta"):
        b = small()
    materialize(b, torch.device("cpu"), seed=7)
    assert a.lm_head.weight is a.wte.weight
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not any(p.is_meta for p in a.parameters())
    with torch.device("meta"):
        c = small()
    materialize(c, torch.device("cpu"), seed=8)
    assert not torch.equal(c.wte.weight, a.wte.weight)


def test_flops_per_token_matches_counted_matmul_flops():
    model = small(n_layer=3, d_model=96, n_head=4, seq_len=64)
    materialize(model, torch.device("cpu"), seed=0)
    tokens = torch.randint(0, 256, (2, 64))
    counter = FlopCounterMode(display=False)
    # the math backend runs attention as visible matmuls, which the counter sees (the fused CPU kernel it does not)
    with counter, sdpa_kernel(SDPBackend.MATH):
        torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    counted_per_token = counter.get_total_flops() / tokens.numel()
    # both count causal attention as full attention (the PaLM convention)
    assert abs(model.flops_per_token(64) - counted_per_token) / counted_per_token < 0.05
