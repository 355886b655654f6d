"""One training loop for every mode.

    from fledge.recipe import load_recipe
    from fledge.train import train
    result = train(load_recipe("recipes/shakespeare-char.yaml"), resume=False)

`fledge train RECIPE [--resume]` calls this. It prepares the corpus if needed (reusing
shards and tokenizer when nothing changed), builds the model from the registry, and runs
AdamW with warmup + cosine decay and gradient accumulation, evaluating on fixed
validation windows, sampling fixed prompts, and checkpointing atomically. Under `torchrun`
it runs data-parallel: each process takes its slice of every global batch, only rank 0
logs and writes.

A step is one unit: it is applied, counted, logged, evaluated and saved together. Ctrl-C
asks the loop to stop after the step in flight, which then saves a checkpoint and returns
(a second Ctrl-C stops at once and loses that step). A NaN or infinite loss, gradient norm
or validation loss stops the run with `TrainingDiverged` before that update is applied or
anything is saved. Resuming restores weights, optimizer and RNG states last, and nothing
after that draws from the global RNG, so a resumed run repeats the uninterrupted one bit
for bit, dropout included.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fledge.env import matmul_peak, pick_precision, set_threads
from fledge.errors import CheckpointError, FledgeError
from fledge.evaluate.loss import evaluate_loss
from fledge.recipe import Recipe
from fledge.train import checkpoint as ckpt
from fledge.train.data import TokenStream, eval_starts, global_batch_starts, micro_batch, rank_slice
from fledge.train.distributed import Distributed
from fledge.train.report import Reporter
from fledge.train.schedule import learning_rate


class TrainingDiverged(FledgeError):
    """The loss, the gradient norm or the validation loss became NaN or infinite."""


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
    notes: list[str] = field(default_factory=list)    # said once the run's first line is out


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
    s = _build(recipe, dist)
    peak = _peak_flops(s, precision, dist) if dist.is_main else None
    if start_from:
        _restore(s, Path(start_from))      # RNG states included: nothing below draws from the global RNG
    _wrap(s, t, dist)
    if dist.is_main:
        recipe.save(run_dir / "recipe.yaml")
    report = Reporter(run_dir, t.max_steps, s.state["step"], dist.is_main, progress, t.tensorboard)
    try:
        _announce(s, recipe, dist, precision, threads, report)
        step, interrupted = _run(s, recipe, precision, dist, report, peak, resumed=bool(start_from))
    finally:
        report.close()
    result = TrainResult(run_dir, step, s.state.get("val_loss"), s.state.get("best_val_loss"),
                         ckpt.best_checkpoint(run_dir, verify=False), ckpt.latest_checkpoint(run_dir, verify=False),
                         interrupted, s.state.get("first_val_loss"))
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
    for note in s.notes:
        report.say(f"note: {note}")


def _run(s: Setup, recipe: Recipe, precision, dist: Distributed, report: Reporter, peak: float | None,
         resumed: bool) -> tuple[int, bool]:
    """Steps from the state's step to train.max_steps. Returns (the step reached, whether interrupted)."""
    t = recipe.train
    step = s.state["step"]
    train_windows = t.batch_size * t.grad_accum * dist.world
    tokens_per_step = train_windows * t.block_size
    val_windows = eval_starts(s.val_stream, t.block_size, t.eval_batches * t.batch_size)
    scaler = torch.amp.GradScaler(dist.device.type) if precision.needs_scaler else None
    last_saved = step if resumed else None
    if step == 0 and s.state.get("first_val_loss") is None:
        s.state["first_val_loss"] = _evaluate(s, recipe, val_windows, precision, dist, report, 0, sample=False)
    window_seconds, window_steps = 0.0, 0      # time spent in training steps since the last log line
    started = time.perf_counter() - s.state.get("elapsed_s", 0.0)
    working = None          # the step in flight, from its first micro-batch until it is evaluated and saved
    with _StopRequests(dist) as stop:
        try:
            while step < t.max_steps:
                working = step + 1
                lr = learning_rate(step, t)
                for group in s.optimizer.param_groups:
                    group["lr"] = lr
                step_start = time.perf_counter()
                starts = global_batch_starts(step, t.seed, train_windows, s.train_stream.n_tokens, t.block_size)
                loss = _train_step(s, recipe, working, starts, precision, dist, scaler)
                window_seconds += time.perf_counter() - step_start
                step += 1
                window_steps += 1
                s.state["step"] = step
                if step % t.log_every == 0 or step == t.max_steps:
                    per_step = window_seconds / window_steps
                    tokens_per_s = tokens_per_step / per_step
                    mfu = s.raw_model.flops_per_token(t.block_size) * tokens_per_s / (peak * dist.world) \
                        if peak else None
                    report.step(step, dist.mean(loss), lr, tokens_per_s, mfu, time.perf_counter() - started,
                                per_step * (t.max_steps - step))
                    window_seconds, window_steps = 0.0, 0
                if _evaluate_and_checkpoint(s, recipe, step, val_windows, precision, dist, report, started):
                    last_saved = step
                working = None
                stop.check()        # the one place a Ctrl-C takes effect: between whole steps
        except KeyboardInterrupt:
            _stop_on_interrupt(s, recipe, step, working, last_saved, dist, report, started)
            return step, True
    return step, False


def _stop_on_interrupt(s: Setup, recipe: Recipe, step: int, working: int | None, last_saved: int | None,
                       dist: Distributed, report: Reporter, started: float) -> None:
    if working is not None:     # a second Ctrl-C (or an interrupt from elsewhere) inside a step: not saveable
        saved = f"the last checkpoint is {ckpt.checkpoint_name(last_saved)}" if last_saved is not None \
            else "nothing was saved"
        report.say(f"\ninterrupted during step {working}: that step is lost and {saved}. Continue with: "
                   f"fledge train RECIPE --resume")
        return
    if last_saved != step:
        s.state["elapsed_s"] = time.perf_counter() - started
        _save(s, recipe, step, dist)
    report.say(f"\ninterrupted at step {step}: checkpoint saved. Continue with: fledge train RECIPE --resume")


class _StopRequests:
    """Ctrl-C during the steps: the first press asks the loop to stop at the next step boundary
    (`check`), so a checkpoint named step N always holds N updates; a second press raises
    KeyboardInterrupt at once. Installed only in the main thread (the only one Python delivers
    signals to); the previous handler is put back on exit."""

    def __init__(self, dist: Distributed):
        self.dist = dist
        self.presses = 0
        self.installed = False
        self.previous = None

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self.installed:
            signal.signal(signal.SIGINT, self.previous if self.previous is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        self.presses += 1
        if self.presses > 1:
            raise KeyboardInterrupt
        if self.dist.is_main:       # os.write: the handler may run in the middle of a print
            with contextlib.suppress(OSError):
                os.write(2, b"\nstopping after this step; press Ctrl-C again to stop at once without saving it\n")

    def check(self) -> None:
        """Raise KeyboardInterrupt if any process was asked to stop (all processes stop together)."""
        requested = self.presses > 0
        if self.dist.world > 1:
            requested = self.dist.mean(torch.tensor(float(requested), device=self.dist.device)) > 0
        if requested:
            raise KeyboardInterrupt


def _evaluate_and_checkpoint(s: Setup, recipe: Recipe, step: int, val_windows, precision, dist: Distributed,
                             report: Reporter, started: float) -> bool:
    """Evaluate when due; save when due or when validation improved. Returns whether it saved."""
    t = recipe.train
    improved = False
    if (t.eval_every and step % t.eval_every == 0) or step == t.max_steps:
        val = _evaluate(s, recipe, val_windows, precision, dist, report, step)
        if not math.isfinite(val):
            raise TrainingDiverged(f"training diverged by step {step}: the validation loss is {val}, and no "
                                   f"checkpoint is saved from it. {_divergence_advice(recipe, precision)}")
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


def _train_step(s: Setup, recipe: Recipe, number: int, starts, precision, dist: Distributed,
                scaler) -> torch.Tensor:
    """Optimizer step `number` (1-based). Returns its mean loss; raises TrainingDiverged, with the
    update not applied, when the loss or the gradient norm is not finite."""
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
    loss = total / t.grad_accum
    if scaler:
        scaler.unscale_(s.optimizer)
    # The norm before clipping; max_norm=inf measures it without changing a gradient (x * 1.0).
    norm = torch.nn.utils.clip_grad_norm_(s.raw_model.parameters(), t.grad_clip or math.inf)
    # fp16's loss scaler skips steps with inf gradients by design: there only the loss counts.
    _stop_if_diverged(s, recipe, number, loss, None if scaler else norm, precision, dist)
    if scaler:
        scaler.step(s.optimizer)
        scaler.update()
    else:
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return loss


def _stop_if_diverged(s: Setup, recipe: Recipe, number: int, loss: torch.Tensor, norm: torch.Tensor | None,
                      precision, dist: Distributed) -> None:
    bad = ~torch.isfinite(loss)
    if norm is not None:
        bad = bad | ~torch.isfinite(norm)
    if dist.world > 1:          # every process stops at the same step
        diverged = dist.mean(bad.float()) > 0
    else:
        diverged = bool(bad)
    if not diverged:
        return
    s.optimizer.zero_grad(set_to_none=True)
    norm_text = f" (gradient norm {float(norm):.4g})" if norm is not None else ""
    raise TrainingDiverged(f"training diverged at step {number}: the loss is {float(loss):.4g}{norm_text}; that "
                           f"update was not applied and no checkpoint is saved from it. "
                           f"{_divergence_advice(recipe, precision)}")


def _divergence_advice(recipe: Recipe, precision) -> str:
    t = recipe.train
    tries = [f"lower train.lr (now {t.lr:g})", f"raise train.warmup_steps (now {t.warmup_steps})",
             "set train.grad_clip (now 0), e.g. to 1.0" if not t.grad_clip else
             f"lower train.grad_clip (now {t.grad_clip:g})"]
    if precision.name != "fp32":
        tries.append(f"train in fp32 (train.precision=fp32, now {precision.name})")
    return "Try: " + "; ".join(tries) + ". Then continue from the last checkpoint with --resume."


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
    """Save on the main process; every process raises its StorageError or CheckpointError."""
    dist.run_on_main(_save_on_main, s, recipe, step)


def _save_on_main(s: Setup, recipe: Recipe, step: int) -> None:
    from fledge.model.gpt import GPT, to_hf_config
    hf = to_hf_config(s.raw_model.config) if isinstance(s.raw_model, GPT) else None
    ckpt.save_checkpoint(recipe.run_path, step, s.raw_model, s.optimizer, s.state, recipe.to_yaml(),
                         s.tokenizer_file, hf, recipe.train.keep_last)


def _choose_start(run_dir: Path, resume: bool, recipe: Recipe) -> str | None:
    """The checkpoint to resume from, or None to start at step 0. Leftovers of killed saves go first."""
    removed = ckpt.remove_partial_saves(run_dir)
    if removed:
        print(f"note: removed {len(removed)} unfinished file(s) or folder(s) that an interrupted save left in "
              f"{run_dir} ({', '.join(p.name for p in removed[:3])})")
    found = ckpt.list_checkpoints(run_dir)
    if not found:
        if resume:
            print(f"note: {run_dir} has no checkpoint to resume from; starting at step 0")
        return None
    if not resume:
        raise CheckpointError(
            f"{run_dir} already holds checkpoints (latest {found[-1].name}). Continue that run with "
            f"`fledge train RECIPE --resume`, or start a new one with --set name=<new name>.")
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise CheckpointError(
            f"{run_dir}: no intact checkpoint to resume from ({len(found)} damaged, the newest {found[-1].name}: "
            f"{ckpt.checkpoint_problem(found[-1])}). Move {run_dir / 'checkpoints'} away to start again at step 0.")
    check_resumable(latest, recipe)
    return str(latest)


def check_resumable(checkpoint: Path, recipe: Recipe) -> list[str]:
    """Raise if the checkpoint's model or tokenizer differ from the recipe; return notes on other changes.

    The saved recipe may import the module its `model.arch` names only when the recipe being run
    names the same one: a different arch is reported as a model difference without running code.
    """
    from fledge.recipe import load_recipe, read_yaml_mapping
    path = Path(checkpoint) / "recipe.yaml"
    raw = read_yaml_mapping(path, "recipe", "a recipe is a mapping of sections (data:, model:, train:, ...)")
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    saved_arch = model.get("arch", "llama")
    if saved_arch == recipe.model.arch:
        saved = load_recipe(path, allow_code=True, check_machine=False).to_dict()
    else:
        saved = load_recipe(None, base={**raw, "model": {**model, "arch": "llama"}}, allow_code=False,
                            check_machine=False).to_dict()
        saved["model"]["arch"] = saved_arch
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


def _build(recipe: Recipe, dist: Distributed) -> Setup:
    """Tokenizer, token streams, model and optimizer, freshly initialised (see `_restore`)."""
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
    notes: list[str] = []
    optimizer = make_optimizer(raw_model, t, dist.device, say=notes.append)
    state = {"step": 0, "best_val_loss": None, "best_step": None, "val_loss": None, "vocab_size": vocab,
             "tokenizer_sha256": manifest["tokenizer"]["sha256"]}
    return Setup(raw_model, raw_model, optimizer, tokenizer, tokenizer_file, train_stream, val_stream, state, notes)


def _restore(s: Setup, checkpoint: Path) -> None:
    """Weights, optimizer and RNG states from a checkpoint, after everything that draws random numbers."""
    expected = s.state["tokenizer_sha256"]
    ckpt.load_weights(s.raw_model, checkpoint)
    s.state = ckpt.load_training_state(checkpoint, s.optimizer)
    if s.state.get("tokenizer_sha256") not in (None, expected):
        raise CheckpointError(f"{checkpoint} was trained with another tokenizer than the prepared data's. Resume "
                              f"with the original prepared data.")


def _wrap(s: Setup, t, dist: Distributed) -> None:
    if t.compile:
        s.model = torch.compile(s.model)
    if dist.world > 1:
        s.model = dist.wrap(s.model)


def make_optimizer(model: torch.nn.Module, t, device, say=None) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not norms, biases or 1-d parameters); fused where
    the device has it, else the standard one with `say(why)`."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)
        except (RuntimeError, TypeError) as e:
            if say:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                say(f"fused AdamW is not available here ({reason}); using the standard one (slower steps)")
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def _peak_flops(s: Setup, precision, dist: Distributed) -> float | None:
    """This device's measured matmul peak, for MFU; None with a note saying why MFU is not reported."""
    if not hasattr(s.raw_model, "flops_per_token"):
        s.notes.append("MFU is not reported: the model has no flops_per_token(seq_len) method")
        return None
    dtype = precision.autocast_dtype or torch.float32
    try:
        return matmul_peak(dtype, str(dist.device))
    except RuntimeError as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        s.notes.append(f"MFU is not reported: measuring the {dtype} matmul peak on {dist.device} failed ({reason})")
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


__all__ = ["train", "TrainResult", "TrainingDiverged", "check_resumable", "make_optimizer"]
