"""One optimizer step: its micro-batches, the loss per target token, the update, the checks.

The loss of a step is the sum of the losses of all its target tokens, over every micro-batch
and every process, divided by the number of those targets. The targets are counted first,
on the host (a batch stays on the CPU until it is used), and the count is summed over the
processes. Each process then backpropagates, per micro-batch,

    world * (summed loss of the micro-batch) / (targets of the whole step)

because DDP averages gradients over the `world` processes: the average is the gradient of
the step's loss per target, however unevenly masked labels spread the targets over
micro-batches and processes. So accumulation equals one large batch, and N processes equal
one, with answer-only labels as with plain text.

A NaN or infinite loss or gradient norm raises `TrainingDiverged` before the update is
applied; the first applied step of a run is checked for parameters that did not train
(`fledge.train.summary.WeightWatch`).
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
import torch.distributed

from fledge.errors import FledgeError
from fledge.evaluate.loss import summed_loss
from fledge.train.distributed import Distributed

if TYPE_CHECKING:
    from fledge.recipe import Recipe
    from fledge.train.loop import Setup


class TrainingDiverged(FledgeError):
    """The loss, the gradient norm or the validation loss became NaN or infinite."""


def sum_over_processes(value: torch.Tensor, dist: Distributed) -> torch.Tensor:
    """A tensor summed over every process (itself in a single process)."""
    if dist.world == 1:
        return value
    value = value.detach().clone()
    torch.distributed.all_reduce(value)
    return value


def train_step(s: Setup, recipe: Recipe, step: int, precision, dist: Distributed, scaler) -> torch.Tensor:
    """Optimizer step `step + 1`. Returns this process's share of the step's loss per target (the
    shares of all processes add up to it); raises TrainingDiverged, with the update not applied,
    when the loss or the gradient norm is not finite."""
    t = recipe.train
    batches = [s.source.train_batch(step, micro, dist.rank, dist.world) for micro in range(t.grad_accum)]
    counts = [batch.n_targets for batch in batches]
    total = int(sum_over_processes(torch.tensor(sum(counts), dtype=torch.int64, device=dist.device), dist))
    if total == 0:
        raise FledgeError(f"step {step + 1} has no target tokens: every label of its batches is masked. Check "
                          f"the data (rows without an answer to train on?).")
    scale = dist.world / total
    loss_sum = torch.zeros((), device=dist.device)
    for micro, (batch, n_targets) in enumerate(zip(batches, counts)):
        sync = micro == t.grad_accum - 1
        with (contextlib.nullcontext() if sync or dist.world == 1 else s.model.no_sync()):
            with precision.autocast(dist.device):
                summed = summed_loss(s.model, batch.to(dist.device), s.keyword_forward, n_targets)
            scaled = summed * scale
            (scaler.scale(scaled) if scaler else scaled).backward()
        loss_sum += summed.detach().float()
    loss = loss_sum / total
    if scaler:
        scaler.unscale_(s.optimizer)
    # The norm before clipping; max_norm=inf measures it without changing a gradient (x * 1.0).
    norm = torch.nn.utils.clip_grad_norm_(s.raw_model.parameters(), t.grad_clip or math.inf)
    # fp16's loss scaler skips steps with inf gradients by design: there only the loss counts.
    _stop_if_diverged(s, recipe, step + 1, loss, None if scaler else norm, precision, dist)
    if scaler:
        before = scaler.get_scale() if s.watch.pending else None
        scaler.step(s.optimizer)
        scaler.update()
        applied = before is None or scaler.get_scale() >= before     # a skipped step lowers the scale
    else:
        s.optimizer.step()
        applied = True
    if applied:
        s.watch.check_first_step(s.optimizer)
    s.optimizer.zero_grad(set_to_none=True)
    return loss


def _stop_if_diverged(s: Setup, recipe: Recipe, number: int, loss: torch.Tensor, norm: torch.Tensor | None,
                      precision, dist: Distributed) -> None:
    bad = ~torch.isfinite(loss)
    if norm is not None:
        bad = bad | ~torch.isfinite(norm)
    if dist.world > 1:          # every process stops at the same step
        diverged = dist.mean(bad.float()) > 0
    else:
        diverged = bool(bad)
    if not diverged:
        return
    s.optimizer.zero_grad(set_to_none=True)
    loss = sum_over_processes(loss, dist)       # every process is here: the shares add up to the step's loss
    norm_text = f" (gradient norm {float(norm):.4g})" if norm is not None else ""
    raise TrainingDiverged(f"training diverged at step {number}: the loss is {float(loss):.4g}{norm_text}; that "
                           f"update was not applied and no checkpoint is saved from it. "
                           f"{divergence_advice(recipe, precision)}")


def divergence_advice(recipe: Recipe, precision) -> str:
    t = recipe.train
    tries = [f"lower train.lr (now {t.lr:g})", f"raise train.warmup_steps (now {t.warmup_steps})",
             "set train.grad_clip (now 0), e.g. to 1.0" if not t.grad_clip else
             f"lower train.grad_clip (now {t.grad_clip:g})"]
    if precision.name != "fp32":
        tries.append(f"train in fp32 (train.precision=fp32, now {precision.name})")
    return "Try: " + "; ".join(tries) + ". Then continue from the last checkpoint with --resume."
