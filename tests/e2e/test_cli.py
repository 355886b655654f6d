"""The real CLI, as a user runs it: one-line errors with a non-zero exit for bad input, and a
tiny corpus taken through prepare -> train -> sample -> resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
TINY = dict(model="model.n_layers=1 model.n_heads=2 model.dim=16 model.max_seq_len=32",
            train="train.max_steps=6 train.batch_size=2 train.block_size=16 train.warmup_steps=1 "
                  "train.eval_every=3 train.eval_batches=1 train.log_every=2 train.checkpoint_every=3")


def fledge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fledge", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def recipe(tmp_path: Path, sources: str, extra: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"# fledge train recipe.yaml\nname: t\ndata:\n  sources: {sources}\n"
                    f"tokenizer:\n  kind: char\n  vocab_size: 64\n{extra}")
    return path


def sets(*groups: str) -> list[str]:
    out = []
    for group in groups:
        for item in TINY[group].split():
            out += ["--set", item]
    return out


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in message, message


def test_missing_source(tmp_path):
    recipe(tmp_path, "[nowhere/*.txt]")
    assert_one_line_error(fledge("prepare", "recipe.yaml", cwd=tmp_path), "nowhere/*.txt")


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    recipe(tmp_path, "[empty.txt]")
    assert_one_line_error(fledge("prepare", "recipe.yaml", cwd=tmp_path), "empty")


def test_non_utf8_bytes_named_with_offset_or_replaced(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"hello world\n" * 50 + b"caf\xe9\n" + b"more text here\n" * 50)
    recipe(tmp_path, "[bad.txt]")
    assert_one_line_error(fledge("prepare", "recipe.yaml", cwd=tmp_path), "bad.txt", "byte 603")
    ok = fledge("prepare", "recipe.yaml", "--set", "data.on_decode_error=replace", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr


def test_vocab_larger_than_corpus_supports(tmp_path):
    (tmp_path / "small.txt").write_text("abc abc abc\n" * 100)
    recipe(tmp_path, "[small.txt]", "")
    proc = fledge("prepare", "recipe.yaml", "--set", "tokenizer.kind=bpe", "--set", "tokenizer.vocab_size=5000",
                  cwd=tmp_path)
    assert_one_line_error(proc, "5000", "vocab_size")


def test_block_size_larger_than_model_supports(tmp_path):
    recipe(tmp_path, "[a.txt]", "model:\n  max_seq_len: 32\ntrain:\n  block_size: 64\n")
    assert_one_line_error(fledge("train", "recipe.yaml", cwd=tmp_path),
                          "train.block_size (64) exceeds model.max_seq_len (32)")


def test_bad_recipe_key(tmp_path):
    recipe(tmp_path, "[a.txt]", "train:\n  learning_rate: 1\n")
    assert_one_line_error(fledge("train", "recipe.yaml", cwd=tmp_path), "did you mean train.")


@pytest.mark.slow
def test_prepare_train_sample_resume_and_foreign_checkpoint(tmp_path):
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    recipe(tmp_path, "[a.txt]")
    args = sets("model", "train")
    proc = fledge("train", "recipe.yaml", "--quiet", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "step 6/6" in proc.stdout and "eval step 6" in proc.stdout
    run = tmp_path / "runs" / "t"
    assert (run / "recipe.yaml").is_file() and (run / "metrics.jsonl").is_file()
    assert (run / "checkpoints" / "step-000006" / "model.safetensors").is_file()

    sample = fledge("sample", "runs/t", "--prompt", "the ", "--max-new-tokens", "10", "--seed", "2", cwd=tmp_path)
    assert sample.returncode == 0, sample.stderr
    again = fledge("sample", "runs/t", "--prompt", "the ", "--max-new-tokens", "10", "--seed", "2", cwd=tmp_path)
    assert sample.stdout == again.stdout and sample.stdout.startswith("the ")

    longer = fledge("train", "recipe.yaml", "--quiet", "--resume", *args, "--set", "train.max_steps=9",
                    cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr
    assert "resuming at step 6" in longer.stdout and "step 9/9" in longer.stdout
    assert "train.max_steps: checkpoint 6, recipe 9" in longer.stdout

    refused = fledge("train", "recipe.yaml", "--resume", *args, "--set", "model.dim=32", cwd=tmp_path)
    assert_one_line_error(refused, "comes from another recipe", "model.dim: checkpoint 16, recipe 32")
    again = fledge("train", "recipe.yaml", *args, cwd=tmp_path)
    assert_one_line_error(again, "--resume")


def test_help_lists_every_verb(tmp_path):
    out = fledge("--help", cwd=tmp_path).stdout
    for verb in ("quickstart", "prepare", "train", "sample", "env", "recipe"):
        assert verb in out
    keys = fledge("recipe", "keys", cwd=tmp_path)
    assert "train.lr" in keys.stdout and "model.preset" in keys.stdout


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path):
    import json
    import signal
    import time
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 300)
    recipe(tmp_path, "[a.txt]")
    args = sets("model") + ["--set", "train.max_steps=100000", "--set", "train.batch_size=2",
                            "--set", "train.block_size=16", "--set", "train.log_every=1",
                            "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0",
                            "--set", "train.warmup_steps=1"]
    proc = subprocess.Popen([sys.executable, "-m", "fledge", "train", "recipe.yaml", "--quiet", *args],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "t" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.is_file() or metrics.read_text().count('"loss"') < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in out and "--resume" in out
    checkpoints = sorted((tmp_path / "runs" / "t" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1
    step = json.loads((checkpoints[0] / "state.json").read_text())["step"]
    assert step >= 3
    done = fledge("train", "recipe.yaml", "--quiet", "--resume", *args, "--set", f"train.max_steps={step + 2}",
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"resuming at step {step}" in done.stdout and f"step {step + 2}/{step + 2}" in done.stdout
