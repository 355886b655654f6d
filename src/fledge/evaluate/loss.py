"""Validation loss on a fixed set of windows, and the baselines it should beat.

The unigram entropy of the training tokens is the loss of a model that learned only how
often each token occurs: a language model that ends above it has not learned anything
about context.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from fledge.train.data import TokenStream, micro_batch


@torch.no_grad()
def evaluate_loss(model, stream: TokenStream, starts: torch.Tensor, block_size: int, batch_size: int, device,
                  precision, rank: int = 0, world: int = 1) -> float:
    """Mean next-token loss over the windows `starts`; each process takes every world-th window."""
    was_training = model.training
    model.eval()
    mine = starts[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)   # (sum of window losses, windows)
    for i in range(0, len(mine), batch_size):
        x, y = micro_batch(stream, mine[i:i + batch_size], block_size, device)
        with precision.autocast(device):
            _, loss = model(x, y)
        total[0] += loss.double() * len(x)
        total[1] += len(x)
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


def unigram_entropy(stream: TokenStream, vocab_size: int, max_tokens: int = 50_000_000) -> float:
    """Entropy in nats of the token frequencies (the first `max_tokens` tokens)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    seen = 0
    for shard in stream.shards:
        part = shard[: max(0, max_tokens - seen)]
        counts += np.bincount(part, minlength=vocab_size)[:vocab_size]
        seen += len(part)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
