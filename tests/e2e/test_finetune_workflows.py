"""The reference fine-tuning workflows of recipes/, shortened, through the real CLI: a small
persona base pretrained once (recipes/persona-base.yaml, a narrower model for fewer steps), then
each recipe of recipes/finetune/ run as written except for its length. Each finishes, records a
validation loss that falls, and leaves a checkpoint with the contract's files; the persona chat
model's saved chat template renders "Q: ...\\nA:". A LoRA run killed with SIGKILL resumes onto
the uninterrupted run bit for bit (adapters, optimizer, losses, validation losses), and two
processes under torchrun fine-tune like one with the same global batch.

The runs happen in a working folder beside a link to ../shared/data, so the recipes' paths
(`../shared/data/...`, `runs/persona-base`) hold as they are written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, shared_data

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
RECIPES = REPO / "recipes"
COMMON = {"recipe.yaml", "state.json", "optimizer.pt", "rng.pt", "integrity.json", "config.json", "tokenizer.json",
          "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
          "tokenizer.model"}     # the base's SentencePiece file travels beside the transformers tokenizer.json
ADAPTERS = {"adapter_model.safetensors", "adapter_config.json"}
BASE = ["--set", "train.max_steps=30", "--set", "model.dim=64", "--set", "model.n_heads=2", "--set", "model.n_layers=2",
        "--set", "tokenizer.vocab_size=1024", "--set", "train.grad_accum=1", "--set", "train.lr=3e-3",
        "--set", "train.warmup_steps=5", "--set", "train.eval_every=15", "--set", "train.eval_batches=4"]
SHORT = ["--set", "train.epochs=0", "--set", "train.threads=1"]
WORKFLOWS = {   # recipe -> (method, overrides that shorten it)
    "persona-chat": ("full", ["--set", "train.max_steps=20", "--set", "train.eval_every=10",
                              # the short base's 1,024-token vocabulary makes two rows longer than 512 tokens
                              "--set", "finetune.on_too_long=truncate"]),
    "limn-lora": ("lora", ["--set", "train.max_steps=20", "--set", "train.eval_every=10", "--set", "train.lr=1e-3"]),
    "cypher-mixed": ("lora", ["--set", "train.max_steps=20", "--set", "train.eval_every=10"]),
    "dot-qlora": ("qlora", ["--set", "train.max_steps=4", "--set", "train.warmup_steps=1", "--set",
                            "train.eval_every=2", "--set", "train.batch_size=2", "--set", "train.grad_accum=1",
                            "--set", "train.lr=1e-3"]),
}


def fledge(work: Path, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fledge", *map(str, args)], cwd=work, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A working folder holding runs/persona-base, with ../shared the real shared folder."""
    shared = shared_data("arianna").parent.parent
    root = tmp_path_factory.mktemp("workflows")
    (root / "shared").symlink_to(shared, target_is_directory=True)
    folder = root / "work"
    folder.mkdir()
    done = fledge(folder, "train", RECIPES / "persona-base.yaml", "--quiet", *BASE, "--set", "train.threads=1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return folder


def state_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "state.json").read_text())


def checkpoint_of(run: Path, step: int | None = None) -> Path:
    if step is not None:
        return run / "checkpoints" / f"step-{step:06d}"
    return max((run / "checkpoints").glob("step-*"))


@pytest.mark.slow
@pytest.mark.parametrize("name", WORKFLOWS)
def test_each_reference_workflow_runs_shortened(work, name):
    method, overrides = WORKFLOWS[name]
    done = fledge(work, "train", RECIPES / "finetune" / f"{name}.yaml", "--quiet", *SHORT, *overrides)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"{method} fine-tune of runs/persona-base (fledge)" in done.stdout and "summary:" in done.stdout
    folder = checkpoint_of(work / "runs" / name)
    state = state_of(folder)
    assert state["val_loss"] < state["first_val_loss"], (state["first_val_loss"], state["val_loss"])
    names = {p.name for p in folder.iterdir()}
    assert COMMON <= names, COMMON - names
    if method == "full":
        assert "model.safetensors" in names and not names & ADAPTERS
    else:
        assert ADAPTERS <= names and "model.safetensors" not in names and state["base_sha256"]
    if name == "persona-chat":
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(folder)
        text = tok.apply_chat_template([{"role": "user", "content": "What is resonance?"}], tokenize=False,
                                       add_generation_prompt=True)
        assert text.endswith("Q: What is resonance?\nA:"), text
        samples = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [row for row in samples if "samples" in row]


def losses_and_evaluations(run: Path) -> dict:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key in ("loss", "lr", "val_loss"):
            if key in row:
                out[row["step"], key] = row[key]
    return out


@pytest.mark.slow
def test_a_lora_run_killed_with_sigkill_resumes_onto_the_uninterrupted_run(work):
    recipe = RECIPES / "finetune" / "limn-lora.yaml"
    short = [*SHORT, "--set", "train.max_steps=12", "--set", "train.eval_every=4", "--set", "train.checkpoint_every=4",
             "--set", "train.log_every=1", "--set", "train.keep_last=5", "--set", "train.lr=1e-3",
             "--set", "train.warmup_steps=2"]
    whole = fledge(work, "train", recipe, "--quiet", *short, "--set", "name=limn-whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = work / "runs" / "limn-cut"
    with open(work / "cut.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fledge", "train", str(recipe), "--quiet", *short,
                                 "--set", "name=limn-cut"], cwd=work, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not (run / "checkpoints" / "step-000004").is_dir() or not _logged(run, 6):
            assert proc.poll() is None, (work / "cut.log").read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    resumed = fledge(work, "train", recipe, "--quiet", *short, "--set", "name=limn-cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step" in resumed.stdout
    assert losses_and_evaluations(run) == losses_and_evaluations(work / "runs" / "limn-whole")
    a, b = checkpoint_of(run, 12), checkpoint_of(work / "runs" / "limn-whole", 12)
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for name in ("optimizer.pt", "rng.pt"):
        flat_a = torch.utils._pytree.tree_flatten(torch.load(a / name, weights_only=True))[0]
        flat_b = torch.utils._pytree.tree_flatten(torch.load(b / name, weights_only=True))[0]
        assert len(flat_a) == len(flat_b)
        assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(flat_a, flat_b))


def _logged(run: Path, step: int) -> bool:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return False
    for line in lines:
        try:
            if json.loads(line).get("step", 0) >= step:
                return True
        except ValueError:          # the line being written
            pass
    return False


@pytest.mark.slow
def test_two_processes_fine_tune_like_one_with_the_same_global_batch(work):
    """torchrun: every process loads the base and builds the same rows; LoRA with added tokens."""
    recipe = RECIPES / "finetune" / "cypher-mixed.yaml"
    short = [*SHORT, "--set", "train.max_steps=4", "--set", "train.eval_every=4", "--set", "train.log_every=1",
             "--set", "train.warmup_steps=1"]
    one = fledge(work, "train", recipe, "--quiet", *short, "--set", "train.batch_size=8", "--set", "name=cypher-one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "fledge", "train", str(recipe), "--quiet", *short, "--set", "train.batch_size=4",
                          "--set", "name=cypher-two"], cwd=work, env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run runs/cypher-two") == 1 and two.stdout.count("tokens per training row") == 1
    a, b = losses_and_evaluations(work / "runs" / "cypher-one"), losses_and_evaluations(work / "runs" / "cypher-two")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    wa = load_file(str(checkpoint_of(work / "runs" / "cypher-one", 4) / "adapter_model.safetensors"))
    wb = load_file(str(checkpoint_of(work / "runs" / "cypher-two", 4) / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)
