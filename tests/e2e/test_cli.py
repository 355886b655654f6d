"""The real CLI, as a user runs it: one-line errors with a non-zero exit for bad input, and a
tiny corpus taken through prepare -> train (which prepares first, and ends with a summary) ->
sample -> resume."""

from __future__ import annotations

import json
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
    assert "summary: 6 steps, 192 tokens | train loss " in proc.stdout      # 6 x batch 2 x block 16
    assert "(L2 norm since step 0)" in proc.stdout
    run = tmp_path / "runs" / "t"
    assert (run / "recipe.yaml").is_file() and (run / "metrics.jsonl").is_file()
    assert (run / "checkpoints" / "step-000006" / "model.safetensors").is_file()
    assert f"report: {Path('runs') / 't' / 'report.html'}" in proc.stdout and (run / "report.html").is_file()
    assert json.loads((run / "env.json").read_text())["torch"]      # the machine it trained on, for the report

    sample = fledge("sample", "runs/t", "--prompt", "the ", "--max-new-tokens", "10", "--seed", "2", cwd=tmp_path)
    assert sample.returncode == 0, sample.stderr
    again = fledge("sample", "runs/t", "--prompt", "the ", "--max-new-tokens", "10", "--seed", "2", cwd=tmp_path)
    assert sample.stdout == again.stdout and sample.stdout.startswith("the ")

    longer = fledge("train", "recipe.yaml", "--quiet", "--resume", *args, "--set", "train.max_steps=9",
                    cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr
    assert "resuming at step 6" in longer.stdout and "step 9/9" in longer.stdout
    assert "summary: 9 steps" in longer.stdout and "(L2 norm since step 6)" in longer.stdout
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


# --- a checkpoint's recipe, pipes, bugs and --debug --------------------------------------

MARKER_MODULE = '''
from pathlib import Path
Path("imported.txt").write_text("imported")

def build(config, vocab_size):
    from fledge.model.registry import build_llama
    return build_llama(config, vocab_size)
'''


def tiny_checkpoint(run: Path, arch: str) -> Path:
    """A run with one checkpoint of an untrained tiny model whose saved recipe names `arch`."""
    import torch
    import yaml

    from fledge.model.registry import build_llama
    from fledge.recipe import load_recipe
    from fledge.tokenizer import train_tokenizer
    from fledge.train.checkpoint import save_checkpoint
    recipe = load_recipe(None, base={"name": "t", "tokenizer": {"kind": "char", "vocab_size": 64},
                                     "model": {"n_layers": 1, "n_heads": 2, "dim": 16, "max_seq_len": 32},
                                     "train": {"block_size": 16, "max_steps": 1, "warmup_steps": 0}})
    tokenizer = train_tokenizer(recipe.tokenizer, ["the quick brown fox jumps over the lazy dog.\n"])
    model = build_llama(recipe.model, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
    saved = recipe.to_dict()
    saved["model"]["arch"] = arch
    state = {"step": 1, "vocab_size": tokenizer.vocab_size}
    save_checkpoint(run, 1, model, torch.optim.AdamW(model.parameters()), state, yaml.safe_dump(saved),
                    tokenizer.save(run / "data"), None, 1)
    return run


def test_sample_imports_code_named_by_a_checkpoint_only_with_allow_code(tmp_path):
    (tmp_path / "fledge_marker_e2e.py").write_text(MARKER_MODULE)
    tiny_checkpoint(tmp_path / "runs" / "t", "fledge_marker_e2e:build")
    args = ["sample", "runs/t", "--prompt", "the ", "--max-new-tokens", "5"]
    refused = fledge(*args, cwd=tmp_path)
    assert_one_line_error(refused, "model.arch 'fledge_marker_e2e:build'", "--allow-code")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "imported.txt").exists()
    allowed = fledge(*args, "--allow-code", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert (tmp_path / "imported.txt").exists() and allowed.stdout.startswith("the ")


def test_a_closed_pipe_ends_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "fledge", "recipe", "keys"], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()             # the reader is gone before fledge writes a line (like `| head -0`)
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err and err == "", err


def test_an_unexpected_exception_is_reported_as_a_bug(monkeypatch, capsys):
    from fledge import cli

    def broken(args):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(cli, "_recipe_keys", broken)
    assert cli.main(["recipe", "keys"]) == 70
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for fragment in ("bug in fledge", "ValueError: boom second line", "fledge/cli.py:", "fledge env", "--debug"):
        assert fragment in err, err
    with pytest.raises(ValueError):
        cli.main(["recipe", "keys", "--debug"])


def test_debug_before_or_after_the_verb_shows_the_traceback(tmp_path, capsys):
    from fledge import cli
    from fledge.errors import RecipeError
    missing = str(tmp_path / "missing.yaml")
    assert cli.main(["recipe", "check", missing]) == 2
    assert "no such recipe file" in capsys.readouterr().err
    for argv in (["--debug", "recipe", "check", missing], ["recipe", "check", missing, "--debug"],
                 ["sample", missing, "--debug"]):
        with pytest.raises(Exception) as e:
            cli.main(argv)
        assert isinstance(e.value, RecipeError) or type(e.value).__name__ == "CheckpointError"


@pytest.mark.parametrize("extra, fragment", [
    (["--set", "train.lr=[1,"], "not valid YAML"),
    (["--set", "=3"], "empty part"),
    (["--set", "train.=3"], "empty part"),
    (["--set", ".lr=3"], "empty part"),
    (["--set", "model.arch=.foo:bar"], "Relative imports are not allowed"),
    (["--set", "train.lr=.nan"], "train.lr is nan; it must be a finite number"),
    (["--set", "name=../../x"], "name '../../x' must be a plain folder name"),
    (["--set", "train.precision=fp16", "--set", "train.device=cpu"], "train.precision fp16 does not run on a CPU"),
])
def test_recipe_check_reports_bad_values_on_one_line(tmp_path, capsys, extra, fragment):
    from fledge import cli
    path = recipe(tmp_path, "[a.txt]")
    assert cli.main(["recipe", "check", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err, err


def test_recipe_check_tab_in_a_set_value(tmp_path, capsys):
    from fledge import cli
    assert cli.main(["recipe", "check", str(recipe(tmp_path, "[a.txt]")), "--set", "train.lr=\t3e-4"]) == 0
    assert "lr: 0.0003" in capsys.readouterr().out


def test_recipe_check_non_utf8_file(tmp_path, capsys):
    from fledge import cli
    (tmp_path / "recipe.yaml").write_bytes(b"# fledge train recipe.yaml\nname: \xff\n")
    assert cli.main(["recipe", "check", str(tmp_path / "recipe.yaml")]) == 2
    err = capsys.readouterr().err
    assert "recipe.yaml (byte 33): not UTF-8" in err and len(err.strip().splitlines()) == 1
