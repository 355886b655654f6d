"""state.json is a typed TrainingState that stays plain JSON: it round-trips, a checkpoint written
before the newer fields existed (format 2, a plain dict) still loads and resumes, a field of the
wrong type is named as damage, and save_checkpoint writes what the loop chose (a dict of tensors,
extra files) with every file under the integrity record."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from fledge.errors import CheckpointError
from fledge.export.hf import write_transformers_files
from fledge.train import checkpoint as ckpt
from fledge.train import train
from fledge.train.checkpoint import TrainingState
from tiny_runs import assert_same_checkpoint, changed, make_recipe

FORMAT_2 = {"step": 8, "best_val_loss": 2.5, "best_step": 8, "val_loss": 2.5, "vocab_size": 40,
            "tokenizer_sha256": "ab" * 32, "first_val_loss": 3.9, "elapsed_s": 1.5, "format": 2}


def test_state_round_trips_and_reads_older_dicts():
    state = TrainingState(step=3, val_loss=2.0, best_val_loss=2.0, best_step=3, first_train_loss=4.0,
                          evals_without_improvement=1, vocab_size=64, tokenizer_sha256="00")
    assert TrainingState.from_json(json.loads(json.dumps(state.to_json()))) == state
    old = TrainingState.from_json(FORMAT_2)
    assert old.step == 8 and old.best_step == 8 and old.format == 2
    assert old.evals_without_improvement == 0 and old.first_train_loss is None and old.train_loss is None
    assert TrainingState.from_json({"step": 1}).format == 1            # before "format" was written
    assert TrainingState.from_json({**FORMAT_2, "from_a_newer_fledge": [1]}).step == 8
    for bad, why in (({"step": "8"}, "step is '8'"), ({"step": 1, "val_loss": "low"}, "val_loss is 'low'"),
                     ({"step": True}, "step is True"), ({"best_val_loss": 1.0}, "has no step"), ([], "not a JSON")):
        with pytest.raises(ValueError, match=why):
            TrainingState.from_json(bad)


def rewrite_state(folder, state: dict) -> None:
    """Replace state.json and its entry in integrity.json, as an older fledge would have written them."""
    data = json.dumps(state, indent=2).encode()
    (folder / "state.json").write_bytes(data)
    record = json.loads((folder / "integrity.json").read_text())
    record["files"]["state.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "integrity.json").write_text(json.dumps(record))


def test_a_format_2_checkpoint_resumes(tmp_path):
    whole = train(make_recipe(tmp_path, "whole"), progress=False)
    copy = tmp_path / "runs" / "old"
    shutil.copytree(whole.run_dir, copy)
    recipe = changed(make_recipe(tmp_path, "whole"), name="old", run_dir=str(copy))
    shutil.rmtree(copy / "checkpoints" / "step-000012")
    folder = copy / "checkpoints" / "step-000008"
    saved = json.loads((folder / "state.json").read_text())
    rewrite_state(folder, {k: saved[k] for k in FORMAT_2})           # only the keys format 2 had
    resumed = train(recipe, resume=True, progress=False)
    assert resumed.step == 12
    assert_same_checkpoint(resumed.last_checkpoint, whole.last_checkpoint)


def test_a_state_field_of_the_wrong_type_is_damage(tmp_path):
    result = train(make_recipe(tmp_path, "typed", max_steps=4), progress=False)
    folder = result.last_checkpoint
    rewrite_state(folder, {**json.loads((folder / "state.json").read_text()), "best_step": "four"})
    with pytest.raises(CheckpointError, match=r"step-000004 is damaged: state.json best_step is 'four'"):
        ckpt.load_training_state(folder, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))


def test_save_checkpoint_writes_the_tensors_and_extra_files_it_is_given(tmp_path):
    shared = torch.randn(4, 4)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")

    def extra_files(folder):
        (folder / "adapter_config.json").write_text('{"r": 8}')
        write_transformers_files(folder, hf_config={"model_type": "llama"}, tokenizer=None, template=None)

    param = torch.nn.Parameter(shared.clone())
    folder = ckpt.save_checkpoint(tmp_path / "run", 3, {"lora_A": shared}, torch.optim.AdamW([param]),
                                  TrainingState(step=3), "name: t\n", tokenizer, keep_last=1,
                                  aliases={"lora_A_again": "lora_A"}, extra_files=extra_files)
    files = ckpt.verify_checkpoint(folder)
    assert {"adapter_config.json", "config.json", "model.safetensors", "state.json"} <= set(files)
    assert json.loads((folder / "config.json").read_text()) == {"model_type": "llama"}
    assert json.loads((folder / "state.json").read_text())["format"] == ckpt.FORMAT
    tensors, aliases = ckpt._decode_weights(folder, (folder / "model.safetensors").read_bytes())
    assert torch.equal(tensors["lora_A"], shared) and aliases == {"lora_A_again": "lora_A"}
