"""Two CPU processes under torchrun (gloo) train exactly like one process with the same global
batch: the same losses step by step and the same final weights; only rank 0 writes. With labels
masked at random, the gradient of a step and the validation loss are per target token across
processes too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
COMMON = ["--quiet", "--set", "train.max_steps=5", "--set", "train.log_every=1", "--set", "train.eval_every=5",
          "--set", "train.threads=1", "--set", "train.warmup_steps=1"]


def losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"line {i}: the cat sat on mat {i % 13}\n" for i in range(800)))
    (tmp_path / "recipe.yaml").write_text(
        "name: one\ndata: {sources: [a.txt], prepared_dir: prepared}\ntokenizer: {kind: char, vocab_size: 64}\n"
        "model: {n_layers: 2, n_heads: 2, dim: 32, max_seq_len: 32}\n"
        "train: {block_size: 16, eval_batches: 2, lr: 0.003}\n")
    one = subprocess.run([sys.executable, "-m", "fledge", "train", "recipe.yaml", *COMMON,
                          "--set", "train.batch_size=4"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "fledge", "train", "recipe.yaml", *COMMON, "--set", "train.batch_size=2",
                          "--set", "name=two"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run runs/two") == 1                # only rank 0 reports
    a, b = losses(tmp_path / "runs" / "one"), losses(tmp_path / "runs" / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step
    wa = load_file(str(tmp_path / "runs/one/checkpoints/step-000005/model.safetensors"))
    wb = load_file(str(tmp_path / "runs/two/checkpoints/step-000005/model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)


# Trains with labels masked at random (tests/unit/train/tiny_runs.py: MaskedWindows) and saves the
# gradients of step 1, after DDP's averaging and before clipping, one file per process.
MASKED_DRIVER = """
import os, sys
import torch
sys.path.insert(0, {tests!r})
from fledge.recipe import load_recipe
from fledge.train import train
from tiny_runs import masked_source
real, calls = torch.nn.utils.clip_grad_norm_, []
def clip(parameters, max_norm, *args, **kwargs):
    parameters = list(parameters)
    calls.append(1)
    if len(calls) == 1:
        name = f"grads-{{sys.argv[2]}}-{{os.environ.get('RANK', 0)}}.pt"
        torch.save([p.grad.detach().clone() for p in parameters], name)
    return real(parameters, max_norm, *args, **kwargs)
torch.nn.utils.clip_grad_norm_ = clip
recipe = load_recipe(sys.argv[1], sys.argv[3:])
train(recipe, progress=False, source=masked_source(recipe))
"""


def val_losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r]


@pytest.mark.slow
def test_two_processes_match_one_with_masked_labels(tmp_path):
    """Per-token loss across processes: DDP's average of world * sum / (targets of all processes)
    is the one-process gradient, and validation is weighted by tokens across processes."""
    tests = str(Path(__file__).resolve().parents[1] / "unit" / "train")
    (tmp_path / "driver.py").write_text(MASKED_DRIVER.format(tests=tests))
    (tmp_path / "a.txt").write_text("".join(f"line {i}: the cat sat on mat {i % 13}\n" for i in range(800)))
    (tmp_path / "recipe.yaml").write_text(
        "name: one\ndata: {sources: [a.txt], prepared_dir: prepared}\ntokenizer: {kind: char, vocab_size: 64}\n"
        "model: {n_layers: 2, n_heads: 2, dim: 32, max_seq_len: 32}\n"
        "train: {block_size: 16, eval_batches: 3, lr: 0.003, max_steps: 3, log_every: 1, eval_every: 3, "
        "threads: 1, warmup_steps: 1, grad_accum: 2}\n")
    prepared = subprocess.run([sys.executable, "-m", "fledge", "prepare", "recipe.yaml"], cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    one = subprocess.run([sys.executable, "driver.py", "recipe.yaml", "one", "train.batch_size=4"], cwd=tmp_path,
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "driver.py", "recipe.yaml", "two", "train.batch_size=2", "train.eval_batches=6",
                          "name=two"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    grads_one = torch.load(tmp_path / "grads-one-0.pt")
    for rank in (0, 1):
        grads_two = torch.load(tmp_path / f"grads-two-{rank}.pt")
        assert len(grads_one) == len(grads_two)
        for a, b in zip(grads_one, grads_two):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    a, b = losses(tmp_path / "runs" / "one"), losses(tmp_path / "runs" / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), step
    # The same 12 validation windows (eval_batches x batch_size), 6 on each of the two processes.
    va, vb = val_losses(tmp_path / "runs" / "one"), val_losses(tmp_path / "runs" / "two")
    assert len(va) == len(vb) == 1 and va == pytest.approx(vb, rel=1e-5)
    sa, sb = (json.loads((tmp_path / f"runs/{name}/checkpoints/step-000003/state.json").read_text())
              for name in ("one", "two"))
    assert sa["first_val_loss"] == pytest.approx(sb["first_val_loss"], rel=1e-5)       # step 0, before training
    wa = load_file(str(tmp_path / "runs/one/checkpoints/step-000003/model.safetensors"))
    wb = load_file(str(tmp_path / "runs/two/checkpoints/step-000003/model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)
