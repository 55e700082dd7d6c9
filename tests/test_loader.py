"""The data loader: deterministic batches from (seed, step, rank), disjoint ranks, whole epochs, shard
boundaries, validation order, and clear refusals. `make_dataset` is shared with test_train.py."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from caracal_cli import shards
from caracal_cli.loader import DataError, TokenStream, TrainBatches, ValidationWindows, open_dataset


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from caracal_cli.tokenizer import train_bpe

    return train_bpe(["the quick brown fox jumps over the lazy dog; " * 50], 300)


def make_dataset(directory: Path, train_tokens: int = 60_000, val_tokens: int = 8_192, train_shards: int = 2,
                 seed: int = 0, vocab_size: int | None = None) -> Path:
    """A dataset directory as `caracal prepare` makes it (shards, manifest, tokenizer.json) holding a random
    Markov chain over the tokenizer's ids (three likely successors per token), so a model can learn it.
    `vocab_size` overrides the manifest's vocabulary (to test the vocab check)."""
    directory.mkdir(parents=True, exist_ok=True)
    entry = _tokenizer().save(directory)
    vocab = entry["vocab_size"]
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, size=(vocab, 3))

    def chain(n: int) -> np.ndarray:
        out, token = np.empty(n, dtype=np.int64), 0
        for i, choice in enumerate(rng.integers(0, 3, size=n)):
            out[i] = token
            token = successors[token, choice]
        return out

    splits = {}
    for split, count, pieces in (("train", train_tokens, train_shards), ("val", val_tokens, 1)):
        splits[split] = []
        for i, part in enumerate(np.array_split(chain(count), pieces)):
            name = shards.shard_name(split, i)
            shards.write_shard(directory / name, part, vocab)
            splits[split].append({"file": name, "tokens": int(part.size), "sha256": ""})
    if vocab_size is not None:
        entry = {**entry, "vocab_size": vocab_size}
    shards.save_manifest(directory, {"format": shards.MANIFEST_FORMAT, "tokenizer": entry, "splits": splits,
                                     "source": "synthetic markov chain", "complete": True})
    return directory


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), train_tokens=20_000, train_shards=3)


def batches(dataset, world=1, rank=0, seed=7, micro=4, accum=2, context=16):
    return TrainBatches(dataset, open_dataset(dataset, 512), context, micro, accum, world, rank, seed)


def test_stream_reads_across_shard_boundaries(dataset):
    manifest = open_dataset(dataset, 512)
    parts = shards.split_tokens(dataset, manifest, "train")
    stream = TokenStream(parts)
    whole = np.concatenate(parts).astype(np.int64)
    assert len(stream) == len(whole) == 20_000
    boundary = len(parts[0])
    for start in (0, boundary - 3, boundary, 2 * boundary - 1, len(whole) - 17):
        np.testing.assert_array_equal(stream.read(start, 17), whole[start:start + 17])


def test_batches_are_a_function_of_seed_step_and_rank(dataset):
    a, b = batches(dataset), batches(dataset)
    for step, micro in [(5, 1), (0, 0), (123, 0), (5, 1)]:  # any order, any repetition
        xa, ya = a.batch(step, micro)
        xb, yb = b.batch(step, micro)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (4, 16) and xa.dtype == torch.int64
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the inputs shifted by one
    assert not torch.equal(a.batch(0, 0)[0], a.batch(1, 0)[0])
    assert not torch.equal(a.batch(0, 0)[0], batches(dataset, seed=8).batch(0, 0)[0])


def test_ranks_read_disjoint_windows_and_a_step_does_not_depend_on_world_size(dataset):
    single = batches(dataset, world=1, accum=4)
    ranked = [batches(dataset, world=2, rank=r, accum=2) for r in range(2)]
    for step in (0, 3, 40):
        seen = [{s for m in range(2) for s in loader.sequence_numbers(step, m)} for loader in ranked]
        assert not seen[0] & seen[1]
        one = sorted(single.window_start(s) for m in range(4) for s in single.sequence_numbers(step, m))
        two = sorted(loader.window_start(s) for loader in ranked for m in range(2)
                     for s in loader.sequence_numbers(step, m))
        assert one == two and len(set(one)) == len(one) == 16


def test_an_epoch_visits_every_window_once(dataset):
    loader = batches(dataset)
    n = loader.windows_per_epoch
    starts = [loader.window_start(s) for s in range(n)]
    shift = starts[0] % 16
    assert sorted(starts) == [shift + 16 * k for k in range(n)]
    assert max(starts) + 17 <= len(loader.stream)
    next_epoch = [loader.window_start(s) for s in range(n, 2 * n)]
    assert next_epoch != starts  # a new order (and shift) each epoch


def test_validation_reads_the_start_of_the_val_split_in_order(dataset):
    manifest = open_dataset(dataset, 512)
    val = np.concatenate(shards.split_tokens(dataset, manifest, "val")).astype(np.int64)
    windows = ValidationWindows(dataset, manifest, 16, tokens=100)
    assert len(windows) == 6  # floor(100 / 16)
    x, y = windows.batch(2, 3)
    np.testing.assert_array_equal(x.numpy(), val[32:80].reshape(3, 16))
    np.testing.assert_array_equal(y.numpy(), val[33:81].reshape(3, 16))


def test_data_with_a_larger_vocabulary_than_the_model_is_refused(tmp_path):
    data = make_dataset(tmp_path / "big-vocab", train_tokens=2_000, val_tokens=500, vocab_size=50257)
    with pytest.raises(DataError, match="50257 ids, more than the model's vocab_size 4096"):
        open_dataset(data, 4096)


def test_data_too_small_for_one_step_is_refused(tmp_path):
    data = make_dataset(tmp_path / "small", train_tokens=1_000, val_tokens=500)
    with pytest.raises(DataError, match="one optimizer step needs 64"):
        TrainBatches(data, open_dataset(data, 512), 64, 8, 4, 2, 0, 0)
    with pytest.raises(DataError, match="fewer than one window"):
        ValidationWindows(data, open_dataset(data, 512), 600, 10_000)
