"""Validation loss over fixed batches, the summed loss of one batch, and the baselines it should beat.

    val = evaluate_loss(model, source.val_batches(rank, world), device, precision, world)

The validation loss is weighted by target tokens: the sum of every target's loss over all
batches and processes, divided by the number of targets. A mean per batch or per row would
weight a token of a short (or mostly masked) row more than one of a long row.

The unigram entropy of the training tokens is the loss of a model that learned only how
often each token occurs: a language model that ends above it has not learned anything
about context.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
import torch.distributed as dist

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


def summed_loss(model, batch: Batch, keyword: bool, n_targets: int | None = None) -> torch.Tensor:
    """The sum of the cross-entropy of the batch's targets (a 0-d tensor).

    keyword: the model meets the contract and is called `model(**batch.model_inputs(),
    reduction="sum")`. Otherwise it is an own architecture with `forward(idx, targets)` that
    returns the mean over targets (labels of -100 ignored, as F.cross_entropy does); the mean
    is multiplied back by the count (`n_targets`, counted here when not given)."""
    if keyword:
        return model(**batch.model_inputs(), reduction="sum")[1]
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
