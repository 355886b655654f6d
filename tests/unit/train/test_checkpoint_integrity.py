"""Damaged checkpoints: every file is checked against integrity.json when read, a damaged one is
named in one line with the reason, resuming falls back to the newest intact checkpoint (and
then repeats the run exactly), a bad best.json is ignored, and a saved recipe imports code only
when the recipe being run names the same architecture."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fledge.errors import CheckpointError
from fledge.model.registry import build_model
from fledge.sample import load_for_inference, resolve_checkpoint
from fledge.train import checkpoint as ckpt
from fledge.train import train
from fledge.train.loop import check_resumable, make_optimizer
from tiny_runs import assert_same_checkpoint, changed, make_recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 12-step run with checkpoints at steps 4, 8 and 12 (the best)."""
    root = tmp_path_factory.mktemp("trained")
    recipe = make_recipe(root, "base", keep_last=3)
    return recipe, train(recipe, progress=False)


def copy_of(trained, tmp_path):
    recipe, result = trained
    copy = tmp_path / "runs" / "copy"
    shutil.copytree(result.run_dir, copy)
    return changed(recipe, name="copy", run_dir=str(copy))


def truncate(name):
    def damage(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:len(data) // 2])
    return damage


def remove(name):
    return lambda folder: (folder / name).unlink()


def garble(name):
    return lambda folder: (folder / name).write_text('{"files": {"model.safe')


def overwrite_weights(folder):
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-64:-48] = b"\xff" * 16            # same size; 0xffffffff is a float32 NaN
    (folder / "model.safetensors").write_bytes(bytes(data))


def swap_tokenizer(folder):
    """A valid tokenizer with two characters swapped: it loads, and samples garbage."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["e"] = vocab["e"], vocab["a"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))


CASES = {
    "weights truncated": (truncate("model.safetensors"), "model.safetensors is"),
    "weights overwritten": (overwrite_weights, "model.safetensors does not match its sha256"),
    "optimizer truncated": (truncate("optimizer.pt"), "optimizer.pt is"),
    "optimizer missing": (remove("optimizer.pt"), "optimizer.pt is missing"),
    "rng truncated": (truncate("rng.pt"), "rng.pt is"),
    "rng missing": (remove("rng.pt"), "rng.pt is missing"),
    "state truncated": (truncate("state.json"), "state.json is"),
    "state missing": (remove("state.json"), "state.json is missing"),
    "tokenizer swapped": (swap_tokenizer, "tokenizer.json is"),
    "integrity missing": (remove("integrity.json"), "integrity.json is missing"),
    "integrity garbled": (garble("integrity.json"), "integrity.json is unreadable"),
}


def loader_errors(recipe, folder) -> list[str]:
    """The messages of load_weights and load_training_state on `folder` (the ones that raise)."""
    vocab = json.loads((folder.parent / "step-000008" / "state.json").read_text())["vocab_size"]
    model = build_model(recipe.model, vocab)
    errors = []
    for load in (lambda: ckpt.load_weights(model, folder),
                 lambda: ckpt.load_training_state(folder, make_optimizer(model, recipe.train, torch.device("cpu")))):
        try:
            load()
        except CheckpointError as e:
            errors.append(str(e))
    return errors


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_checkpoint_is_named_and_resume_falls_back(case, trained, tmp_path, capsys):
    recipe = copy_of(trained, tmp_path)
    newest = recipe.run_path / "checkpoints" / "step-000012"
    damage, why = CASES[case]
    damage(newest)
    with pytest.raises(CheckpointError) as caught:
        ckpt.verify_checkpoint(newest)
    assert why in str(caught.value) and str(newest) in str(caught.value) and "\n" not in str(caught.value)
    errors = loader_errors(recipe, newest)
    assert errors and all(why in e and "\n" not in e for e in errors), errors
    assert ckpt.latest_checkpoint(recipe.run_path).name == "step-000008"
    assert f"skipping {newest}: it is damaged ({why}" in capsys.readouterr().err
    resumed = train(recipe, resume=True, progress=False)
    assert resumed.step == 12
    assert_same_checkpoint(newest, trained[1].last_checkpoint)       # redone exactly, in its place


def test_sampling_refuses_a_swapped_tokenizer(trained, tmp_path):
    recipe = copy_of(trained, tmp_path)
    swap_tokenizer(recipe.run_path / "checkpoints" / "step-000012")
    with pytest.raises(CheckpointError, match=r"step-000012 is damaged: tokenizer.json is \d+ bytes but was saved "
                                              r"with \d+"):
        load_for_inference(recipe.run_path / "checkpoints" / "step-000012")


def test_no_intact_checkpoint_left_is_one_clear_error(trained, tmp_path):
    recipe = copy_of(trained, tmp_path)
    for folder in ckpt.list_checkpoints(recipe.run_path):
        truncate("model.safetensors")(folder)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint to resume from \(3 damaged, the newest "
                                              r"step-000012: model.safetensors is \d+ bytes"):
        train(recipe, resume=True, progress=False)


@pytest.mark.parametrize("content, why", [
    ('{"checkpoint": "step-0000', "it is unreadable"),
    ('{"checkpoint": "../../etc", "val_loss": 1.0}', "it names '../../etc', which is not a checkpoint folder"),
    ('{"checkpoint": "step-000008", "val_loss": NaN}', "its validation loss is nan"),
])
def test_a_bad_best_json_is_ignored_with_a_note(trained, tmp_path, capsys, content, why):
    recipe = copy_of(trained, tmp_path)
    (recipe.run_path / "checkpoints" / "best.json").write_text(content)
    assert ckpt.best_checkpoint(recipe.run_path) is None
    assert why in capsys.readouterr().err
    assert resolve_checkpoint(recipe.run_path).name == "step-000012"     # sampling falls back to the latest


def test_a_best_json_naming_a_damaged_checkpoint_is_ignored(trained, tmp_path, capsys):
    recipe = copy_of(trained, tmp_path)
    assert ckpt.best_checkpoint(recipe.run_path).name == "step-000012"
    overwrite_weights(recipe.run_path / "checkpoints" / "step-000012")
    assert ckpt.best_checkpoint(recipe.run_path) is None
    assert "step-000012 is damaged (model.safetensors does not match" in capsys.readouterr().err
    assert resolve_checkpoint(recipe.run_path).name == "step-000008"


def make_legacy(folder) -> None:
    """The folder as fledge wrote it before integrity records: no integrity.json, no format."""
    (folder / "integrity.json").unlink()
    state = json.loads((folder / "state.json").read_text())
    del state["format"]
    (folder / "state.json").write_text(json.dumps(state))


def test_checkpoints_from_before_integrity_records_load_with_a_note(trained, tmp_path, capsys):
    recipe = copy_of(trained, tmp_path)
    for folder in ckpt.list_checkpoints(recipe.run_path):
        make_legacy(folder)
    newest = recipe.run_path / "checkpoints" / "step-000012"
    model, _, _ = load_for_inference(newest)
    assert "has no integrity.json (saved by an older fledge)" in capsys.readouterr().err
    assert torch.equal(model.model.embed_tokens.weight, model.lm_head.weight)
    swap_tokenizer(newest)           # what can still be checked is: the tokenizer against state.json
    with pytest.raises(CheckpointError, match="tokenizer.json is not the tokenizer the model was trained with"):
        load_for_inference(newest)
    assert train(recipe, resume=True, progress=False).step == 12        # resumes from step 8


EVIL = """
from pathlib import Path
Path(__file__).with_name("imported").write_text("the saved recipe's module ran")
def build(config, vocab_size):
    raise AssertionError("never built")
"""


def test_a_saved_recipe_runs_no_code_unless_the_recipe_names_the_same_arch(trained, tmp_path, monkeypatch):
    (tmp_path / "evil_arch.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = copy_of(trained, tmp_path)
    folder = tmp_path / "foreign"
    folder.mkdir()
    saved = recipe.to_dict()
    saved["model"]["arch"] = "evil_arch:build"
    (folder / "recipe.yaml").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=r"model.arch: checkpoint 'evil_arch:build', recipe 'llama'"):
        check_resumable(folder, recipe)
    assert not (tmp_path / "imported").exists()
