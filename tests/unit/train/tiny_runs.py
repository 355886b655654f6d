"""Tiny training runs for the train tests: a 2-layer, 32-wide model on a char-tokenized corpus in
tmp_path (prepared by `make_recipe`, as `fledge train` prepares before training), and ways to
read what a run left behind.

    from tiny_runs import make_recipe, losses, weights
    recipe = make_recipe(tmp_path, "name", max_steps=8, model={"dropout": 0.1})
"""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file

from fledge.prepare import prepare
from fledge.recipe import load_recipe
from fledge.train.batches import IGNORE
from fledge.train.data import WindowBatches
from fledge.train.report import read_metrics

CORPUS = "".join(f"{i} little pigs went to market; the {i % 7} wolves stayed home.\n" for i in range(600))


def make_recipe(tmp_path: Path, name: str, model: dict | None = None, **train_overrides):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(CORPUS)
    train = dict(max_steps=12, batch_size=4, block_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=2, log_every=1,
                 eval_every=4, eval_batches=2, checkpoint_every=4, keep_last=2, threads=1, seed=7)
    train.update(train_overrides)
    recipe = load_recipe(None, base={
        "name": name, "run_dir": str(tmp_path / "runs" / name),
        "data": {"sources": [str(corpus)], "prepared_dir": str(tmp_path / "prepared")},
        "tokenizer": {"kind": "char", "vocab_size": 64},
        "model": {"n_layers": 2, "n_heads": 2, "dim": 32, "max_seq_len": 64, **(model or {})},
        "train": train, "sample": {"prompts": ["1 "], "max_new_tokens": 8}})
    prepare(recipe, progress=False)
    return recipe


def changed(recipe, **sections):
    """The recipe with some keys of its sections replaced: changed(r, train={"max_steps": 4})."""
    d = recipe.to_dict()
    return load_recipe(None, base={**d, **{k: {**d[k], **v} if isinstance(v, dict) else v
                                           for k, v in sections.items()}})


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir) if "loss" in row}


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def optimizer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "optimizer.pt", weights_only=True)


def rows_file(root: Path) -> Path:
    """root/rows.jsonl: 80 input/output rows ("3 little pigs" -> "the 3 wolves"), written once."""
    path = root / "rows.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps({"input": f"{i} little pigs", "output": f"the {i % 7} wolves"}) + "\n"
                                for i in range(80)))
    return path


def assert_same_tensors(a, b, where: str = "") -> None:
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Same weights, optimizer state and RNG state, bit for bit."""
    assert_same_tensors(weights(a), weights(b), "weights")
    assert_same_tensors(optimizer_state(a), optimizer_state(b), "optimizer")
    assert_same_tensors(torch.load(a / "rng.pt", weights_only=True), torch.load(b / "rng.pt", weights_only=True),
                        "rng")


def interrupt_optimizer_step(monkeypatch, at_call: int, how: str = "sigint") -> list[int]:
    """Make the `at_call`-th AdamW step (counted from 1) end with Ctrl-C: `sigint` sends SIGINT to
    this process after the update is applied, `raise` raises KeyboardInterrupt there."""
    import os
    real = torch.optim.AdamW.step
    calls = []

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == at_call:
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise KeyboardInterrupt
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return calls


CUSTOM_ARCH = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class Bigram(nn.Module):
    """The smallest language model: next-token logits from the current token alone."""

    def __init__(self, vocab_size):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx, targets=None):
        logits = self.table(idx)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def build(config, vocab_size):
    return Bigram(vocab_size)
'''


class MaskedWindows(WindowBatches):
    """Windows whose labels are masked at random positions, a different share per row (5% to 95%
    kept), so micro-batches and processes hold very different numbers of targets. The mask is a
    function of the step and the row's tokens, so a row gets the same mask however the global
    batch is split over micro-batches and processes."""

    def train_batch(self, step, micro, rank, world):
        return masked(super().train_batch(step, micro, rank, world), step + 1)

    def val_batches(self, rank, world):
        return [masked(batch, 0) for batch in super().val_batches(rank, world)]


def masked(batch, salt: int):
    labels = batch.labels.clone()
    for row in range(len(labels)):
        ids = batch.input_ids[row]
        seed = int((ids * torch.arange(1, len(ids) + 1)).sum()) * 1_000_003 + salt
        g = torch.Generator().manual_seed(seed % 2**62)
        keep = 0.05 + 0.9 * float(torch.rand((), generator=g))
        labels[row][torch.rand(len(ids), generator=g) >= keep] = IGNORE
    return dataclasses.replace(batch, labels=labels)


def masked_source(recipe) -> MaskedWindows:
    return MaskedWindows.from_prepared(recipe.prepared_path, recipe.train)


def capture_gradients(monkeypatch, at_call: int = 1) -> dict[str, torch.Tensor]:
    """The gradients of every parameter (by position) as clip_grad_norm_ sees them at its `at_call`-th
    call: after backward (and DDP's averaging), before clipping and the update."""
    real = torch.nn.utils.clip_grad_norm_
    calls, grads = [], {}

    def clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        calls.append(1)
        if len(calls) == at_call:
            grads.update({str(i): p.grad.detach().clone() for i, p in enumerate(parameters) if p.grad is not None})
        return real(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    return grads
