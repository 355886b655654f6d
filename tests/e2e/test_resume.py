"""Resuming is exact: a run killed with SIGKILL at seeded random moments (once inside a save) and
stopped with Ctrl-C, then resumed each time, ends bit for bit where the uninterrupted run ends,
with dropout on: weights, optimizer and RNG states, best.json, and the losses, validation losses
and samples in metrics.jsonl. Every run is a real `python -m fledge train` process. A diverging
run exits non-zero with one line."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
STEPS = 240
CORPUS = "".join(f"{i} little pigs went to market; the {i % 7} wolves stayed home.\n" for i in range(600))

# Runs `fledge train ... --resume` and kills itself (SIGKILL) inside its n-th checkpoint save, once
# the weights are in the temp folder and before anything else is.
KILL_IN_SAVE = """
import os, signal, sys
from fledge.train import checkpoint
from fledge.cli import main
real, calls = checkpoint.write_weights, []
def write_weights(*args):
    real(*args)
    calls.append(1)
    if len(calls) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.write_weights = write_weights
sys.exit(main(sys.argv[2:]))
"""


def write_recipe(tmp_path: Path, name: str) -> str:
    (tmp_path / "corpus.txt").write_text(CORPUS)
    recipe = {"name": name, "data": {"sources": ["corpus.txt"], "prepared_dir": "prepared"},
              "tokenizer": {"kind": "char", "vocab_size": 64},
              "model": {"n_layers": 2, "n_heads": 2, "dim": 32, "max_seq_len": 64, "dropout": 0.1},
              "train": {"max_steps": STEPS, "batch_size": 4, "block_size": 32, "lr": 3e-3, "min_lr": 3e-4,
                        "warmup_steps": 10, "log_every": 1, "eval_every": 40, "eval_batches": 2,
                        "checkpoint_every": 20, "keep_last": 2, "threads": 1, "seed": 7},
              "sample": {"prompts": ["1 "], "max_new_tokens": 8}}
    (tmp_path / f"{name}.yaml").write_text(f"# fledge train {name}.yaml\n" + yaml.safe_dump(recipe))
    return f"{name}.yaml"


def start(tmp_path: Path, args: list[str], log: str) -> subprocess.Popen:
    with open(tmp_path / log, "w") as out:
        return subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=ENV, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, tmp_path: Path, log: str) -> tuple[int, str]:
    code = proc.wait(timeout=240)
    return code, (tmp_path / log).read_text()


def rows(run: Path) -> list[dict]:
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:          # the line being written
            pass
    return out


def last_logged_step(run: Path) -> int:
    return max((row["step"] for row in rows(run) if "loss" in row), default=0)


def stop_at(proc: subprocess.Popen, run: Path, step: int, sig: int) -> int:
    """Send `sig` once the run has logged step `step`; return the step logged by then."""
    deadline = time.time() + 240
    while last_logged_step(run) < step:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    return last_logged_step(run)


def curve(run: Path) -> dict:
    """What must repeat exactly: per step its loss and lr, validation loss, samples (no timings)."""
    out: dict = {}
    for row in rows(run):
        for key in ("loss", "lr", "val_loss", "samples"):
            if key in row:
                assert (row["step"], key) not in out, f"step {row['step']} logged {key} twice"
                out[row["step"], key] = row[key]
    return out


def assert_same_files(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for name in ("optimizer.pt", "rng.pt"):
        sa, sb = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
        assert repr(sa) == repr(sb), name     # nested dicts of tensors: repr prints every value
        flat_a, flat_b = torch.utils._pytree.tree_flatten(sa)[0], torch.utils._pytree.tree_flatten(sb)[0]
        assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(flat_a, flat_b))


def test_resume_after_kills_and_ctrl_c_with_dropout_is_bit_exact(tmp_path):
    rng = random.Random(20240607)
    whole_recipe, cut_recipe = write_recipe(tmp_path, "whole"), write_recipe(tmp_path, "cut")
    train = ["-m", "fledge", "train", "--quiet"]
    code, out = finish(start(tmp_path, [*train, whole_recipe], "whole.log"), tmp_path, "whole.log")
    assert code == 0, out
    run = tmp_path / "runs" / "cut"

    proc = start(tmp_path, [*train, cut_recipe], "1.log")
    reached = stop_at(proc, run, rng.randint(25, 70), signal.SIGKILL)
    assert finish(proc, tmp_path, "1.log")[0] == -signal.SIGKILL

    save = rng.randint(1, 3)
    proc = start(tmp_path, ["-c", textwrap.dedent(KILL_IN_SAVE), str(save), "train", cut_recipe, "--quiet",
                            "--resume"], "2.log")
    code, out = finish(proc, tmp_path, "2.log")
    assert code == -signal.SIGKILL, out
    assert list((run / "checkpoints").glob(".step-*.tmp")), "the kill did not land inside a save"

    proc = start(tmp_path, [*train, cut_recipe, "--resume"], "3.log")
    reached = stop_at(proc, run, max(reached, last_logged_step(run)) + rng.randint(10, 40), signal.SIGINT)
    code, after_save_kill = finish(proc, tmp_path, "3.log")
    assert code == 130 and "checkpoint saved" in after_save_kill, after_save_kill
    assert not list((run / "checkpoints").glob(".step-*.tmp"))

    proc = start(tmp_path, [*train, cut_recipe, "--resume"], "4.log")
    reached = stop_at(proc, run, min(reached + rng.randint(10, 40), STEPS - 20), signal.SIGKILL)
    assert finish(proc, tmp_path, "4.log")[0] == -signal.SIGKILL

    code, out = finish(start(tmp_path, [*train, cut_recipe, "--resume"], "5.log"), tmp_path, "5.log")
    assert code == 0 and f"step {STEPS}/{STEPS}" in out, out

    whole = tmp_path / "runs" / "whole"
    assert curve(run) == curve(whole)
    assert sorted(step for step, key in curve(run) if key == "loss") == list(range(1, STEPS + 1))
    final = f"checkpoints/step-{STEPS:06d}"
    assert_same_files(run / final, whole / final)
    assert (run / "checkpoints/best.json").read_text() == (whole / "checkpoints/best.json").read_text()
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert "note: removed 1 unfinished" in after_save_kill       # the temp folder went before anything else


def test_a_diverging_run_exits_non_zero_with_one_line(tmp_path):
    recipe = write_recipe(tmp_path, "boom")
    proc = subprocess.run([sys.executable, "-m", "fledge", "train", recipe, "--quiet", "--set", "train.lr=1e6",
                           "--set", "train.warmup_steps=0", "--set", "train.grad_clip=0", "--set",
                           "train.eval_every=1", "--set", "train.checkpoint_every=1"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    diverged = re.match(r"error: training diverged (at|by) step (\d+): ", message)
    assert diverged and "lower train.lr (now 1e+06)" in message, message
    step = int(diverged[2])
    for state in (tmp_path / "runs" / "boom" / "checkpoints").glob("step-*/state.json"):
        assert json.loads(state.read_text())["step"] < step
    best = tmp_path / "runs" / "boom" / "checkpoints" / "best.json"
    assert not best.exists() or math.isfinite(json.loads(best.read_text())["val_loss"])
