"""Training batches from prepared token shards.

The shards of one split are memory-mapped and read as one flat token stream. The windows
of optimizer step `s` are a pure function of (seed, s): resuming at step s needs no data
cursor, and N processes that each take their slice of the same global batch see exactly
the windows one process would see with an N times larger batch.

Validation uses a fixed set of evenly spaced windows, the same at every evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fledge.errors import FledgeError


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


def micro_batch(stream: TokenStream, starts: torch.Tensor, block_size: int, device) -> tuple[torch.Tensor, ...]:
    """(inputs, targets), each (B, block_size), for the given window starts."""
    rows = np.stack([stream.window(int(s), block_size + 1).astype(np.int64) for s in starts])
    xy = torch.from_numpy(rows)
    x, y = xy[:, :-1], xy[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def rank_slice(starts: torch.Tensor, micro: int, rank: int, world: int, batch_size: int) -> torch.Tensor:
    """The windows of one process for one micro-step: global order is (micro, rank, row)."""
    begin = (micro * world + rank) * batch_size
    return starts[begin: begin + batch_size]


def eval_starts(stream: TokenStream, block_size: int, count: int) -> torch.Tensor:
    """`count` evenly spaced windows over the split (fewer when the split is short)."""
    last = stream.n_tokens - block_size - 1
    count = max(1, min(count, last + 1))
    return torch.linspace(0, last, count).long().unique()
