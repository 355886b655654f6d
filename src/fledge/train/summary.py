"""Whether a run learned: proof after its first step, and a summary at its end.

    watch = WeightWatch(model, first_step=True, keep_start=is_main)
    ...                                      # after the first optimizer step that was applied:
    watch.check_first_step(optimizer)        # FledgeError naming the parameters that did not train
    report.say(summary_text(...))            # losses at start and end, trainable share, weight change

Proof of learning: after the first optimizer step of a run (not of a resumed one) every
trainable tensor (requires_grad) must have received a gradient, and every one whose gradient
is not all zero must have changed. A tensor that is not part of the loss (detached, or
unused) gets no gradient; one the optimizer does not hold keeps its values. A gradient that
is exactly zero is allowed to leave its tensor as it was: LoRA's A matrices get one at the
first step, since B starts at zero. Whether a tensor changed is read from two float64
checksums per tensor (sum and sum of squares) taken at the start, so the proof costs no
copy of the weights.

The weight-change norm ||theta_end - theta_start|| (L2, over trainable tensors) needs the
start values: the main process keeps a CPU copy of the trainable tensors only, in their own
dtype, and only when it takes at most an eighth of the machine's memory (a full fine-tune
of a 1B model in bf16 is 2 GB; its LoRA is a few MB). Otherwise the summary says it was not
measured and why. A resumed run measures the change since the step it resumed at.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from fledge.errors import FledgeError

MEMORY_SHARE = 8        # the start copy may take at most 1/MEMORY_SHARE of physical memory
CHUNK = 1 << 24         # elements summed at a time in float64 (128 MB)


class LearningError(FledgeError):
    """Trainable parameters did not train in the first step: a run that would learn nothing, or
    only part of what it should."""


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters with requires_grad, each tensor once (tied ones under their first name)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters, tied tensors counted once; a packed 4-bit tensor
    (QLoRA) counts the numbers it stands for (its quant_state's shape), not its bytes."""
    params = list(model.parameters())
    return sum(_count(p) for p in params if p.requires_grad), sum(_count(p) for p in params)


def _count(p: torch.Tensor) -> int:
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None and hasattr(state, "shape") else p.numel()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):       # no sysconf (Windows) or the name is unknown
        return None


class WeightWatch:
    """Checksums of the trainable tensors at the start of a run (for the first-step proof) and,
    when `keep_start` and it fits in memory, a CPU copy of them (for the weight-change norm)."""

    def __init__(self, model: torch.nn.Module, *, first_step: bool, keep_start: bool):
        self.tensors = trainable_tensors(model)
        self.pending = first_step       # the proof waits for the first applied optimizer step
        self.checksums = _checksums(self.tensors) if first_step else None
        self.start: dict[str, torch.Tensor] | None = None
        self.not_kept = ""              # why no start copy was kept
        size = sum(p.numel() * p.element_size() for p in self.tensors.values())
        memory = _memory_bytes()
        if not keep_start:
            return
        if memory is not None and size > memory / MEMORY_SHARE:
            self.not_kept = (f"the trainable weights ({size / 2**30:.1f} GiB) would take more than 1/{MEMORY_SHARE} "
                             f"of this machine's memory as a second copy")
            return
        self.start = {name: p.detach().to("cpu", copy=True) for name, p in self.tensors.items()}

    def check_first_step(self, optimizer: torch.optim.Optimizer) -> None:
        """After the first applied optimizer step, before its gradients are cleared: raise
        LearningError naming the trainable tensors that got no gradient or did not change."""
        if not self.pending:
            return
        self.pending = False
        no_gradient = [name for name, p in self.tensors.items() if p.grad is None]
        moved = any(group["lr"] > 0 for group in optimizer.param_groups)
        unchanged = []
        if moved:       # with a learning rate of 0 nothing changes, and the end of the run says so
            after = _checksums(self.tensors)
            unchanged = [name for (name, p), old, new in zip(self.tensors.items(), self.checksums, after)
                         if p.grad is not None and bool(p.grad.any()) and torch.equal(old, new)]
        if no_gradient or unchanged:
            raise LearningError(_did_not_train(no_gradient, unchanged, len(self.tensors)))

    def change_norm(self) -> float | None:
        """||theta_now - theta_start|| over the trainable tensors, or None without a start copy."""
        if self.start is None:
            return None
        total = 0.0
        for name, p in self.tensors.items():
            now, start = p.detach().reshape(-1), self.start[name].reshape(-1)
            for begin in range(0, now.numel(), CHUNK):        # in pieces: no float64 copy of a whole tensor
                piece = now[begin:begin + CHUNK].to("cpu", torch.float64)
                total += float((piece - start[begin:begin + CHUNK].to(torch.float64)).square().sum())
        return math.sqrt(total)


def _checksums(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per tensor (sum, sum of squares) in float64, on the CPU: any real update changes them.
    Summed in pieces, so no float64 copy of a whole (embedding-sized) tensor is made."""
    out = []
    with torch.no_grad():
        for p in tensors.values():
            device = _float64_device(p.device)
            total = torch.zeros(2, dtype=torch.float64, device=device)
            for piece in p.detach().reshape(-1).split(CHUNK):
                piece = piece.to(device).double()
                total[0] += piece.sum()
                total[1] += piece.square().sum()
            out.append(total.cpu())
    return out


def _float64_device(device: torch.device) -> torch.device:
    """Where float64 sums can run: the tensor's device, or the CPU for Apple's MPS (no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


def _did_not_train(no_gradient: list[str], unchanged: list[str], n_trainable: int) -> str:
    names = no_gradient + unchanged
    shown = ", ".join(names[:10]) + (f" (and {len(names) - 10} more)" if len(names) > 10 else "")
    why = []
    if no_gradient:
        why.append(f"{len(no_gradient)} got no gradient: they take no part in the loss (unused in forward, or "
                   f"detached from it)")
    if unchanged:
        why.append(f"{len(unchanged)} had a gradient but the optimizer did not change them (they are not among "
                   f"its parameters)")
    return (f"these parameters did not train in the first step ({len(names)} of {n_trainable} trainable "
            f"tensors): {shown}. {'; '.join(why)}. The run would not train them at all. Use them in the loss, "
            f"or set requires_grad=False on those that should stay fixed.")


def summary_text(*, steps: int, tokens: int, first_train: float | None, last_train: float | None,
                 first_val: float | None, last_val: float | None, best_val: float | None,
                 best_step: int | None, counts: tuple[int, int], change: float | None, since_step: int,
                 not_measured: str) -> str:
    """One line: steps and tokens, train and val loss at start and end, trainable share, weight change."""
    def losses(first, last):
        return f"{_loss(first)} -> {_loss(last)}"
    trainable, total = counts
    parts = [f"{steps:,} steps, {tokens:,} tokens", f"train loss {losses(first_train, last_train)}",
             f"val loss {losses(first_val, last_val)}" + (f" (best {best_val:.4f} at step {best_step})"
                                                          if best_val is not None else ""),
             f"trained {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.1f}%)"]
    if change is not None:
        parts.append(f"weight change {change:.4g} (L2 norm since step {since_step})")
    elif not_measured:
        parts.append(f"weight change not measured: {not_measured}")
    return "summary: " + " | ".join(parts)


def _loss(value: float | None) -> str:
    return "?" if value is None else f"{value:.4f}"


def learning_verdict(first_val: float | None, final_val: float | None, best_val: float | None,
                     run_dir: Path) -> str | None:
    """Whether validation loss fell: one line, or None without two evaluations."""
    if first_val is None or final_val is None:
        return None
    if not math.isfinite(final_val):
        return f"[bold red]the run diverged[/]: val loss is {final_val}. Lower train.lr."
    if final_val > first_val - 0.01:
        return (f"[bold red]the model did not learn[/]: val loss {first_val:.4f} at step 0, {final_val:.4f} now. "
                f"Check train.lr, train.max_steps and the data.")
    return (f"val loss {first_val:.4f} -> {final_val:.4f} (best {best_val:.4f}); checkpoints in "
            f"{run_dir / 'checkpoints'}")
