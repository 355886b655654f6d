"""A run that diverges stops at the first NaN or infinite loss, gradient norm or validation loss,
names the step and what to try, applies no update from it and saves nothing from it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fledge.errors import FledgeError
from fledge.train import checkpoint as ckpt
from fledge.train import loop, train
from fledge.train.loop import TrainingDiverged
from tiny_runs import make_recipe, weights


def count_optimizer_steps(monkeypatch) -> list[int]:
    real = torch.optim.AdamW.step
    calls = []

    def step(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return calls


def assert_every_checkpoint_finite(run_dir, before_step: int) -> None:
    for path in ckpt.list_checkpoints(run_dir):
        state = json.loads((path / "state.json").read_text())
        assert state["step"] < before_step, path
        assert all(math.isfinite(state[k]) for k in ("val_loss", "best_val_loss") if state.get(k) is not None)
        assert all(bool(torch.isfinite(t).all()) for t in weights(path).values()), path
    best = run_dir / "checkpoints" / "best.json"
    if best.exists():
        assert math.isfinite(json.loads(best.read_text())["val_loss"])


def test_a_huge_learning_rate_stops_at_the_first_non_finite_step(tmp_path, monkeypatch):
    recipe = make_recipe(tmp_path, "boom", lr=1e6, min_lr=0.0, warmup_steps=0, grad_clip=0.0, max_steps=30,
                         eval_every=1, checkpoint_every=1, keep_last=50)
    calls = count_optimizer_steps(monkeypatch)
    with pytest.raises(TrainingDiverged) as caught:
        train(recipe, progress=False)
    message = str(caught.value)
    assert isinstance(caught.value, FledgeError) and "\n" not in message
    assert "lower train.lr (now 1e+06)" in message and "train.grad_clip" in message
    step = int(message.split(" step ")[1].split(":")[0])
    # the diverged step's update was never applied; a NaN val loss stops after its (finite) update
    assert len(calls) in (step - 1, step)
    assert_every_checkpoint_finite(recipe.run_path, before_step=step)


def test_a_nan_validation_loss_is_never_saved_or_best(tmp_path, monkeypatch):
    real = loop.evaluate_loss
    calls = []

    def evaluate_loss(*args, **kwargs):
        calls.append(1)
        return float("nan") if len(calls) == 3 else real(*args, **kwargs)    # 1: step 0, 2: step 4, 3: step 8

    monkeypatch.setattr(loop, "evaluate_loss", evaluate_loss)
    recipe = make_recipe(tmp_path, "nanval")
    with pytest.raises(TrainingDiverged, match=r"training diverged by step 8: the validation loss is nan"):
        train(recipe, progress=False)
    assert [p.name for p in ckpt.list_checkpoints(recipe.run_path)] == ["step-000004"]
    assert_every_checkpoint_finite(recipe.run_path, before_step=8)


def test_a_nan_gradient_is_not_applied(tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    calls = []

    def clip(parameters, max_norm, *args, **kwargs):
        calls.append(1)
        parameters = list(parameters)
        if len(calls) == 5:
            parameters[0].grad[0, 0] = float("nan")      # one poisoned gradient at step 5
        return real(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    steps = count_optimizer_steps(monkeypatch)
    with pytest.raises(TrainingDiverged, match=r"at step 5: the loss is [0-9.]+ \(gradient norm nan\)"):
        train(make_recipe(tmp_path, "nangrad", grad_clip=0.0), progress=False)
    assert len(steps) == 4
