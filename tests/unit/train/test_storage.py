"""A full disk while training: one StorageError line, the previous checkpoint intact, no leftovers,
and resuming works once there is space again. Leftovers of a killed save are removed when a run
starts, even when it then fails; a half-written metrics line is dropped with a note."""

from __future__ import annotations

import errno
import json

import pytest
import safetensors.torch
import torch

from fledge import files
from fledge.errors import CheckpointError, StorageError
from fledge.train import checkpoint as ckpt
from fledge.train import report, train
from fledge.train.report import read_metrics
from tiny_runs import assert_same_checkpoint, changed, losses, make_recipe


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def fail_at_call(n: int, real):
    """`real`, except that its n-th call (from 1) finds the disk full."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            disk_full()
        return real(*args, **kwargs)
    return wrapper


def fail_fsync_of(monkeypatch, folder: str, name: str) -> None:
    """Make fsync report a full disk while fledge.files writes `folder/name`."""
    real_write, real_fsync = ckpt.write_atomic, files._fsync
    target = []

    def write_atomic(path, data, *args):
        target[:] = [path.parent.name == folder and path.name == name]
        return real_write(path, data, *args)

    def fsync(fd):
        if target == [True]:
            disk_full()
        real_fsync(fd)

    monkeypatch.setattr(ckpt, "write_atomic", write_atomic)
    monkeypatch.setattr(files, "_fsync", fsync)


def leftovers(run_dir) -> list[str]:
    return sorted(p.name for p in run_dir.rglob("*") if p.name.endswith(".tmp") or p.name == ckpt.PARTIAL)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return train(make_recipe(tmp_path_factory.mktemp("whole"), "whole"), progress=False)


@pytest.mark.parametrize("where", ["weights", "optimizer", "fsync"])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(where, whole, tmp_path, monkeypatch):
    recipe = make_recipe(tmp_path, "full", eval_every=0)
    if where == "weights":          # the second save (step 8) serialises its weights
        monkeypatch.setattr(safetensors.torch, "save", fail_at_call(2, safetensors.torch.save))
    elif where == "optimizer":      # torch.save is called twice per save: optimizer.pt, rng.pt
        monkeypatch.setattr(torch, "save", fail_at_call(3, torch.save))
    else:                           # the file system reports it late, at fsync (NFS, delayed allocation)
        fail_fsync_of(monkeypatch, ".step-000008.tmp", "state.json")
    with pytest.raises(StorageError) as caught:
        train(recipe, progress=False)
    message = str(caught.value)
    assert "\n" not in message and "the disk is full" in message
    assert "Checkpoint step-000008 was not saved; step-000004 and older are intact" in message
    assert [p.name for p in ckpt.list_checkpoints(recipe.run_path)] == ["step-000004"]
    assert ckpt.checkpoint_problem(recipe.run_path / "checkpoints" / "step-000004") is None
    assert leftovers(recipe.run_path) == []
    monkeypatch.undo()                                      # space freed
    resumed = train(recipe, resume=True, progress=False)
    assert losses(resumed.run_dir) == losses(whole.run_dir)
    assert_same_checkpoint(resumed.last_checkpoint, whole.last_checkpoint)


def test_disk_full_writing_metrics_then_resume_drops_the_half_line(whole, tmp_path, monkeypatch, capsys):
    recipe = make_recipe(tmp_path, "metrics")
    real_write = report.Reporter.write
    rows = []

    def write(self, row):
        rows.append(row)
        if row.get("step") == 10 and "loss" in row:          # half a line reaches the disk, then ENOSPC
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row)[:20])
            raise files.storage_error(OSError(errno.ENOSPC, "No space left on device"), self.metrics_path)
        real_write(self, row)

    monkeypatch.setattr(report.Reporter, "write", write)
    with pytest.raises(StorageError, match="metrics.jsonl: the disk is full"):
        train(recipe, progress=False)
    monkeypatch.undo()
    assert len(read_metrics(recipe.run_path)) == len([r for r in rows if r.get("step") != 10])
    assert "skipped 1 unreadable line(s)" in capsys.readouterr().err
    resumed = train(recipe, resume=True, progress=False)
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().out
    assert losses(resumed.run_dir) == losses(whole.run_dir)


def test_metrics_write_errors_are_storage_errors(tmp_path, monkeypatch):
    reporter = report.Reporter(tmp_path, 10, 0, True, False, False)
    monkeypatch.setattr(report, "open", disk_full, raising=False)
    with pytest.raises(StorageError, match="could not write .*metrics.jsonl: the disk is full"):
        reporter.step(1, 1.0, 1e-3, 100.0, None, 1.0, 1.0)


def test_a_garbled_last_metrics_line_does_not_stop_a_resume(whole, tmp_path, capsys):
    recipe = make_recipe(tmp_path, "garbled", max_steps=8)
    train(recipe, progress=False)
    with open(recipe.run_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 2.9\n\x00\x00\x00')           # what a kill mid-write can leave
    assert [r["step"] for r in read_metrics(recipe.run_path)][-1] == 8
    longer = changed(recipe, train={"max_steps": 12})
    assert train(longer, resume=True, progress=False).step == 12
    assert "dropped 2 unreadable line(s)" in capsys.readouterr().out
    assert sorted(losses(recipe.run_path)) == list(range(1, 13))


def test_leftovers_of_a_killed_save_are_removed_at_start_even_if_resume_fails(tmp_path, capsys):
    recipe = make_recipe(tmp_path, "stale", max_steps=4)
    train(recipe, progress=False)
    root = recipe.run_path / "checkpoints"
    killed = root / ".step-000008.tmp"                  # a save killed after its first file
    killed.mkdir()
    (killed / ckpt.PARTIAL).touch()
    (killed / "model.safetensors").write_bytes(b"partial")
    old_style = root / ".step-000012.tmp"               # an older fledge's temp folder: no marker
    old_style.mkdir()
    (old_style / "optimizer.pt").write_bytes(b"partial")
    (recipe.run_path / ".recipe.yaml.1234-abcd1234.tmp").write_text("")
    foreign = root / ".step-000016.tmp"                 # not fledge's: kept
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    other = changed(recipe, model={"dim": 48})
    with pytest.raises(CheckpointError, match="comes from another recipe"):
        train(other, resume=True, progress=False)
    assert not killed.exists() and not old_style.exists()
    assert not (recipe.run_path / ".recipe.yaml.1234-abcd1234.tmp").exists()
    assert (foreign / "notes.txt").read_text() == "mine"
    assert "removed 3 unfinished file(s) or folder(s)" in capsys.readouterr().out
