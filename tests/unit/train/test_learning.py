"""A run proves it learns: after its first step every trainable tensor got a gradient and changed
(a tensor detached from the loss, or missing from the optimizer, stops the run naming it; a
gradient of exactly zero, LoRA's A at the first step, is allowed), and every run ends with a
summary line whose numbers can be recomputed from what it saved."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn as nn

from fledge.model.registry import build_model
from fledge.recipe import load_recipe
from fledge.tokenizer import find_tokenizer_file, load_tokenizer
from fledge.train import checkpoint as ckpt
from fledge.train import loop, summary, train
from fledge.train.summary import LearningError, WeightWatch
from tiny_runs import make_recipe, weights

DETACHED_ARCH = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class Bigram(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)
        self.temperature = nn.Parameter(torch.ones(()))
        self.unused = nn.Linear(4, 4)

    def forward(self, idx, targets=None):
        logits = self.table(idx) / self.temperature.detach()    # the temperature never trains
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def build(config, vocab_size):
    return Bigram(vocab_size)
'''


def own_arch_recipe(tmp_path, monkeypatch, name: str, **train_overrides):
    (tmp_path / f"{name}_arch.py").write_text(DETACHED_ARCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = make_recipe(tmp_path, name, **train_overrides)
    return load_recipe(None, base={**recipe.to_dict(), "model": {**recipe.to_dict()["model"],
                                                                    "arch": f"{name}_arch:build"}})


def test_parameters_detached_from_the_loss_stop_the_run_after_step_1(tmp_path, monkeypatch):
    recipe = own_arch_recipe(tmp_path, monkeypatch, "detached")
    with pytest.raises(LearningError) as caught:
        train(recipe, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("these parameters did not train in the first step (3 of 4 trainable tensors): "
                              "temperature, unused.weight, unused.bias. 3 got no gradient")
    assert "requires_grad=False" in message
    assert ckpt.list_checkpoints(recipe.run_path) == []


def test_a_parameter_the_optimizer_does_not_hold_is_named(tmp_path, monkeypatch):
    real = loop.make_optimizer

    def make_optimizer(model, t, device, say=None):
        optimizer = real(model, t, device, say)
        group = optimizer.param_groups[0]
        group["params"] = group["params"][1:]       # the embedding (and the head tied to it) left out
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", make_optimizer)
    with pytest.raises(LearningError, match=r"\(1 of \d+ trainable tensors\): model.embed_tokens.weight. 1 had a "
                                            r"gradient but the optimizer did not change them"):
        train(make_recipe(tmp_path, "not-held", weight_decay=0.0), progress=False)


def test_a_gradient_of_exactly_zero_may_leave_its_tensor_as_it_was():
    class LowRank(nn.Module):           # LoRA's shape: B starts at zero, so A's first gradient is zero
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(4, 2))
            self.b = nn.Parameter(torch.zeros(2, 4))

    model = LowRank()
    watch = WeightWatch(model, first_step=True, keep_start=True)
    (torch.ones(3, 4) @ model.a @ model.b).sum().backward()
    assert not model.a.grad.any() and model.b.grad.any()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    optimizer.step()
    watch.check_first_step(optimizer)           # no error: a is unchanged, but its gradient was zero
    assert watch.change_norm() == pytest.approx(float(model.b.detach().norm()))


def test_every_run_ends_with_a_summary_that_adds_up(tmp_path, capsys):
    recipe = make_recipe(tmp_path, "summary", max_steps=8)
    result = train(recipe, progress=False)
    line = [row for row in capsys.readouterr().out.splitlines() if row.startswith("summary: ")][-1]
    tokenizer = load_tokenizer(find_tokenizer_file(recipe.prepared_path))
    torch.manual_seed(recipe.train.seed)
    start = build_model(recipe.model, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
    end = weights(result.last_checkpoint)
    change = math.sqrt(sum(float((end[n] - p.detach()).square().sum()) for n, p in start.named_parameters()))
    n_params = sum(p.numel() for p in start.parameters())
    state = ckpt.TrainingState.from_json(json.loads((result.last_checkpoint / "state.json").read_text()))
    assert line.startswith(f"summary: 8 steps, {8 * 4 * 32:,} tokens | train loss {state.first_train_loss:.4f} -> "
                           f"{state.train_loss:.4f} | val loss {result.first_val_loss:.4f} -> "
                           f"{result.final_val_loss:.4f} (best {result.best_val_loss:.4f} at step 8) | trained "
                           f"{n_params:,} of {n_params:,} parameters (100.0%) | weight change "), line
    printed = float(re.search(r"weight change ([0-9.e+-]+) \(L2 norm since step 0\)", line)[1])
    assert printed == pytest.approx(change, rel=1e-3)


def test_a_start_copy_too_large_for_memory_is_not_kept_and_the_summary_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(summary, "_memory_bytes", lambda: 1000)
    train(make_recipe(tmp_path, "big", max_steps=2), progress=False)
    assert "weight change not measured: the trainable weights (0.0 GiB) would take more than 1/8 of this " \
           "machine's memory" in capsys.readouterr().out
