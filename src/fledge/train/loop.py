"""One training loop for every mode.

    from fledge.recipe import load_recipe
    from fledge.train import train
    result = train(load_recipe("recipes/shakespeare-char.yaml"), resume=False)

`fledge train RECIPE [--resume]` calls this. It prepares the corpus if needed (reusing
shards and tokenizer when nothing changed), builds the model from the registry, and runs
AdamW with warmup + cosine decay and gradient accumulation, evaluating on fixed
validation windows, sampling fixed prompts, and checkpointing atomically. Ctrl-C saves a
checkpoint and returns. Under `torchrun` it runs data-parallel: each process takes its
slice of every global batch, only rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fledge.env import matmul_peak, pick_precision, set_threads
from fledge.errors import CheckpointError
from fledge.evaluate.loss import evaluate_loss
from fledge.recipe import Recipe
from fledge.train import checkpoint as ckpt
from fledge.train.data import TokenStream, eval_starts, global_batch_starts, micro_batch, rank_slice
from fledge.train.distributed import Distributed
from fledge.train.report import Reporter
from fledge.train.schedule import learning_rate


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_val_loss: float | None
    best_val_loss: float | None
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    interrupted: bool = False
    first_val_loss: float | None = None


@dataclass
class Setup:
    """Everything built before the first step."""
    model: torch.nn.Module          # what forward runs (maybe compiled, maybe DDP-wrapped)
    raw_model: torch.nn.Module      # the module itself, for saving and sampling
    optimizer: torch.optim.Optimizer
    tokenizer: object
    tokenizer_file: Path
    train_stream: TokenStream
    val_stream: TokenStream
    state: dict


def train(recipe: Recipe, resume: bool = False, progress: bool = True) -> TrainResult:
    dist = Distributed.from_environment(recipe.train.device)
    try:
        result = _train(recipe, resume, progress, dist)
    except BaseException:
        dist.close(clean=False)
        raise
    dist.close()
    return result


def _train(recipe: Recipe, resume: bool, progress: bool, dist: Distributed) -> TrainResult:
    t = recipe.train
    run_dir = recipe.run_path
    torch.manual_seed(t.seed)
    threads = set_threads(t.threads, dist.local_world) if dist.device.type == "cpu" else None
    precision = pick_precision(t.precision, dist.device)
    start_from = dist.run_on_main(_choose_start, run_dir, resume, recipe)
    dist.run_on_main(_prepare_data, recipe, progress)
    s = _build(recipe, dist, start_from, precision)
    step = s.state["step"]
    if dist.is_main:
        recipe.save(run_dir / "recipe.yaml")
    report = Reporter(run_dir, t.max_steps, step, dist.is_main, progress, t.tensorboard)
    _announce(s, recipe, dist, precision, threads, report)
    peak = _peak_flops(precision, dist) if dist.is_main and hasattr(s.raw_model, "flops_per_token") else None
    train_windows = t.batch_size * t.grad_accum * dist.world
    tokens_per_step = train_windows * t.block_size
    val_windows = eval_starts(s.val_stream, t.block_size, t.eval_batches * t.batch_size)
    scaler = torch.amp.GradScaler(dist.device.type) if precision.needs_scaler else None
    last_saved = step if start_from else None
    interrupted = False
    if step == 0 and s.state.get("first_val_loss") is None:
        s.state["first_val_loss"] = _evaluate(s, recipe, val_windows, precision, dist, report, 0, sample=False)
    window_seconds, window_steps = 0.0, 0      # time spent in training steps since the last log line
    started = time.perf_counter() - s.state.get("elapsed_s", 0.0)
    try:
        while step < t.max_steps:
            lr = learning_rate(step, t)
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            step_start = time.perf_counter()
            starts = global_batch_starts(step, t.seed, train_windows, s.train_stream.n_tokens, t.block_size)
            loss = _train_step(s, recipe, starts, precision, dist, scaler)
            window_seconds += time.perf_counter() - step_start
            step += 1
            window_steps += 1
            s.state["step"] = step
            if step % t.log_every == 0 or step == t.max_steps:
                per_step = window_seconds / window_steps
                tokens_per_s = tokens_per_step / per_step
                mfu = s.raw_model.flops_per_token(t.block_size) * tokens_per_s / (peak * dist.world) if peak else None
                report.step(step, dist.mean(loss), lr, tokens_per_s, mfu, time.perf_counter() - started,
                            per_step * (t.max_steps - step))
                window_seconds, window_steps = 0.0, 0
            if _evaluate_and_checkpoint(s, recipe, step, val_windows, precision, dist, report, started):
                last_saved = step
    except KeyboardInterrupt:
        interrupted = True
        if last_saved != step:
            s.state["elapsed_s"] = time.perf_counter() - started
            _save(s, recipe, step, dist)
        report.say(f"\ninterrupted at step {step}: checkpoint saved. Continue with: fledge train RECIPE --resume")
    finally:
        report.close()
    result = TrainResult(run_dir, step, s.state.get("val_loss"), s.state.get("best_val_loss"),
                         ckpt.best_checkpoint(run_dir), ckpt.latest_checkpoint(run_dir), interrupted,
                         s.state.get("first_val_loss"))
    if not interrupted:
        _say_whether_it_learned(result, report)
    return result


def _announce(s: Setup, recipe: Recipe, dist: Distributed, precision, threads: int | None, report) -> None:
    model = s.raw_model
    n_params = model.num_parameters() if hasattr(model, "num_parameters") else \
        sum(p.numel() for p in model.parameters())
    step = s.state["step"]
    report.say(f"run {recipe.run_path} | {n_params / 1e6:.2f}M parameters | {s.train_stream.n_tokens:,} train "
               f"tokens | device {dist.device} x{dist.world} | {precision.name}"
               + (f" | {threads} threads" if threads else "")
               + (f" | resuming at step {step}" if step else ""))


def _evaluate_and_checkpoint(s: Setup, recipe: Recipe, step: int, val_windows, precision, dist: Distributed,
                             report: Reporter, started: float) -> bool:
    """Evaluate when due; save when due or when validation improved. Returns whether it saved."""
    t = recipe.train
    improved = False
    if (t.eval_every and step % t.eval_every == 0) or step == t.max_steps:
        val = _evaluate(s, recipe, val_windows, precision, dist, report, step)
        s.state["val_loss"] = val
        improved = s.state.get("best_val_loss") is None or val < s.state["best_val_loss"]
        if improved:
            s.state.update(best_val_loss=val, best_step=step)
        report.evaluation(step, val, improved, time.perf_counter() - started)
    if improved or (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.max_steps:
        s.state["elapsed_s"] = time.perf_counter() - started
        _save(s, recipe, step, dist)
        return True
    return False


def _train_step(s: Setup, recipe: Recipe, starts, precision, dist: Distributed, scaler) -> torch.Tensor:
    t = recipe.train
    total = torch.zeros((), device=dist.device)
    for micro in range(t.grad_accum):
        x, y = micro_batch(s.train_stream, rank_slice(starts, micro, dist.rank, dist.world, t.batch_size),
                           t.block_size, dist.device)
        sync = micro == t.grad_accum - 1
        with (contextlib.nullcontext() if sync or dist.world == 1 else s.model.no_sync()):
            with precision.autocast(dist.device):
                _, loss = s.model(x, y)
            scaled = loss / t.grad_accum
            (scaler.scale(scaled) if scaler else scaled).backward()
        total += loss.detach()
    if scaler:
        scaler.unscale_(s.optimizer)
    if t.grad_clip:
        torch.nn.utils.clip_grad_norm_(s.raw_model.parameters(), t.grad_clip)
    if scaler:
        scaler.step(s.optimizer)
        scaler.update()
    else:
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return total / t.grad_accum


def _evaluate(s: Setup, recipe: Recipe, windows, precision, dist, report, step: int, sample: bool = True) -> float:
    t = recipe.train
    val = evaluate_loss(s.raw_model, s.val_stream, windows, t.block_size, t.batch_size, dist.device, precision,
                        dist.rank, dist.world)
    if sample and dist.is_main and hasattr(s.raw_model, "generate") and recipe.sample.prompts:
        from fledge.sample import generate_text
        texts = [generate_text(s.raw_model, s.tokenizer, p, recipe.sample, seed=t.seed + i, device=dist.device,
                               precision=precision)[0] for i, p in enumerate(recipe.sample.prompts)]
        report.samples(step, recipe.sample.prompts, texts)
    return val


def _save(s: Setup, recipe: Recipe, step: int, dist: Distributed) -> None:
    if dist.is_main:
        from fledge.model.gpt import GPT, to_hf_config
        hf = to_hf_config(s.raw_model.config) if isinstance(s.raw_model, GPT) else None
        ckpt.save_checkpoint(recipe.run_path, step, s.raw_model, s.optimizer, s.state, recipe.to_yaml(),
                             s.tokenizer_file, hf, recipe.train.keep_last)
    dist.barrier()


def _choose_start(run_dir: Path, resume: bool, recipe: Recipe) -> str | None:
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        if resume:
            print(f"note: {run_dir} has no checkpoint to resume from; starting at step 0")
        return None
    if not resume:
        raise CheckpointError(
            f"{run_dir} already holds checkpoints (latest {latest.name}). Continue that run with "
            f"`fledge train RECIPE --resume`, or start a new one with --set name=<new name>.")
    check_resumable(latest, recipe)
    return str(latest)


def check_resumable(checkpoint: Path, recipe: Recipe) -> list[str]:
    """Raise if the checkpoint's model or tokenizer differ from the recipe; return notes on other changes."""
    from fledge.recipe import load_recipe
    saved = load_recipe(checkpoint / "recipe.yaml").to_dict()
    now = recipe.to_dict()
    fatal, notes = [], []
    for section in ("model", "tokenizer", "data", "train"):
        for key in now[section]:
            a, b = saved[section].get(key), now[section][key]
            if a != b:
                item = f"{section}.{key}: checkpoint {a!r}, recipe {b!r}"
                (fatal if section in ("model", "tokenizer") else notes).append(item)
    if fatal:
        raise CheckpointError(f"{checkpoint} comes from another recipe: " + "; ".join(fatal) +
                              ". Resume with the recipe saved in the checkpoint, or start a new run "
                              "(--set name=<new name>).")
    for note in notes:
        print(f"note: {note} (the recipe's value wins)")
    return notes


def _prepare_data(recipe: Recipe, progress: bool) -> None:
    from fledge.prepare import prepare
    prepare(recipe, progress=progress)


def _build(recipe: Recipe, dist: Distributed, start_from: str | None, precision) -> Setup:
    from fledge.model.registry import build_model
    from fledge.prepare import load_manifest
    from fledge.tokenizer import find_tokenizer_file, load_tokenizer
    t = recipe.train
    manifest = load_manifest(recipe.prepared_path)
    tokenizer_file = find_tokenizer_file(recipe.prepared_path)
    tokenizer = load_tokenizer(tokenizer_file)
    train_stream = TokenStream(recipe.prepared_path, "train")
    val_stream = TokenStream(recipe.prepared_path, "val")
    train_stream.require(t.block_size, "training window")
    val_stream.require(t.block_size, "validation window")
    vocab = manifest["tokenizer"]["vocab_size"]
    raw_model = build_model(recipe.model, vocab, tokenizer.bos_id, tokenizer.eos_id).to(dist.device)
    optimizer = make_optimizer(raw_model, t, dist.device)
    state = {"step": 0, "best_val_loss": None, "best_step": None, "val_loss": None, "vocab_size": vocab,
             "tokenizer_sha256": manifest["tokenizer"]["sha256"]}
    if start_from:
        ckpt.load_weights(raw_model, Path(start_from))
        state = ckpt.load_training_state(Path(start_from), optimizer)
        if state.get("tokenizer_sha256") not in (None, manifest["tokenizer"]["sha256"]):
            raise CheckpointError(f"{start_from} was trained with another tokenizer than the one in "
                                  f"{recipe.prepared_path}. Resume with the original prepared data.")
    model = raw_model
    if t.compile:
        model = torch.compile(model)
    if dist.world > 1:
        model = dist.wrap(model)
    return Setup(model, raw_model, optimizer, tokenizer, tokenizer_file, train_stream, val_stream, state)


def make_optimizer(model: torch.nn.Module, t, device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not norms, biases or 1-d parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": other, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def _peak_flops(precision, dist: Distributed) -> float | None:
    dtype = precision.autocast_dtype or torch.float32
    try:
        return matmul_peak(dtype, str(dist.device))
    except RuntimeError:
        return None


def _say_whether_it_learned(r: TrainResult, report: Reporter) -> None:
    if r.first_val_loss is None or r.final_val_loss is None:
        return
    if not math.isfinite(r.final_val_loss):
        report.say(f"[bold red]the run diverged[/]: val loss is {r.final_val_loss}. Lower train.lr.")
    elif r.final_val_loss > r.first_val_loss - 0.01:
        report.say(f"[bold red]the model did not learn[/]: val loss {r.first_val_loss:.4f} at step 0, "
                   f"{r.final_val_loss:.4f} now. Check train.lr, train.max_steps and the data.")
    else:
        report.say(f"val loss {r.first_val_loss:.4f} -> {r.final_val_loss:.4f} "
                   f"(best {r.best_val_loss:.4f}); checkpoints in {r.run_dir / 'checkpoints'}")


__all__ = ["train", "TrainResult", "check_resumable", "make_optimizer"]
