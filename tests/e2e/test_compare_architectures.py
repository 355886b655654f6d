"""User 2's comparison through the real CLI, shortened: the recurrent model of
recipes/compare/gutenberg-recurrent.yaml (examples/recurrent.py, model.arch
examples.recurrent:build) and the transformer of the same size in
recipes/compare/gutenberg-transformer.yaml, each trained for 20 steps on the Gutenberg books, then
`fledge eval RUN --data ROWS --baseline OTHER --no-generate --allow-code` on held-out paragraphs
of the val book, which prints loss, perplexity and bits per byte of both with intervals.

fledge runs in the repository root, as the recipes say: that is where `examples` imports from;
the runs go to tmp_path through run_dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, shared_data

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
SHORT = ["--set", "train.max_steps=20", "--set", "train.batch_size=8", "--set", "train.block_size=64",
         "--set", "train.warmup_steps=5", "--set", "train.eval_every=0", "--set", "train.eval_batches=2",
         "--set", "train.checkpoint_every=0", "--set", "train.log_every=10", "--set", "train.threads=1",
         "--set", "sample.max_new_tokens=8"]
ROWS = 40            # held-out paragraphs scored by each model


def fledge(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fledge", *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_recurrent_and_transformer_trained_and_compared_on_held_out_text(tmp_path):
    shared_data("gutenberg")
    runs = {}
    for name in ("gutenberg-recurrent", "gutenberg-transformer"):
        runs[name] = tmp_path / name
        done = fledge("train", REPO / "recipes" / "compare" / f"{name}.yaml", "--quiet", *SHORT,
                      "--set", f"run_dir={runs[name]}")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert any((runs[name] / "checkpoints").glob("step-000020")), done.stdout[-2000:]
    saved = (runs["gutenberg-recurrent"] / "recipe.yaml").read_text()
    assert "examples.recurrent:build" in saved

    sys.path.insert(0, str(REPO))
    try:
        from examples.heldout import heldout_paragraphs
    finally:
        sys.path.remove(str(REPO))
    paragraphs = heldout_paragraphs(runs["gutenberg-transformer"])
    assert len(paragraphs) > ROWS
    rows = tmp_path / "heldout.jsonl"
    rows.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:ROWS]), encoding="utf-8")

    args = ["eval", runs["gutenberg-recurrent"], "--data", rows, "--baseline", runs["gutenberg-transformer"],
            "--no-generate"]
    refused = fledge(*args)               # the checkpoint names code: eval imports it only when allowed
    assert refused.returncode == 2 and "--allow-code" in refused.stderr, refused.stderr
    compared = fledge(*args, "--allow-code")
    assert compared.returncode == 0, compared.stdout[-2000:] + compared.stderr[-3000:]
    out = compared.stdout
    metric_row, difference_row = [line for line in out.splitlines() if line.startswith("bits per byte")]
    assert metric_row.count(" bytes ") == 2 and metric_row.count("[") == 2, out      # both models, with intervals
    assert difference_row.count("[") == 1, out                                     # the difference, with its own
    assert "difference on bits per byte" in out or "better on bits per byte" in out, out
    assert [line for line in out.splitlines() if line.startswith("perplexity")], out
    summary = json.loads((runs["gutenberg-recurrent"] / "eval" / "heldout" / "summary.json").read_text())
    for metrics in (summary["metrics"], summary["baseline_metrics"]):
        assert 0 < metrics["bpb"]["value"] < 20 and metrics["bpb"]["lo"] <= metrics["bpb"]["value"] <= metrics["bpb"]["hi"]
        assert metrics["ppl"]["value"] > 1
    # Same tokenizer settings on the same books give the same tokenizer, so per-token loss compares too.
    assert {c["metric"] for c in summary["comparisons"]} >= {"loss", "ppl", "bpb"}
