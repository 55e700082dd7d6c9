"""Training and validation batches from a prepared dataset: memory-mapped shards, no worker processes.

The `train` shards are read as one token stream. Each epoch cuts it into windows of ``context + 1`` tokens
with stride ``context`` (a window's last token is the next window's first input), starting at a seeded shift
in ``[0, context)``, and visits the windows in a seeded order. Sequence number ``s`` of the run is window
``order_e[s mod N]`` of epoch ``e = s div N``; the micro-batch of (step, micro_step, rank) is a fixed slice
of the sequence numbers, computed rather than iterated. So a resumed run reads exactly the batches an
uninterrupted one would, the ranks of a step read disjoint windows, and the windows of a step are the same
whatever the world size (only how they are split among ranks and micro-steps changes).

Validation reads the first ``tokens`` tokens of the `val` split in order, as consecutive windows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from caracal_cli.config import CaracalError
from caracal_cli.fileio import check_not_being_written
from caracal_cli.shards import ShardError, check_max_ids, check_vocab_fits, load_manifest, split_tokens


class DataError(CaracalError):
    """A dataset that cannot feed this model or batch; the message names the numbers."""


def open_dataset(data_dir: str | Path, vocab_size: int, allow_incomplete: bool = False) -> dict[str, Any]:
    """The dataset's manifest, after checking that it is complete (unless `allow_incomplete`), that its
    tokenizer fits a model of `vocab_size` ids, and that no shard holds an id outside the tokenizer's
    vocabulary (the largest id of each shard, as the manifest records it). A dataset `caracal prepare` is
    writing now is refused, naming that process."""
    check_not_being_written(data_dir, "dataset")
    manifest = load_manifest(data_dir)
    if manifest.get("complete") is False and not allow_incomplete:
        held = sum(e["tokens"] for entries in manifest["splits"].values() for e in entries)
        raise DataError(f"{data_dir}: an incomplete dataset ({held:,} tokens so far; `caracal prepare` was "
                        f"stopped before the end): re-run its command to finish it, or pass --allow-incomplete "
                        f"to train on what it holds")
    try:
        check_vocab_fits(manifest, vocab_size)
        check_max_ids(data_dir, manifest)
    except ShardError as err:
        raise DataError(f"{data_dir}: {err}" if str(data_dir) not in str(err) else str(err)) from None
    return manifest


def split_summary(manifest: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {split: {"shards": len(entries), "tokens": int(sum(e["tokens"] for e in entries))}
            for split, entries in manifest["splits"].items()}


class TokenStream:
    """The shards of one split seen as a single 1-D token array (memory maps; reads copy only a window).
    With `vocab_size`, a read holding an id outside the vocabulary (a shard changed after it was checked at
    open) is refused with a DataError instead of indexing past the embedding."""

    def __init__(self, shards: list[np.ndarray], vocab_size: int | None = None, where: str = "the split"):
        self.shards = [s for s in shards if len(s)]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # shard i holds [starts[i], starts[i+1])
        self.vocab_size, self.where = vocab_size, where

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, crossing shard boundaries when needed."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            offset = start + filled - int(self.starts[shard])
            piece = self.shards[shard][offset:offset + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        if self.vocab_size is not None and length and out.max() >= self.vocab_size:
            raise DataError(f"{self.where}: token id {out.max()} near token {start + int(out.argmax()):,} is "
                            f"outside the vocabulary of {self.vocab_size} ids (a damaged shard: check it with "
                            f"`caracal prepare verify`)")
        return out


class TrainBatches:
    """Micro-batches of the training split: ``batch(step, micro_step)`` -> (inputs, targets), each [B, L] int64.

    Step `step` uses sequence numbers ``[step·S, (step+1)·S)`` with ``S = micro_batch · grad_accum · world``;
    rank r takes the r-th contiguous share of them, micro-step m the m-th micro-batch of that share.
    """

    def __init__(self, data_dir: str | Path, manifest: dict[str, Any], context: int, micro_batch: int,
                 grad_accum: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        self.stream = TokenStream(split_tokens(data_dir, manifest, "train"), manifest["tokenizer"]["vocab_size"],
                                  f"{data_dir} (train split)")
        self.context, self.micro_batch, self.grad_accum = context, micro_batch, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.sequences_per_step = micro_batch * grad_accum * world_size
        # Room for the largest shift: (context − 1) + N·context + 1 <= len(stream).
        self.windows_per_epoch = max(0, (len(self.stream) - context) // context)
        if self.windows_per_epoch < self.sequences_per_step:
            raise DataError(f"{data_dir}: the train split holds {len(self.stream)} tokens, "
                            f"{self.windows_per_epoch} windows of context {context}; one optimizer step needs "
                            f"{self.sequences_per_step} (micro_batch {micro_batch} × grad_accum {grad_accum} × "
                            f"world {world_size}): use more data or a smaller train.global_batch_tokens")
        self._epochs: dict[int, tuple[int, np.ndarray]] = {}

    def epoch_layout(self, epoch: int) -> tuple[int, np.ndarray]:
        """(shift, window order) of `epoch`: a function of (seed, epoch) alone."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            shift = int(rng.integers(self.context))
            n = self.windows_per_epoch
            order = np.arange(n, dtype=np.uint32 if n < 2**32 else np.int64)
            rng.shuffle(order)
            if len(self._epochs) >= 2:  # a step spans at most two epochs
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (shift, order)
        return self._epochs[epoch]

    def sequence_numbers(self, step: int, micro_step: int) -> range:
        first = (step * self.sequences_per_step
                 + (self.rank * self.grad_accum + micro_step) * self.micro_batch)
        return range(first, first + self.micro_batch)

    def window_start(self, sequence: int) -> int:
        epoch, position = divmod(sequence, self.windows_per_epoch)
        shift, order = self.epoch_layout(epoch)
        return shift + int(order[position]) * self.context

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.stream.read(self.window_start(s), self.context + 1)
                         for s in self.sequence_numbers(step, micro_step)])
        tokens = torch.from_numpy(rows)  # [B, L+1]
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def epoch_of(self, step: int) -> float:
        """How many passes over the train split `step` steps make (for logs)."""
        return step * self.sequences_per_step / self.windows_per_epoch


class ValidationWindows:
    """The first `tokens` tokens of the `val` split as consecutive windows of ``context + 1`` tokens."""

    def __init__(self, data_dir: str | Path, manifest: dict[str, Any], context: int, tokens: int):
        self.stream = TokenStream(split_tokens(data_dir, manifest, "val"), manifest["tokenizer"]["vocab_size"],
                                  f"{data_dir} (val split)")
        self.context = context
        if tokens < context:
            raise DataError(f"train.eval_tokens={tokens} is less than one validation window of model.context = "
                            f"{context} tokens: raise it")
        self.count = (min(tokens, len(self.stream) - 1) // context) if len(self.stream) > context else 0
        if self.count == 0:
            raise DataError(f"{data_dir}: the val split holds {len(self.stream)} tokens, fewer than one window "
                            f"of context + 1 = {context + 1}")

    def __len__(self) -> int:
        return self.count

    def batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows first .. first+size−1 as (inputs, targets), each [size, L]."""
        tokens = torch.from_numpy(self.stream.read(first * self.context, size * self.context + 1))
        rows = tokens.unfold(0, self.context + 1, self.context)  # [size, L+1], consecutive windows
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
