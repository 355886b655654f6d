"""A step is one unit, and resuming repeats the uninterrupted run bit for bit with dropout on:
measuring leaves the global RNG alone, Ctrl-C inside a step saves that whole step (never N+1
updates under the name N), and an interrupt the loop cannot defer saves nothing for its step."""

from __future__ import annotations

import signal

import torch

from fledge.env import matmul_peak
from fledge.train import checkpoint as ckpt
from fledge.train import train
from tiny_runs import assert_same_checkpoint, interrupt_optimizer_step, losses, make_recipe

DROPOUT = {"dropout": 0.1}


def test_measuring_the_matmul_peak_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    matmul_peak.__wrapped__(torch.float32, "cpu", 64, 0.001)       # the uncached function
    assert torch.equal(before, torch.get_rng_state())


def test_sigint_inside_a_step_saves_that_whole_step_and_resume_is_exact(tmp_path, monkeypatch, capsys):
    whole = train(make_recipe(tmp_path, "whole", DROPOUT, checkpoint_every=2, keep_last=10), progress=False)
    handler = signal.getsignal(signal.SIGINT)
    recipe = make_recipe(tmp_path, "cut", DROPOUT, checkpoint_every=4, keep_last=10)
    calls = interrupt_optimizer_step(monkeypatch, at_call=6)
    cut = train(recipe, progress=False)
    assert cut.interrupted and cut.step == 6 and len(calls) == 6
    assert "interrupted at step 6: checkpoint saved" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is handler           # the loop put the previous handler back
    assert [p.name for p in ckpt.list_checkpoints(recipe.run_path)] == ["step-000004", "step-000006"]
    assert_same_checkpoint(recipe.run_path / "checkpoints/step-000006", whole.run_dir / "checkpoints/step-000006")
    monkeypatch.undo()
    matmul_peak.cache_clear()           # measure again after the restore, as a fresh process would
    resumed = train(recipe, resume=True, progress=False)
    assert resumed.step == 12 and losses(resumed.run_dir) == losses(whole.run_dir)
    assert_same_checkpoint(resumed.last_checkpoint, whole.last_checkpoint)


def test_an_interrupt_raised_inside_a_step_saves_nothing_for_that_step(tmp_path, monkeypatch, capsys):
    recipe = make_recipe(tmp_path, "raised", checkpoint_every=4, keep_last=10)
    interrupt_optimizer_step(monkeypatch, at_call=6, how="raise")
    result = train(recipe, progress=False)
    assert result.interrupted
    assert "interrupted during step 6: that step is lost and the last checkpoint is step-000004" in \
        capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(recipe.run_path)] == ["step-000004"]


def test_a_second_sigint_stops_at_once(tmp_path, monkeypatch, capsys):
    import os
    real = torch.optim.AdamW.step
    calls = []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)         # the first asks to stop after this step...
            os.kill(os.getpid(), signal.SIGINT)         # ...the second stops now, before the update
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    result = train(make_recipe(tmp_path, "twice", checkpoint_every=2), progress=False)
    assert result.interrupted and len(calls) == 3
    assert "interrupted during step 3: that step is lost and the last checkpoint is step-000002" in \
        capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(result.run_dir)] == ["step-000002"]
