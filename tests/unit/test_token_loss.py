"""The step's loss is the mean over every target token of the global batch (token-weighted), whatever
the micro-batching: samples with ignored positions (``IGNORE_INDEX``) weigh by their real targets."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from dtrain.config.validate import load_config
from dtrain.distributed.env import discover_env
from dtrain.models import build_model
from dtrain.optim import build_optimizer
from dtrain.strategies import StepSpec, build_strategy
from dtrain.strategies.loss import IGNORE_INDEX, inputs_and_targets

VOCAB, SEQ = 64, 16


def padded_batch(lengths: list[int], seed: int = 0) -> torch.Tensor:
    """Samples of ``SEQ + 1`` tokens, each valid for its length and ``IGNORE_INDEX`` after it."""
    batch = torch.randint(0, VOCAB, (len(lengths), SEQ + 1), generator=torch.Generator().manual_seed(seed))
    for row, length in enumerate(lengths):
        batch[row, length:] = IGNORE_INDEX
    return batch


def single(micro: int):
    cfg = load_config(["strategy=single", "model=gpt_tiny", "model.n_layer=2", "model.d_model=32", "data=synthetic",
                       f"data.seq_len={SEQ}", f"data.vocab_size={VOCAB}", "run.name=t", "optim.warmup_steps=0",
                       "trainer.global_batch_size=4", f"trainer.micro_batch_size={micro}"], 1)
    strategy = build_strategy(cfg, StepSpec(4, micro, 0.0, "fp32", 3), discover_env(), torch.device("cpu"))
    strategy.setup(build_model(cfg.model, 3), lambda named: build_optimizer(named, cfg.optim))
    return strategy


def test_loss_and_gradients_are_the_token_mean_of_the_global_batch():
    # micro-batches of 2: the first holds 4 + 17 targets' worth of samples, the second 17 + 17
    batch = padded_batch([5, 17, 17, 17])
    strategy = single(micro=2)
    model = copy.deepcopy(strategy.model)
    inputs, targets = inputs_and_targets(batch)
    expected = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    expected.backward()
    expected_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    result = strategy.train_step(batch)
    assert abs(result.loss.item() - expected.item()) < 1e-6
    assert abs(result.grad_norm.item() - expected_norm.item()) < 1e-5 * expected_norm.item()
    # a mean of the two micro-batch means would weigh the short sample's 4 targets like 16 others'
    halves = [F.cross_entropy(model(i).flatten(0, 1), t.flatten(), ignore_index=IGNORE_INDEX)
              for i, t in (inputs_and_targets(batch[:2]), inputs_and_targets(batch[2:]))]
    assert abs(torch.stack(halves).mean().item() - expected.item()) > 1e-3


def test_micro_batching_does_not_change_the_step():
    batch = padded_batch([3, 9, 17, 12], seed=1)
    one, four = single(micro=4), single(micro=1)
    a, b = one.train_step(batch), four.train_step(batch)
    assert abs(a.loss.item() - b.loss.item()) < 1e-6
    for p, q in zip(one.model.parameters(), four.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_batch_without_targets_gives_zero_gradients_not_nan():
    strategy = single(micro=2)
    result = strategy.train_step(padded_batch([1, 1, 1, 1]))
    assert result.loss.item() == 0.0 and result.grad_norm.item() == 0.0


def test_pipeline_stages_autocast_their_forward_but_not_backward():
    """A schedule runs forward and backward itself; autocast must cover the forward only."""
    from dtrain.parallel.precision import apply_autocast

    layer = torch.nn.Linear(8, 8)
    apply_autocast(layer, "cpu", "bf16")
    during_backward = []
    out = layer(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16 and not torch.is_autocast_enabled("cpu")  # entered and left
    out.register_hook(lambda grad: during_backward.append(torch.is_autocast_enabled("cpu")))
    out.float().sum().backward()
    assert during_backward == [False]
    assert layer.weight.grad.dtype == torch.float32
