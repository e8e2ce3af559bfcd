"""Built-in corpus, memmap files, and the loader's exact, world-size-independent position."""

import numpy as np
import pytest
import torch

from dtrain.data.corpus import StdlibCorpus, read_corpus, stdlib_source_files
from dtrain.data.loader import ResumableLoader, eval_batches
from dtrain.data.memmap import MemmapTokens
from dtrain.data.synthetic import SyntheticTokens


def test_corpus_is_real_stdlib_source_in_a_fixed_order():
    files = stdlib_source_files()
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    tokens, fingerprint = read_corpus(max_bytes=200_000)
    again, same = read_corpus(max_bytes=200_000)
    assert fingerprint == same and np.array_equal(tokens, again)
    assert b"def " in tokens.tobytes() and b"import " in tokens.tobytes()


def test_train_and_validation_splits_do_not_overlap():
    train = StdlibCorpus("train", seq_len=64, max_bytes=100_000, val_fraction=0.1)
    val = StdlibCorpus("val", seq_len=64, max_bytes=100_000, val_fraction=0.1)
    assert len(train.tokens) + len(val.tokens) == 100_000
    assert len(val.tokens) == 10_000
    sample = train[3]
    assert sample.dtype == torch.int64 and sample.shape == (65,)
    assert torch.equal(sample[:-1], torch.from_numpy(train.tokens[192:256].astype(np.int64)))
    assert StdlibCorpus.decode(StdlibCorpus.encode("def f(x):")) == "def f(x):"


def test_memmap_tokens_read_the_nanogpt_layout(tmp_path):
    ids = np.arange(10_000, dtype=np.uint16)
    ids.tofile(tmp_path / "train.bin")
    ids[:500].tofile(tmp_path / "val.bin")
    paths = {"train_path": str(tmp_path / "train.bin"), "val_path": str(tmp_path / "val.bin")}
    train = MemmapTokens("train", seq_len=16, **paths)
    assert len(train) == (10_000 - 1) // 16
    assert train[2].tolist() == list(range(32, 49))
    val = MemmapTokens("val", seq_len=16, **paths)
    assert len(val) == (500 - 1) // 16


def consumed(loader, steps):
    return [next(loader) for _ in range(steps)]


def global_batches(world, steps, start_state=None, global_batch=8):
    """Global batches seen by ``world`` ranks, each rank's share concatenated in rank order."""
    dataset = SyntheticTokens("train", seq_len=4, vocab_size=50, num_samples=37)
    loaders = [ResumableLoader(dataset, global_batch, r, world, seed=5) for r in range(world)]
    if start_state is not None:
        for loader in loaders:
            loader.load_state_dict(start_state)
    per_rank = [consumed(loader, steps) for loader in loaders]
    return [torch.cat([per_rank[r][s] for r in range(world)]) for s in range(steps)], loaders[0].state_dict()


def test_ranks_together_see_exactly_the_single_process_batches():
    one, _ = global_batches(world=1, steps=6)
    two, _ = global_batches(world=2, steps=6)
    four, _ = global_batches(world=4, steps=6)
    for a, b, c in zip(one, two, four):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_each_epoch_visits_every_sample_once_in_a_new_order():
    dataset = SyntheticTokens("train", seq_len=2, vocab_size=1000, num_samples=16)
    loader = ResumableLoader(dataset, 4, 0, 1, seed=1)
    epoch1 = torch.cat(consumed(loader, 4))
    epoch2 = torch.cat(consumed(loader, 4))
    all_items = torch.stack([dataset[i] for i in range(16)])
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(epoch1) == key(all_items) == key(epoch2)
    assert not torch.equal(epoch1, epoch2)


@pytest.mark.parametrize("saved_world,resumed_world", [(2, 1), (2, 4), (1, 2), (2, 2)])
def test_resume_on_another_world_size_neither_skips_nor_repeats(saved_world, resumed_world):
    reference, _ = global_batches(world=1, steps=10)
    first, state = global_batches(world=saved_world, steps=4)
    rest, _ = global_batches(world=resumed_world, steps=6, start_state=state)
    assert state["next_sample"] == 4 * 8
    for a, b in zip(reference, first + rest):
        assert torch.equal(a, b)


def test_loader_refuses_state_from_other_data():
    loader = ResumableLoader(SyntheticTokens("train", 4, 50, 37), 8, 0, 1, seed=5)
    state = loader.state_dict()
    other = ResumableLoader(SyntheticTokens("train", 4, 50, 38), 8, 0, 1, seed=5)
    with pytest.raises(ValueError, match="not this run's data"):
        other.load_state_dict(state)
    reseeded = ResumableLoader(SyntheticTokens("train", 4, 50, 37), 8, 0, 1, seed=6)
    with pytest.raises(ValueError, match="seed 5"):
        reseeded.load_state_dict(state)


def test_evaluation_batches_are_fixed_and_sharded():
    dataset = SyntheticTokens("val", seq_len=4, vocab_size=50, num_samples=40)
    whole = list(eval_batches(dataset, 8, 0, 1, steps=3))
    halves = [list(eval_batches(dataset, 8, r, 2, steps=3)) for r in range(2)]
    assert len(whole) == 3
    for s in range(3):
        assert torch.equal(whole[s], torch.cat([halves[0][s], halves[1][s]]))
    assert torch.equal(whole[0][0], dataset[0])


def test_worker_processes_give_the_same_batches():
    dataset = SyntheticTokens("train", seq_len=4, vocab_size=50, num_samples=37)
    plain = consumed(ResumableLoader(dataset, 8, 1, 2, seed=3), 3)
    workers = consumed(ResumableLoader(dataset, 8, 1, 2, seed=3, num_workers=2), 3)
    assert all(torch.equal(a, b) for a, b in zip(plain, workers))


def test_close_ends_the_worker_processes_which_ignore_sigterm():
    """The workers ignore SIGTERM (preemption is the trainer's), so the SIGTERM with which
    multiprocessing ends leftover children at exit would not: close() must end them itself."""
    import multiprocessing

    loader = ResumableLoader(SyntheticTokens("train", seq_len=4, vocab_size=50, num_samples=37), 8, 0, 1, seed=3,
                             num_workers=1)
    next(loader)
    workers = multiprocessing.active_children()
    assert len(workers) == 1
    workers[0].terminate()  # what multiprocessing's exit function sends first
    workers[0].join(timeout=2)
    assert workers[0].is_alive()
    loader.close()
    workers[0].join(timeout=30)
    assert not workers[0].is_alive() and not multiprocessing.active_children()
