"""The training loop's promises: accumulation equals one large batch, a killed run resumes onto
the uninterrupted loss curve, a kill during a save leaves the previous checkpoint valid, the
schedule has its shape, and sampling is deterministic with a seed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fledge.errors import CheckpointError, RecipeError
from fledge.recipe import load_recipe
from fledge.sample import sample
from fledge.train import checkpoint as ckpt
from fledge.train import train
from fledge.train.data import global_batch_starts, rank_slice
from fledge.train.schedule import learning_rate
from tiny_runs import CUSTOM_ARCH, losses, make_recipe, weights


def test_schedule_warmup_then_cosine_to_min_lr():
    t = load_recipe(None, base={"train": {
        "max_steps": 100, "warmup_steps": 10, "lr": 1.0, "min_lr": 0.1}}).train
    rates = [learning_rate(s, t) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert learning_rate(100, t) == pytest.approx(0.1)
    assert rates[55] == pytest.approx(0.55, abs=0.01)


def test_global_batch_is_split_identically_across_processes_and_micro_steps():
    starts = global_batch_starts(5, 1, 8, 10_000, 32)
    assert torch.equal(starts, global_batch_starts(5, 1, 8, 10_000, 32))
    one = torch.cat([rank_slice(starts, m, 0, 1, 2) for m in range(4)])
    two = torch.cat([rank_slice(starts, m, r, 2, 2) for m in range(2) for r in range(2)])
    assert torch.equal(one, starts) and torch.equal(two, starts)


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    big = train(make_recipe(tmp_path, "big", batch_size=8, grad_accum=1, max_steps=3), progress=False)
    acc = train(make_recipe(tmp_path, "acc", batch_size=2, grad_accum=4, max_steps=3), progress=False)
    a, b = losses(big.run_dir), losses(acc.run_dir)
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5)
    wa, wb = weights(big.last_checkpoint), weights(acc.last_checkpoint)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=2e-6, rtol=1e-5)


DRIVER = """
import os, sys
sys.path.insert(0, {src!r})
import torch
torch.set_num_threads(1)
from fledge.recipe import load_recipe
from fledge.train import loop, checkpoint
mode, kill_at = sys.argv[1], int(sys.argv[2])
if mode == "step":
    real = loop.learning_rate
    def learning_rate(step, t):
        if step == kill_at:
            os._exit(9)          # a hard kill: no cleanup, no exception handlers
        return real(step, t)
    loop.learning_rate = learning_rate
else:
    real = checkpoint.write_weights
    calls = []
    def write_weights(tensors, path, *rest):
        calls.append(path)
        if len(calls) == kill_at:
            path.write_bytes(b"partial")
            os._exit(9)
        real(tensors, path, *rest)
    checkpoint.write_weights = write_weights
loop.train(load_recipe({recipe!r}), progress=False)
"""


def run_killed(tmp_path: Path, recipe, mode: str, kill_at: int) -> None:
    recipe_path = tmp_path / f"{recipe.name}.yaml"
    recipe.save(recipe_path)
    src = str(Path(__file__).resolve().parents[3] / "src")
    script = textwrap.dedent(DRIVER).format(src=src, recipe=str(recipe_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, mode, str(kill_at)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]


def test_killed_run_resumes_onto_the_uninterrupted_curve(tmp_path):
    whole = train(make_recipe(tmp_path, "whole"), progress=False)
    killed = make_recipe(tmp_path, "killed")
    run_killed(tmp_path, killed, "step", kill_at=10)       # dies during step 11, after the step-8 checkpoint
    assert ckpt.latest_checkpoint(killed.run_path).name == "step-000008"
    resumed = train(killed, resume=True, progress=False)
    a, b = losses(whole.run_dir), losses(resumed.run_dir)
    assert sorted(b) == list(range(1, 13))                  # steps after 8 were logged once, not twice
    for step in range(1, 13):
        assert a[step] == pytest.approx(b[step], rel=1e-6), step
    assert resumed.final_val_loss == pytest.approx(whole.final_val_loss, rel=1e-6)
    wa, wb = weights(whole.last_checkpoint), weights(resumed.last_checkpoint)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kill_during_save_leaves_previous_checkpoint_valid(tmp_path):
    recipe = make_recipe(tmp_path, "crash", eval_every=0)
    run_killed(tmp_path, recipe, "save", kill_at=2)        # dies writing the step-8 checkpoint
    root = recipe.run_path / "checkpoints"
    assert (root / ".step-000008.tmp").is_dir()
    assert ckpt.latest_checkpoint(recipe.run_path).name == "step-000004"
    assert weights(root / "step-000004")                   # loads
    resumed = train(recipe, resume=True, progress=False)
    assert resumed.step == 12 and not (root / ".step-000008.tmp").exists()


def test_checkpoints_are_self_contained_and_pruned(tmp_path):
    result = train(make_recipe(tmp_path, "prune", max_steps=16, eval_every=4, checkpoint_every=4),
                   progress=False)
    names = [p.name for p in ckpt.list_checkpoints(result.run_dir)]
    best = ckpt.best_checkpoint(result.run_dir)
    assert names[-2:] == ["step-000012", "step-000016"] and best.name in names and len(names) <= 3
    for item in ("model.safetensors", "config.json", "optimizer.pt", "rng.pt", "state.json", "recipe.yaml",
                 "tokenizer.json", "integrity.json"):
        assert (result.last_checkpoint / item).is_file(), item
    state = json.loads((result.last_checkpoint / "state.json").read_text())
    assert state["step"] == 16 and math.isfinite(state["val_loss"])


def test_existing_run_needs_resume_and_foreign_checkpoint_is_refused(tmp_path):
    recipe = make_recipe(tmp_path, "guard", max_steps=4)
    train(recipe, progress=False)
    with pytest.raises(CheckpointError, match="--resume"):
        train(recipe, progress=False)
    other = load_recipe(None, base={**recipe.to_dict(), "model": {**recipe.to_dict()["model"], "dim": 48}})
    with pytest.raises(CheckpointError, match=r"model.dim: checkpoint 32, recipe 48"):
        train(other, resume=True, progress=False)


def test_sampling_is_deterministic_with_a_seed(tmp_path):
    run = train(make_recipe(tmp_path, "sample", max_steps=8), progress=False).run_dir
    first = sample(run, "1 ", max_new_tokens=20, temperature=1.0, seed=3, num_samples=2)
    assert first == sample(run, "1 ", max_new_tokens=20, temperature=1.0, seed=3, num_samples=2)
    assert first != sample(run, "1 ", max_new_tokens=20, temperature=1.0, seed=4, num_samples=2)
    streamed = []
    sample(run, "1 ", max_new_tokens=20, temperature=1.0, seed=3, on_text=lambda i, piece: streamed.append(piece))
    assert "".join(streamed) == sample(run, "1 ", max_new_tokens=20, temperature=1.0, seed=3)[0]


def test_own_architecture_from_a_module_reference_trains_and_resumes(tmp_path, monkeypatch):
    (tmp_path / "my_bigram.py").write_text(CUSTOM_ARCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = make_recipe(tmp_path, "custom", max_steps=8, lr=0.1)
    recipe = load_recipe(None, base={**recipe.to_dict(), "model": {**recipe.to_dict()["model"],
                                                                    "arch": "my_bigram:build"}})
    first = train(recipe, progress=False)
    assert first.final_val_loss < first.first_val_loss - 0.3
    assert not (first.last_checkpoint / "config.json").exists()     # not a Llama: no transformers config
    longer = load_recipe(None, base={**recipe.to_dict(), "train": {**recipe.to_dict()["train"], "max_steps": 12}})
    assert train(longer, resume=True, progress=False).step == 12
    with pytest.raises(RecipeError, match="my_bigram has no function .nope."):
        load_recipe(None, base={**recipe.to_dict(), "model": {**recipe.to_dict()["model"], "arch": "my_bigram:nope"}})


def test_a_run_that_did_not_learn_says_so(tmp_path, capsys):
    result = train(make_recipe(tmp_path, "frozen", lr=0.0, min_lr=0.0, max_steps=4), progress=False)
    assert result.final_val_loss == pytest.approx(result.first_val_loss)
    assert "the model did not learn" in capsys.readouterr().out
