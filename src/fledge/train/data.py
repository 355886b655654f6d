"""Pretraining batches from prepared token shards: `WindowBatches`, a `BatchSource`.

    source = WindowBatches.from_prepared(recipe.prepared_path, recipe.train)
    batch = source.train_batch(step, micro, rank, world)     # step: 0-based, the steps done before it

The shards of one split are memory-mapped and read as one flat token stream. The windows
of optimizer step `s` are a pure function of (seed, s): resuming at step s needs no data
cursor, and N processes that each take their slice of the same global batch see exactly
the windows one process would see with an N times larger batch. Every position of a
window is a target (labels are the inputs shifted by one token).

Validation uses a fixed set of evenly spaced windows, the same at every evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fledge.errors import FledgeError
from fledge.train.batches import Batch


class TokenStream:
    """All shards of one split as one read-only sequence of token ids."""

    def __init__(self, prepared_dir: Path, split: str):
        manifest = json.loads((Path(prepared_dir) / "manifest.json").read_text())
        info = manifest["splits"][split]
        self.split = split
        self.shards = [np.memmap(Path(prepared_dir) / s["file"], dtype=manifest["dtype"], mode="r")
                       for s in info["shards"] if s["tokens"]]
        self.ends = np.cumsum([len(s) for s in self.shards]) if self.shards else np.zeros(0, dtype=np.int64)
        self.n_tokens = int(self.ends[-1]) if len(self.ends) else 0

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), read across shard boundaries when needed."""
        out, pos = [], start
        while length > 0:
            i = int(np.searchsorted(self.ends, pos, side="right"))
            shard_start = int(self.ends[i - 1]) if i else 0
            piece = self.shards[i][pos - shard_start: pos - shard_start + length]
            out.append(piece)
            pos += len(piece)
            length -= len(piece)
        return np.concatenate(out) if len(out) > 1 else out[0]

    def require(self, length: int, what: str) -> None:
        if self.n_tokens < length + 1:
            raise FledgeError(
                f"the {self.split} split holds {self.n_tokens} tokens, fewer than one {what} of {length + 1}. "
                f"Add text, lower train.block_size, or raise data.val_fraction.")


def global_batch_starts(step: int, seed: int, n_windows: int, n_tokens: int, block_size: int) -> torch.Tensor:
    """Start offsets of every window of optimizer step `step`, for all processes together."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n_tokens - block_size, (n_windows,), generator=g)


def rank_slice(starts: torch.Tensor, micro: int, rank: int, world: int, batch_size: int) -> torch.Tensor:
    """The windows of one process for one micro-step: global order is (micro, rank, row)."""
    begin = (micro * world + rank) * batch_size
    return starts[begin: begin + batch_size]


def eval_starts(stream: TokenStream, block_size: int, count: int) -> torch.Tensor:
    """`count` evenly spaced windows over the split (fewer when the split is short)."""
    last = stream.n_tokens - block_size - 1
    count = max(1, min(count, last + 1))
    return torch.linspace(0, last, count).long().unique()


class WindowBatches:
    """Random windows of the train split, fixed evenly spaced windows of the val split.

    One optimizer step reads `batch_size * grad_accum * world` windows of `block_size + 1`
    tokens; their global order is (micro, rank, row), so the split over processes and
    micro-batches does not change which windows a step trains on."""

    def __init__(self, train: TokenStream, val: TokenStream, *, block_size: int, batch_size: int, grad_accum: int,
                 seed: int, eval_batches: int):
        train.require(block_size, "training window")
        val.require(block_size, "validation window")
        self.train, self.val = train, val
        self.block_size, self.batch_size, self.grad_accum = block_size, batch_size, grad_accum
        self.seed, self.eval_batches = seed, eval_batches
        self._val: dict[tuple[int, int], list[Batch]] = {}

    @classmethod
    def from_prepared(cls, prepared_dir: Path, t) -> WindowBatches:
        """The windows of a prepared folder with a `TrainConfig`'s sizes and seed."""
        return cls(TokenStream(prepared_dir, "train"), TokenStream(prepared_dir, "val"), block_size=t.block_size,
                   batch_size=t.batch_size, grad_accum=t.grad_accum, seed=t.seed, eval_batches=t.eval_batches)

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> Batch:
        n_windows = self.batch_size * self.grad_accum * world
        starts = global_batch_starts(step, self.seed, n_windows, self.train.n_tokens, self.block_size)
        return window_batch(self.train, rank_slice(starts, micro, rank, world, self.batch_size), self.block_size)

    def val_batches(self, rank: int, world: int) -> list[Batch]:
        """Every world-th of `eval_batches * batch_size` fixed windows, in batches of batch_size."""
        if (rank, world) not in self._val:
            mine = eval_starts(self.val, self.block_size, self.eval_batches * self.batch_size)[rank::world]
            self._val[rank, world] = [window_batch(self.val, mine[i:i + self.batch_size], self.block_size)
                                      for i in range(0, len(mine), self.batch_size)]
        return self._val[rank, world]

    def tokens_per_step(self, world: int) -> int:
        return self.batch_size * self.grad_accum * world * self.block_size

    def describe(self) -> str:
        return f"{self.train.n_tokens:,} train tokens"


def window_batch(stream: TokenStream, starts: torch.Tensor, block_size: int) -> Batch:
    """The windows at `starts` as a CPU batch: inputs (B, block_size) and the next tokens as labels."""
    rows = np.stack([stream.window(int(s), block_size + 1).astype(np.int64) for s in starts])
    xy = torch.from_numpy(rows)
    return Batch(input_ids=xy[:, :-1], labels=xy[:, 1:])
