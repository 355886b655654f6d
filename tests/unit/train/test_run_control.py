"""How long a run trains and what it needs first: early stopping (patience, min_delta, the count
surviving a resume, the best checkpoint kept), train.epochs from a source's steps per epoch, and
a clear line when the prepared data is missing."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fledge.errors import FledgeError, RecipeError
from fledge.recipe import load_recipe
from fledge.train import checkpoint as ckpt
from fledge.train import train
from fledge.train.data import WindowBatches
from tiny_runs import changed, make_recipe


def state_of(checkpoint) -> dict:
    return json.loads((checkpoint / "state.json").read_text())


def test_early_stopping_stops_after_patience_evaluations_and_the_count_survives_resume(tmp_path, capsys):
    # lr 0: the val loss never falls, so every evaluation after the first counts.
    recipe = make_recipe(tmp_path, "patience", lr=0.0, min_lr=0.0, eval_every=1, checkpoint_every=0,
                         early_stop_patience=2)
    result = train(recipe, progress=False)
    out = capsys.readouterr().out
    assert result.stopped_early and result.step == 3 and not result.interrupted
    assert "stopping early at step 3: val loss has not fallen more than 0 below the best" in out
    assert "in 2 evaluations in a row (train.early_stop_patience). The best checkpoint is step-000001." in out
    assert result.best_checkpoint.name == "step-000001"
    assert state_of(result.last_checkpoint)["evals_without_improvement"] == 2
    assert "summary: 3 steps" in out

    again = train(recipe, resume=True, progress=False)          # the same patience: nothing more to do
    assert again.stopped_early and again.step == 3
    assert "this run stopped early at step 3" in capsys.readouterr().out

    more = train(changed(recipe, train={"early_stop_patience": 4}), resume=True, progress=False)
    assert more.stopped_early and more.step == 5                # counts 3 and 4 at steps 4 and 5
    assert state_of(more.last_checkpoint)["evals_without_improvement"] == 4


def test_min_delta_decides_what_counts_and_the_best_checkpoint_follows_any_improvement(tmp_path, capsys):
    recipe = make_recipe(tmp_path, "delta", eval_every=2, checkpoint_every=0, keep_last=1,
                         early_stop_patience=2, early_stop_min_delta=10.0)
    result = train(recipe, progress=False)
    assert result.stopped_early and result.step == 6
    assert "val loss has not fallen more than 10 below the best" in capsys.readouterr().out
    assert result.best_checkpoint.name == "step-000006"       # it still improved, by less than min_delta
    assert result.best_val_loss < result.first_val_loss


class EpochWindows(WindowBatches):
    """Windows that claim a pass over them takes 4 steps (a stand-in for RowBatches)."""

    def steps_per_epoch(self, world: int, batch_size: int, grad_accum: int) -> int:
        return 4


def with_epochs(recipe, epochs: float):
    """Validation refuses train.epochs without data.rows; the loop's side is tested on its own."""
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, epochs=epochs))


def test_epochs_set_max_steps_from_the_source(tmp_path, capsys):
    recipe = with_epochs(make_recipe(tmp_path, "epochs", max_steps=100, eval_every=0), 1.5)
    source = EpochWindows.from_prepared(recipe.prepared_path, recipe.train)
    result = train(recipe, progress=False, source=source)
    assert result.step == 6 and not result.stopped_early
    assert "note: train.epochs 1.5 x 4 steps per epoch = 6 steps" in capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(recipe.run_path)][-1] == "step-000006"


def test_epochs_check_warmup_and_need_a_source_that_counts_steps(tmp_path):
    recipe = with_epochs(make_recipe(tmp_path, "warm", max_steps=100, warmup_steps=10), 1.5)
    source = EpochWindows.from_prepared(recipe.prepared_path, recipe.train)
    with pytest.raises(RecipeError, match=r"train.warmup_steps \(10\) exceeds the 6 steps train.epochs gives "
                                          r"\(1.5 x 4 steps per epoch\)"):
        train(recipe, progress=False, source=source)
    with pytest.raises(RecipeError, match="does not say how many steps a pass takes"):
        train(recipe, progress=False)


def test_train_without_prepared_data_says_to_run_prepare(tmp_path):
    (tmp_path / "corpus.txt").write_text("some text\n" * 100)
    recipe = load_recipe(None, base={"name": "raw", "run_dir": str(tmp_path / "run"),
                                     "data": {"sources": [str(tmp_path / "corpus.txt")]},
                                     "tokenizer": {"kind": "char", "vocab_size": 64}})
    with pytest.raises(FledgeError) as caught:
        train(recipe, progress=False)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "run" / "data") in message
    assert "Run `fledge prepare RECIPE` first" in message
    assert not (tmp_path / "run" / "checkpoints").exists()
