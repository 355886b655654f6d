"""Validation loss over fixed batches, the summed loss of one batch, and the baselines it should beat.

    val = evaluate_loss(model, source.val_batches(rank, world), device, precision, world)

The validation loss is weighted by target tokens: the sum of every target's loss over all
batches and processes, divided by the number of targets. A mean per batch or per row would
weight a token of a short (or mostly masked) row more than one of a long row.

`row_losses` gives each held-out row's summed loss and target count (for `fledge eval RUN`,
fledge.evaluate.run), and `bits_per_byte` turns a summed loss into bits per byte of text.

The unigram entropy of the training tokens is the loss of a model that learned only how
often each token occurs: a language model that ends above it has not learned anything
about context.
"""

from __future__ import annotations

import functools
import inspect
import math

import numpy as np
import torch
import torch.distributed as dist

from collections.abc import Callable, Sequence

from fledge.errors import FledgeError
from fledge.train.batches import Batch
from fledge.train.data import TokenStream


def takes_reduction(model: torch.nn.Module) -> bool:
    """Whether the model's forward meets the keyword contract (`reduction="sum"`, position and
    document ids; fledge.model.gpt). peft wrappers are looked through to the model they wrap."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "reduction" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):      # a forward without a readable signature: the positional call
        return False


def _loss_only(model: torch.nn.Module) -> dict:
    """{"logits": False} when the model's forward can skip the output head where nothing is trained."""
    inner = model.module if hasattr(model, "module") and not hasattr(model, "get_base_model") else model
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return {"logits": False} if _takes_logits(type(inner).forward) else {}


@functools.lru_cache(maxsize=None)
def _takes_logits(forward) -> bool:
    """Whether a forward function has the `logits` keyword (read once per class, not per micro-batch)."""
    try:
        return "logits" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def summed_loss(model, batch: Batch, keyword: bool, n_targets: int | None = None) -> torch.Tensor:
    """The sum of the cross-entropy of the batch's targets (a 0-d tensor).

    keyword: the model meets the contract and is called `model(**batch.model_inputs(),
    reduction="sum")`. Otherwise it is an own architecture with `forward(idx, targets)` that
    returns the mean over targets (labels of -100 ignored, as F.cross_entropy does); the mean
    is multiplied back by the count (`n_targets`, counted here when not given)."""
    if keyword:
        return model(**batch.model_inputs(), reduction="sum", **_loss_only(model))[1]
    if batch.position_ids is not None or batch.document_ids is not None:
        raise FledgeError("these batches pack several rows into a sequence, and the model's forward takes no "
                          "position_ids or document_ids: give it the keyword forward of the model contract "
                          "(forward(input_ids, labels, *, reduction, position_ids, document_ids); see "
                          "fledge.model.gpt), or set finetune.packing: false.")
    _, mean = model(batch.input_ids, batch.labels)
    return mean * (batch.n_targets if n_targets is None else n_targets)


@torch.no_grad()
def evaluate_loss(model, batches: list[Batch], device, precision, world: int = 1) -> float:
    """Loss per target token over `batches` (this process's share) and every process's share."""
    was_training = model.training
    model.eval()
    keyword = takes_reduction(model)
    # (sum of target losses, targets) in float64, which Apple's MPS lacks: there on the CPU.
    total = torch.zeros(2, dtype=torch.float64, device="cpu" if torch.device(device).type == "mps" else device)
    for batch in batches:
        n_targets = batch.n_targets
        if not n_targets:
            continue
        with precision.autocast(device):
            loss = summed_loss(model, batch.to(device), keyword, n_targets)
        total[0] += loss.detach().float().to(total.device).double()
        total[1] += n_targets
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    if not total[1]:
        raise FledgeError("the validation batches hold no target tokens (every label is masked); check the "
                          "validation data")
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


@torch.no_grad()
def row_losses(model, rows: Sequence[tuple[Sequence[int], Sequence[int]]], device="cpu", *, batch_size: int = 16,
               pad_id: int = 0, on_rows: Callable[[int], None] | None = None) -> list[tuple[float, int]]:
    """(summed loss in nats, target count) of each row, in order; a row is (ids, shifted labels) with
    labels[t] = the target after token t, or -100 where nothing is scored (fledge.train.rows).

    Rows are batched by length (longest first, so padding stays small) and right-padded with
    `pad_id`, which is never a target: causal attention keeps real tokens from seeing padding
    after them, so a row's losses are those of the row alone. The sums are taken in float64.
    A model without the keyword forward (an own architecture: forward(idx, targets) -> mean) is
    called one row at a time. `on_rows(n)` hears about every n rows done."""
    was_training = model.training
    model.eval()
    keyword = takes_reduction(model)
    out: list[tuple[float, int] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    size = batch_size if keyword else 1
    try:
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            width = len(rows[chunk[0]][0])
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for b, i in enumerate(chunk):
                n = len(rows[i][0])
                ids[b, :n] = torch.as_tensor(rows[i][0], dtype=torch.long)
                labels[b, :n] = torch.as_tensor(rows[i][1], dtype=torch.long)
            counts = (labels != -100).sum(dim=1).tolist()
            ids, labels = ids.to(device), labels.to(device)
            if keyword:
                per_token = model(ids, labels, reduction="none")[1]             # (B, T), 0 where ignored
                sums = per_token.double().sum(dim=1).tolist()
            else:
                sums = [float(summed_loss(model, Batch(ids, labels), False, counts[0])) if counts[0] else 0.0]
            for i, total, count in zip(chunk, sums, counts):
                out[i] = (float(total), int(count))
            if on_rows:
                on_rows(len(chunk))
    finally:
        model.train(was_training)
    return out


def bits_per_byte(loss_sum: float, n_bytes: int) -> float:
    """Summed loss in nats over the UTF-8 bytes of the text it scored, in bits: loss_sum / (bytes ln 2).
    Equal to mean token loss x tokens / (bytes x ln 2), and comparable across tokenizers."""
    return loss_sum / (n_bytes * math.log(2))
