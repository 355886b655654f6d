"""Two CPU processes under torchrun (gloo) train exactly like one process with the same global
batch: the same losses step by step and the same final weights; only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
