"""LoRA fine-tuning speed: fledge against transformers' Trainer + peft, same base, rows, template and settings.

    python bench/lora_speed.py                                   # trains a small base first (bench/out/)
    python bench/lora_speed.py --base runs/persona-base --rows ../shared/data/limn/limn_train_first3000.jsonl

Both sides start from the same fledge checkpoint (a fledge llama checkpoint folder is a
transformers llama folder, so the Trainer loads it as `LlamaForCausalLM`), put LoRA adapters
(same r, alpha, dropout 0) on the same seven projections, train one epoch over the same
rendered rows (fledge's template rendering, answers only trained) with the same batch size,
learning rate, warmup, cosine decay, weight decay and clipping, in fp32 on the CPU. fledge
packs rows into block_size sequences (attention kept within each row); the Trainer uses
`DataCollatorForSeq2Seq`, its usual padding collator for rows with labels, which pads each
batch to its longest row. The score is trained tokens per second (answer tokens, the ones
with a loss), over the wall time of the whole training call; the validation loss of both is
the token-weighted mean over the same held-out rows. Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch starts OpenMP: no spin-waiting against neighbours

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "lora_speed"
ROWS = REPO.parent / "shared" / "data" / "limn" / "limn_train_first3000.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fledge(*args: str) -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run([sys.executable, "-m", "fledge", *args], check=True, env=env, cwd=REPO)


def train_base(steps: int, overrides: list[str]) -> Path:
    """recipes/persona-base.yaml trained `steps` steps (with `overrides`, e.g. model.dim=512), once."""
    run = OUT / ("base" if not overrides else "base-" + "-".join(o.split(".")[-1].replace("=", "") for o in overrides))
    if not (run / "checkpoints").is_dir():
        extra = [flag for o in overrides for flag in ("--set", o)]
        fledge("train", "recipes/persona-base.yaml", "--quiet", "--set", f"run_dir={run}",
               "--set", f"train.max_steps={steps}", "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0",
               *extra)
    return run


def recipe_dict(base: Path, rows: Path, args, batch_size: int) -> dict:
    return {
        "name": "lora-bench", "run_dir": str(OUT / "fledge-lora"),
        "model": {"base": str(base)},
        "data": {"rows": [{"path": str(rows), "input_field": args.input_field, "output_field": args.output_field}],
                 "val_fraction": 0.1, "on_bad_row": "skip"},
        "template": {"name": "plain"},
        "finetune": {"method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                     "lora_targets": TARGETS, "max_length": args.max_length, "on_too_long": "drop"},
        "train": {"epochs": 1, "batch_size": batch_size, "block_size": args.block_size, "lr": 2e-4,
                  "min_lr": 2e-5, "warmup_steps": 10, "weight_decay": 0.0, "grad_clip": 1.0, "precision": args.precision,
                  "eval_every": 0, "checkpoint_every": 0, "log_every": 10, "seed": 1},
        "sample": {"prompts": []},
    }


def run_fledge(recipe) -> dict:
    """Train with fledge in this process; returns trained tokens, seconds and the final val loss."""
    import shutil

    from fledge.train import train
    shutil.rmtree(recipe.run_path, ignore_errors=True)
    start = time.perf_counter()
    result = train(recipe, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "val_loss": result.final_val_loss, "steps": result.step}


def hf_rows(rows) -> list[dict]:
    """fledge's rendered rows as the Trainer takes them: labels unshifted (transformers shifts them)."""
    out = []
    for row in rows:
        labels = [-100] + [int(x) for x in row.labels[:-1]]   # fledge's label t is token t+1; transformers' is token t
        out.append({"input_ids": [int(x) for x in row.ids], "labels": labels, "attention_mask": [1] * len(row.ids)})
    return out


def run_trainer(base_checkpoint: Path, train_rows, val_rows, tokenizer, args) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, LlamaForCausalLM, Trainer, TrainingArguments
    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(base_checkpoint)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    data = hf_rows(train_rows)
    training = TrainingArguments(
        output_dir=str(OUT / "hf-trainer"), per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=1,
        bf16=args.precision == "bf16")           # autocast to bfloat16, as fledge's precision: bf16
    trainer = Trainer(model=model, args=training, train_dataset=data,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):   # as fledge evaluates
        val_loss = token_weighted_loss(model, val_rows)
    return {"seconds": seconds, "val_loss": val_loss}


@torch.no_grad()
def token_weighted_loss(model, rows) -> float:
    model.eval()
    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([row.ids])
        logits = model(input_ids=ids).logits[0]
        labels = torch.tensor(row.labels)                   # shifted: label t is token t+1
        total += F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="", help="a fledge run folder to start from (default: train one)")
    parser.add_argument("--base-steps", type=int, default=300, help="steps of the base trained when --base is not given")
    parser.add_argument("--base-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for that base, e.g. model.dim=512 (repeatable)")
    parser.add_argument("--rows", default=str(ROWS))
    parser.add_argument("--input-field", default="", help="the rows' prompt field when not detected (DOT: input_code)")
    parser.add_argument("--output-field", default="", help="the rows' answer field when not detected (DOT: output_dot)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (fledge: packed sequences holding "
                                                                 "about as many rows)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="both sides: float32, or bfloat16 autocast (fast only on CPUs with native bf16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)

    from fledge.model.bases import load_base
    from fledge.recipe import load_recipe
    from fledge.sample import resolve_checkpoint
    from fledge.templates import get_template, set_pad_token
    from fledge.train.rows import build_row_batches

    base = Path(args.base) if args.base else train_base(args.base_steps, args.base_set)
    checkpoint = resolve_checkpoint(base)
    recipe = load_recipe(base=recipe_dict(checkpoint, Path(args.rows), args, args.batch_size))
    loaded, resolved = load_base(recipe, "cpu")
    tokenizer = loaded.tokenizer
    set_pad_token(tokenizer)
    batches = build_row_batches(resolved, tokenizer, get_template("plain", tokenizer), say=lambda *a: None)
    trained = sum(sum(1 for x in row.labels if x != -100) for row in batches.train_rows)
    # The same rows per optimizer step on both sides (so the same number of updates per epoch): a packed
    # sequence holds several rows, so fledge takes fewer sequences per step than the Trainer takes rows.
    rows_per_sequence = batches.n_train_rows / batches.steps_per_epoch(1, 1, 1)
    fledge_batch = max(1, round(args.batch_size / rows_per_sequence))
    recipe = load_recipe(base=recipe_dict(checkpoint, Path(args.rows), args, fledge_batch))

    ours = run_fledge(recipe)
    theirs = run_trainer(checkpoint, batches.train_rows, batches.val_rows, tokenizer, args)
    from fledge.env import collect_env
    env = collect_env(measure=False)
    report = {
        "cpu": {k: v for k, v in env.items() if "cpu" in k.lower() or "bf16" in k.lower() or k == "torch"},
        "rows": args.rows, "train_rows": len(batches.train_rows), "val_rows": len(batches.val_rows),
        "trained_tokens_per_epoch": trained, "threads": args.threads, "precision": args.precision,
        "rows_per_step": {"fledge": round(fledge_batch * rows_per_sequence, 1), "trainer": args.batch_size},
        "fledge_sequences_per_step": fledge_batch, "block_size": args.block_size,
        "fledge": {**ours, "trained_tokens_per_s": trained / ours["seconds"]},
        "trainer": {**theirs, "trained_tokens_per_s": trained / theirs["seconds"]},
    }
    report["speedup"] = report["fledge"]["trained_tokens_per_s"] / report["trainer"]["trained_tokens_per_s"]
    print(json.dumps(report, indent=2, default=str))
    (OUT / f"result-{args.precision}.json").write_text(json.dumps(report, indent=2, default=str))
    if not math.isfinite(report["fledge"]["val_loss"] or math.nan):
        print("fledge's val loss is missing: was the validation split empty?")


if __name__ == "__main__":
    main()
