"""What the training loop eats: batches of token ids with their targets, from a batch source.

    source = WindowBatches(...) | RowBatches(...)          # pretraining windows, or fine-tuning rows
    batch = source.train_batch(step, micro, rank, world)   # a pure function of (seed, step, micro, rank, world)
    logits, loss_sum = model(batch.input_ids, batch.labels, reduction="sum",
                             position_ids=batch.position_ids, document_ids=batch.document_ids)
    loss = loss_sum / total_targets_of_the_step           # summed over micro-batches and processes

Every source is a pure function of the step, so a resumed run needs no data cursor and N
processes that each take their slice see exactly what one process with an N times larger
batch would see. The loss of a step is the sum of token losses divided by the number of
target tokens across all its micro-batches and processes: with masked labels (answers
only) micro-batches hold different numbers of targets, and a mean per micro-batch would
weight tokens unequally.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

IGNORE = -100   # a label that trains nothing (prompt tokens, padding); what F.cross_entropy ignores


@dataclass
class Batch:
    input_ids: torch.Tensor                     # (B, T) token ids
    labels: torch.Tensor                        # (B, T) the token that follows each position; IGNORE: not trained
    position_ids: torch.Tensor | None = None    # (B, T) RoPE positions, restarting at 0 for each packed row
    document_ids: torch.Tensor | None = None    # (B, T) which packed row each token belongs to

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device: torch.device) -> "Batch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if device.type == "cuda":
                return t.pin_memory().to(device, non_blocking=True)
            return t.to(device)
        return replace(self, input_ids=move(self.input_ids), labels=move(self.labels),
                       position_ids=move(self.position_ids), document_ids=move(self.document_ids))

    def model_inputs(self) -> dict:
        """Keyword arguments of the model contract (`forward(input_ids, labels, ...)`) for this batch."""
        return {"input_ids": self.input_ids, "labels": self.labels, "position_ids": self.position_ids,
                "document_ids": self.document_ids}


class BatchSource(Protocol):
    """Where training and validation batches come from."""

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> Batch:
        """The micro-batch `micro` of process `rank` (of `world`) at optimizer step `step`."""

    def val_batches(self, rank: int, world: int) -> list[Batch]:
        """This process's share of the fixed validation set (the same at every evaluation)."""

    def tokens_per_step(self, world: int) -> int:
        """Tokens (input positions, padding excluded) one optimizer step reads, all processes together."""

    def describe(self) -> str:
        """One line for the run header: what the batches are made of."""
