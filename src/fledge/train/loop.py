"""One training loop for every mode.

    from fledge.prepare import prepare
    from fledge.recipe import load_recipe
    from fledge.train import train
    recipe = load_recipe("recipes/shakespeare-char.yaml")
    prepare(recipe)                               # the corpus stage: tokenizer and token shards
    result = train(recipe, resume=False)          # or train(recipe, source=my_batch_source)

`fledge train RECIPE [--resume]` runs `prepare_data` (the corpus stage, reusing shards and
tokenizer when nothing changed) and then `train`. `train` reads the prepared folder as it
is, and without one says to run `fledge prepare RECIPE`. Batches come from a `BatchSource`
(fledge.train.batches): by default the random windows of the prepared shards
(`WindowBatches`). It builds the model from the registry and runs AdamW with warmup +
cosine decay and gradient accumulation, the loss normalised per target token
(fledge.train.steps), evaluating on fixed validation batches, sampling fixed prompts, and
checkpointing atomically. Under `torchrun` it runs data-parallel: each process takes its
slice of every global batch, only rank 0 logs and writes.

A step is one unit: it is applied, counted, logged, evaluated and saved together. Ctrl-C asks
the loop to stop after the step in flight, which then saves a checkpoint and returns (a second
Ctrl-C stops at once and loses that step). A NaN or infinite loss, gradient norm or validation
loss stops the run with `TrainingDiverged` before that update is applied or anything is saved.
Trainable parameters that did not train in the first step stop it with `LearningError`
(fledge.train.summary). With `eval.every`, the main process also answers a fixed subset of
held-out rows every eval.every steps and scores the answers (fledge.train.evalstage); the
other processes receive the scores. `train.select_by` (val_loss, or one of those metrics)
picks the best checkpoint (best.json and state.json say which), and
`train.early_stop_patience` evaluations of it in a row without improvement stop the run early;
the best checkpoint is kept. Resuming restores weights, optimizer and RNG states last, and
nothing after that draws from the global RNG, so a resumed run repeats the uninterrupted one
bit for bit, dropout included. Every run ends with a summary line: losses at start and end,
trainable share, weight change, steps, tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from fledge.env import matmul_peak, pick_precision, set_threads
from fledge.errors import CheckpointError, RecipeError
from fledge.evaluate.loss import evaluate_loss, takes_reduction
from fledge.recipe import Recipe
from fledge.train import checkpoint as ckpt
from fledge.train.batches import BatchSource
from fledge.train.checkpoint import TrainingState
from fledge.train.data import WindowBatches
from fledge.train.distributed import Distributed
from fledge.train.evalstage import (EvalStage, build_eval_stage, format_selection, generation_due,
                                    judge_selection)
from fledge.train.finetune import FineTune
from fledge.train.report import Reporter
from fledge.train.schedule import learning_rate
from fledge.train.steps import TrainingDiverged, divergence_advice, sum_over_processes, train_step
from fledge.train.summary import LearningError, WeightWatch, learning_verdict, parameter_counts, summary_text


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
    stopped_early: bool = False         # train.early_stop_patience ended the run before max_steps
    select_by: str = "val_loss"         # train.select_by: what chose best_checkpoint
    best_metric: float | None = None    # select_by a generation metric: its best value (best_checkpoint's)
    eval_metrics: dict | None = None    # the last generation evaluation's {metric: share} (eval.every)


@dataclass
class Setup:
    """Everything built before the first step."""
    model: torch.nn.Module          # what forward runs (maybe compiled, maybe DDP-wrapped)
    raw_model: torch.nn.Module      # the module itself, for saving and sampling
    optimizer: torch.optim.Optimizer
    tokenizer: object
    tokenizer_file: Path | None     # fledge's tokenizer file, copied into checkpoints (None: a transformers base's)
    source: BatchSource
    state: TrainingState
    keyword_forward: bool           # forward meets the keyword contract (reduction="sum"); else (idx, targets)
    finetune: FineTune | None = None    # the base, tokenizer and template of a run from model.base
    validates: bool = True          # the source has validation batches (rows with val_fraction 0 have none)
    rows_tokenizer: bool = False    # state.tokenizer_sha256 is of the fine-tune's tokenizer, not of prepared data
    watch: WeightWatch | None = None
    notes: list[str] = field(default_factory=list)    # said once the run's first line is out
    evals: EvalStage | None = None  # eval.every's generation evaluations (on the main process only)


def prepare_data(recipe: Recipe, progress: bool = True) -> None:
    """The corpus stage `fledge train` runs before `train`: `fledge.prepare.prepare`, which reuses
    tokenizer and shards when nothing changed. Under torchrun only the main process prepares;
    the others wait for it."""
    dist = Distributed.from_environment(recipe.train.device)
    try:
        dist.run_on_main(_prepare, recipe, progress)
    except BaseException:
        dist.close(clean=False)
        raise


def _prepare(recipe: Recipe, progress: bool) -> None:
    from fledge.prepare import prepare
    prepare(recipe, progress=progress)


def train(recipe: Recipe, resume: bool = False, progress: bool = True,
          source: BatchSource | None = None, *, allow_code: bool = False) -> TrainResult:
    """Train `recipe` on `source`, by default its `data.rows` (with model.base) or the windows of its
    prepared data (`fledge prepare`). `allow_code` lets a fledge base's saved recipe import the
    module its model.arch names."""
    dist = Distributed.from_environment(recipe.train.device)
    try:
        result = _train(recipe, resume, progress, dist, source, allow_code)
    except BaseException:
        dist.close(clean=False)
        raise
    dist.close()
    return result


def _train(recipe: Recipe, resume: bool, progress: bool, dist: Distributed, source: BatchSource | None,
           allow_code: bool) -> TrainResult:
    torch.manual_seed(recipe.train.seed)
    threads = set_threads(recipe.train.threads, dist.local_world) if dist.device.type == "cpu" else None
    precision = pick_precision(recipe.train.precision, dist.device)
    say = print if dist.is_main else _quiet
    ft = None
    if recipe.model.base:       # every process loads the base and builds the rows itself (deterministic)
        from fledge.train.finetune import check_prompts, load_finetune, row_batches
        ft, recipe = load_finetune(recipe, dist.device, allow_code=allow_code, say=say)
        check_prompts(ft, recipe)
    manifest = None
    if source is None and ft is not None and recipe.data.rows:
        source = row_batches(ft, recipe, say)
    elif source is None or ft is None:
        manifest = _load_manifest(recipe)
        if ft is not None:
            from fledge.train.finetune import check_corpus_tokenizer
            check_corpus_tokenizer(ft, recipe, manifest)
        if source is None:
            source = WindowBatches.from_prepared(recipe.prepared_path, recipe.train)
    recipe, epochs_note = _with_epochs(recipe, source, dist.world)
    t, run_dir = recipe.train, recipe.run_path
    start_from = dist.run_on_main(_choose_start, run_dir, resume, recipe)
    s = _build(recipe, dist, manifest, source, ft, start_from)
    s.notes += [epochs_note] if epochs_note else []
    peak = _peak_flops(s, precision, dist) if dist.is_main else None
    if start_from:
        _restore(s, Path(start_from))      # RNG states included: nothing below draws from the global RNG
    _start_selection(s.state, t, s.notes)
    if recipe.eval.every:
        s.notes.append(dist.run_on_main(_build_eval_stage, s, recipe, dist.device))
    _wrap(s, t, dist)
    start_step = s.state.step
    s.watch = WeightWatch(s.raw_model, first_step=start_step == 0, keep_start=dist.is_main)
    if dist.is_main:
        recipe.save(run_dir / "recipe.yaml")
        _record_environment(run_dir, dist)
    report = Reporter(run_dir, t.max_steps, start_step, dist.is_main, progress, t.tensorboard)
    try:
        _announce(s, recipe, dist, precision, threads, report)
        step, ended = _run(s, recipe, precision, dist, report, peak, resumed=bool(start_from))
        _summarize(s, recipe, dist, report, start_step, verdict=ended != "interrupted")
    finally:
        report.close()
    st = s.state
    return TrainResult(run_dir, step, st.val_loss, st.best_val_loss, ckpt.best_checkpoint(run_dir, verify=False),
                       ckpt.latest_checkpoint(run_dir, verify=False), ended == "interrupted", st.first_val_loss,
                       ended == "stopped early", st.select_by, (st.best_metric or {}).get("value"),
                       st.eval_metrics)


def _start_selection(st: TrainingState, t, notes: list[str]) -> None:
    """The state follows train.select_by; a resumed run whose checkpoint selected by another metric
    starts the best checkpoint's choice and the early-stopping count over, and says so."""
    if st.select_by == t.select_by:
        return
    if st.step:
        notes.append(f"train.select_by is {t.select_by} now and was {st.select_by}: the choice of the best "
                     f"checkpoint and the early-stopping count start over at step {st.step}")
    st.select_by, st.best_metric, st.evals_without_improvement = t.select_by, None, 0


def _build_eval_stage(s: Setup, recipe: Recipe, device) -> str:
    """eval.every's stage on the main process (its rows, prompts, validators); a line describing it."""
    ft = s.finetune
    s.evals = build_eval_stage(recipe, s.raw_model, ft.tokenizer if ft else s.tokenizer, ft.template if ft else None,
                               s.source, device)
    return s.evals.describe(recipe.eval.every)


def _quiet(text: str) -> None:
    """`say` on processes other than the main one."""


def _load_manifest(recipe: Recipe) -> dict:
    """The prepared folder's manifest; one line naming the folder and `fledge prepare` when it is missing."""
    from fledge.prepare import load_manifest
    return load_manifest(recipe.prepared_path)


def _with_epochs(recipe: Recipe, source: BatchSource, world: int) -> tuple[Recipe, str | None]:
    """The recipe with train.max_steps = ceil(epochs x the source's steps per epoch) when
    train.epochs is above 0, and a note saying so."""
    t = recipe.train
    if not t.epochs:
        return recipe, None
    per_epoch = getattr(source, "steps_per_epoch", None)
    if per_epoch is None:
        raise RecipeError(f"train.epochs ({t.epochs:g}) counts passes over the training rows, and this batch "
                          f"source ({source.describe()}) does not say how many steps a pass takes. Set "
                          f"train.epochs to 0 and use train.max_steps.")
    n = per_epoch(world, t.batch_size, t.grad_accum)
    max_steps = max(1, math.ceil(round(t.epochs * n, 6)))
    if t.warmup_steps > max_steps:
        raise RecipeError(f"train.warmup_steps ({t.warmup_steps}) exceeds the {max_steps} steps train.epochs gives "
                          f"({t.epochs:g} x {n} steps per epoch). Lower warmup_steps or raise epochs.")
    resolved = dataclasses.replace(recipe, train=dataclasses.replace(t, max_steps=max_steps))
    resolved.given = recipe.given
    ignored = f"; train.max_steps {t.max_steps} is ignored" if "train.max_steps" in recipe.given else ""
    return resolved, f"train.epochs {t.epochs:g} x {n} steps per epoch = {max_steps} steps{ignored}"


def _announce(s: Setup, recipe: Recipe, dist: Distributed, precision, threads: int | None, report) -> None:
    model = s.raw_model
    n_params = model.num_parameters() if hasattr(model, "num_parameters") else \
        sum(p.numel() for p in model.parameters())
    step = s.state.step
    tuned = ""
    if s.finetune is not None:
        from fledge.model.adapters import trainable_report
        trained, total = trainable_report(model)
        ft = s.finetune
        tuned = (f" | {recipe.finetune.method} fine-tune of {recipe.model.base} ({ft.base.kind}), training "
                 f"{trained / 1e6:.2f}M ({100 * trained / max(total, 1):.2f}%)"
                 + (f" | template {ft.template.name}" if ft.template is not None else ""))
    report.say(f"run {recipe.run_path} | {n_params / 1e6:.2f}M parameters{tuned} | {s.source.describe()} "
               f"| device {dist.device} x{dist.world} | {precision.name}"
               + (f" | {threads} threads" if threads else "")
               + (f" | resuming at step {step}" if step else ""))
    if not s.validates:
        report.say("note: no validation batches (data.val_fraction is 0 and data.val_rows is empty): evaluation is "
                   "skipped" + (", early stopping is off" if recipe.train.early_stop_patience else "")
                   + ", and the last checkpoint stands in for the best")
    for note in s.notes:
        report.say(f"note: {note}")


def _run(s: Setup, recipe: Recipe, precision, dist: Distributed, report: Reporter, peak: float | None,
         resumed: bool) -> tuple[int, str]:
    """Steps from the state's step to train.max_steps. Returns the step reached and how the run
    ended: "finished", "stopped early" or "interrupted"."""
    t, st = recipe.train, s.state
    step = st.step
    scaler = torch.amp.GradScaler(dist.device.type) if precision.needs_scaler else None
    last_saved = step if resumed else None
    if _stopped_before(st, t, report):
        return step, "stopped early"
    if step == 0 and st.first_val_loss is None and s.validates:
        st.first_val_loss = _evaluate(s, recipe, precision, dist, report, 0, sample=False)
    timing = _Timing()
    started = time.perf_counter() - st.elapsed_s
    working = None          # the step in flight, from its first micro-batch until it is evaluated and saved
    with _StopRequests(dist) as stop:
        try:
            while step < t.max_steps:
                working = step + 1
                lr = learning_rate(step, t)
                for group in s.optimizer.param_groups:
                    group["lr"] = lr
                step_start = time.perf_counter()
                loss = train_step(s, recipe, step, precision, dist, scaler)
                timing.add(time.perf_counter() - step_start)
                step += 1
                st.step = step
                _log_step(s, recipe, step, loss, lr, dist, report, peak, timing, started)
                saved, stopping = _evaluate_and_checkpoint(s, recipe, step, precision, dist, report, started)
                if saved:
                    last_saved = step
                working = None
                if stopping:
                    return step, "stopped early"
                stop.check()        # the one place a Ctrl-C takes effect: between whole steps
        except KeyboardInterrupt:
            _stop_on_interrupt(s, recipe, step, working, last_saved, dist, report, started)
            return step, "interrupted"
    return step, "finished"


class _Timing:
    """Seconds spent in training steps since the last log line."""

    def __init__(self):
        self.seconds, self.steps = 0.0, 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1

    def per_step(self) -> float:
        per_step = self.seconds / self.steps
        self.seconds, self.steps = 0.0, 0
        return per_step


def _log_step(s: Setup, recipe: Recipe, step: int, loss: torch.Tensor, lr: float, dist: Distributed,
              report: Reporter, peak: float | None, timing: _Timing, started: float) -> None:
    """Log the step when due; keep the step's loss (summed over processes) when it is logged,
    evaluated, or step 1."""
    t, st = recipe.train, s.state
    logging = step % t.log_every == 0 or step == t.max_steps
    if not (logging or step == 1 or _evaluation_due(t, step)):
        return
    value = float(sum_over_processes(loss, dist))
    st.train_loss = value
    if step == 1:
        st.first_train_loss = value
    if logging:
        per_step = timing.per_step()
        tokens_per_s = s.source.tokens_per_step(dist.world) / per_step
        mfu = s.raw_model.flops_per_token(t.block_size) * tokens_per_s / (peak * dist.world) if peak else None
        report.step(step, value, lr, tokens_per_s, mfu, time.perf_counter() - started, per_step * (t.max_steps - step))


def _evaluation_due(t, step: int) -> bool:
    return bool(t.eval_every and step % t.eval_every == 0) or step == t.max_steps


def _stopped_before(st: TrainingState, t, report: Reporter) -> bool:
    """Whether the run being resumed already stopped early (under this recipe's patience)."""
    if not t.early_stop_patience or st.evals_without_improvement < t.early_stop_patience or st.step >= t.max_steps:
        return False
    report.say(f"this run stopped early at step {st.step}: {st.evals_without_improvement} evaluations in a row "
               f"without improvement (train.early_stop_patience {t.early_stop_patience}). Raise "
               f"train.early_stop_patience to train on.")
    return True


def _stop_on_interrupt(s: Setup, recipe: Recipe, step: int, working: int | None, last_saved: int | None,
                       dist: Distributed, report: Reporter, started: float) -> None:
    if working is not None:     # a second Ctrl-C (or an interrupt from elsewhere) inside a step: not saveable
        saved = f"the last checkpoint is {ckpt.checkpoint_name(last_saved)}" if last_saved is not None \
            else "nothing was saved"
        report.say(f"\ninterrupted during step {working}: that step is lost and {saved}. Continue with: "
                   f"fledge train RECIPE --resume")
        return
    if last_saved != step:
        s.state.elapsed_s = time.perf_counter() - started
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


def _evaluate_and_checkpoint(s: Setup, recipe: Recipe, step: int, precision, dist: Distributed,
                             report: Reporter, started: float) -> tuple[bool, bool]:
    """Evaluate when due: validation loss every train.eval_every steps, and with it generated answers
    every eval.every steps. Save when due, when train.select_by improved, or when stopping early.
    Returns (whether it saved, whether early stopping ends the run here)."""
    t, st = recipe.train, s.state
    generating = generation_due(recipe, step)
    selection = None        # (improved, better by more than min_delta) when train.select_by was measured here
    if _evaluation_due(t, step) or generating:
        if s.validates:
            selection = _validate(s, recipe, step, precision, dist, report, started)
        else:
            _sample(s, recipe, precision, dist, report, step)
    if generating:
        selection = _generate(s, recipe, step, precision, dist, report, started) or selection
    improved = stopping = False
    if selection is not None:
        # Early stopping counts evaluations that did not beat the best by more than min_delta; the
        # best checkpoint follows any improvement.
        improved, better = selection
        st.evals_without_improvement = 0 if better else st.evals_without_improvement + 1
        stopping = bool(t.early_stop_patience) and st.evals_without_improvement >= t.early_stop_patience \
            and step < t.max_steps
    saved = improved or stopping or (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.max_steps
    if saved:
        st.elapsed_s = time.perf_counter() - started
        _save(s, recipe, step, dist)
    if stopping:
        report.say(_early_stop_text(st, t, step))
    return bool(saved), stopping


def _validate(s: Setup, recipe: Recipe, step: int, precision, dist: Distributed, report: Reporter,
              started: float) -> tuple[bool, bool] | None:
    """The validation loss (and the sample prompts); its selection when train.select_by is val_loss."""
    t, st = recipe.train, s.state
    val = _evaluate(s, recipe, precision, dist, report, step)
    if not math.isfinite(val):
        raise TrainingDiverged(f"training diverged by step {step}: the validation loss is {val}, and no "
                               f"checkpoint is saved from it. {divergence_advice(recipe, precision)}")
    improved, better = judge_selection(val, st.best_val_loss, "val_loss", t.early_stop_min_delta)
    st.val_loss = val
    if improved:
        st.best_val_loss, st.best_step = val, step
    by_loss = t.select_by == "val_loss"
    report.evaluation(step, val, improved and by_loss, time.perf_counter() - started)
    return (improved, better) if by_loss else None


def _generate(s: Setup, recipe: Recipe, step: int, precision, dist: Distributed, report: Reporter,
              started: float) -> tuple[bool, bool] | None:
    """eval.every's answers, generated and scored on the main process and sent to every process; the
    selection when train.select_by is one of their metrics."""
    t, st = recipe.train, s.state
    scores = dist.run_on_main(_generate_on_main, s, precision)
    st.eval_metrics = {name: m["value"] for name, m in scores["metrics"].items()}
    selection = None
    if t.select_by != "val_loss":
        value = scores["metrics"][t.select_by]["value"]
        selection = judge_selection(value, (st.best_metric or {}).get("value"), t.select_by, t.early_stop_min_delta)
        if selection[0]:
            st.best_metric = {"value": value, "step": step, "val_loss": st.val_loss if s.validates else None}
    report.generation(step, scores, t.select_by, bool(selection and selection[0]), time.perf_counter() - started)
    return selection


def _generate_on_main(s: Setup, precision) -> dict:
    return s.evals.run(precision)


def _early_stop_text(st: TrainingState, t, step: int) -> str:
    n = st.evals_without_improvement
    if t.select_by == "val_loss":
        return (f"stopping early at step {step}: val loss has not fallen more than {t.early_stop_min_delta:g} "
                f"below the best ({st.best_val_loss:.4f} at step {st.best_step}) in {n} evaluations in a row "
                f"(train.early_stop_patience). The best checkpoint is {ckpt.checkpoint_name(st.best_step)}.")
    best_step, value, _ = st.chosen()
    if best_step is None:
        return (f"stopping early at step {step}: {t.select_by} could not be judged on any row in {n} generation "
                f"evaluations in a row (train.early_stop_patience); no checkpoint is the best by it.")
    return (f"stopping early at step {step}: {t.select_by} has not risen more than {t.early_stop_min_delta:g} above "
            f"the best ({format_selection(t.select_by, value)} at step {best_step}) in {n} generation evaluations "
            f"in a row (train.early_stop_patience). The best checkpoint is {ckpt.checkpoint_name(best_step)}.")


def _evaluate(s: Setup, recipe: Recipe, precision, dist, report, step: int, sample: bool = True) -> float:
    val = evaluate_loss(s.raw_model, s.source.val_batches(dist.rank, dist.world), dist.device, precision, dist.world)
    if sample:
        _sample(s, recipe, precision, dist, report, step)
    return val


def _sample(s: Setup, recipe: Recipe, precision, dist, report, step: int) -> None:
    """The recipe's prompts sampled on the main process: continued as text, or answered in the
    fine-tune's template. Each with its own seeded generator, never the global RNG."""
    t, prompts = recipe.train, recipe.sample.prompts
    if not (dist.is_main and prompts and hasattr(s.raw_model, "generate")):
        return
    if s.finetune is not None:
        from fledge.train.finetune import sample_answers
        texts = sample_answers(s.raw_model, s.finetune, recipe, prompts, seed=t.seed, device=dist.device,
                               precision=precision)
    else:
        from fledge.sample import generate_text
        texts = [generate_text(s.raw_model, s.tokenizer, p, recipe.sample, seed=t.seed + i, device=dist.device,
                               precision=precision)[0] for i, p in enumerate(prompts)]
    report.samples(step, prompts, texts)


def _save(s: Setup, recipe: Recipe, step: int, dist: Distributed) -> None:
    """Save on the main process; every process raises its StorageError or CheckpointError."""
    dist.run_on_main(_save_on_main, s, recipe, step)


def _save_on_main(s: Setup, recipe: Recipe, step: int) -> None:
    tensors, aliases, extra_files = _checkpoint_contents(s)
    ckpt.save_checkpoint(recipe.run_path, step, tensors, s.optimizer, s.state, recipe.to_yaml(), s.tokenizer_file,
                         keep_last=recipe.train.keep_last, aliases=aliases, extra_files=extra_files)


def _checkpoint_contents(s: Setup):
    """What a checkpoint holds besides the training state: (tensors or None, aliases, extra_files(folder)).
    Pretraining: the whole model's weights and its transformers config.json. Fine-tunes
    (fledge.train.finetune): whole weights or only adapters, and the transformers files of the
    fine-tune's tokenizer and template."""
    from fledge.export.hf import write_transformers_files
    from fledge.model.bases import model_hf_config
    if s.finetune is not None:
        from fledge.train.finetune import checkpoint_contents
        return checkpoint_contents(s.raw_model, s.finetune)
    tensors, aliases = ckpt.weights_to_save(s.raw_model)
    return tensors, aliases, partial(write_transformers_files, hf_config=model_hf_config(s.raw_model),
                                     tokenizer=None, template=None)


def _record_environment(run_dir: Path, dist: Distributed) -> None:
    """runs/<name>/env.json: the machine this run trains on (devices, CPU flags, versions), for the report."""
    import json

    from fledge.env import collect_env
    from fledge.files import write_atomic
    env = {**collect_env(measure=False), "processes": dist.world}
    write_atomic(run_dir / "env.json", json.dumps(env, indent=1, default=str) + "\n")


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


# Keys besides model.* and tokenizer.* that decide which tensors a checkpoint holds and what they mean.
SHAPES_WEIGHTS = {"finetune.method", "finetune.lora_r", "finetune.lora_alpha", "finetune.lora_targets",
                  "finetune.quant_bits", "template.name", "template.jinja"}


def check_resumable(checkpoint: Path, recipe: Recipe) -> list[str]:
    """Raise if the checkpoint's model or tokenizer differ from the recipe; return notes on other changes.

    A fine-tune's recipe is the resolved one (model.* and tokenizer.* from its base), as saved in
    its checkpoints. The method, the adapters' shape and the template count as the model.

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
    for section in ("model", "tokenizer", "finetune", "template", "data", "train", "eval"):
        for key in now[section]:
            a, b = saved.get(section, {}).get(key), now[section][key]
            if a != b:
                item = f"{section}.{key}: checkpoint {a!r}, recipe {b!r}"
                shapes = bool(recipe.model.base) and f"{section}.{key}" in SHAPES_WEIGHTS
                (fatal if section in ("model", "tokenizer") or shapes else notes).append(item)
    if fatal:
        raise CheckpointError(f"{checkpoint} comes from another recipe: " + "; ".join(fatal) +
                              ". Resume with the recipe saved in the checkpoint, or start a new run "
                              "(--set name=<new name>).")
    for note in notes:
        print(f"note: {note} (the recipe's value wins)")
    return notes


def _build(recipe: Recipe, dist: Distributed, manifest: dict | None, source: BatchSource, ft: FineTune | None,
           start_from: str | None) -> Setup:
    """Tokenizer, model and optimizer, freshly initialised (see `_restore`); a fine-tune's model is
    its base made ready by finetune.method, or with a resumed run's adapters."""
    notes: list[str] = []
    if ft is None:
        from fledge.model.registry import build_model
        from fledge.tokenizer import find_tokenizer_file, load_tokenizer
        tokenizer_file = find_tokenizer_file(recipe.prepared_path)
        tokenizer = load_tokenizer(tokenizer_file)
        vocab = manifest["tokenizer"]["vocab_size"]
        raw_model = build_model(recipe.model, vocab, tokenizer.bos_id, tokenizer.eos_id).to(dist.device)
        state = TrainingState(vocab_size=vocab, tokenizer_sha256=manifest["tokenizer"]["sha256"])
    else:
        from fledge.train.finetune import build_finetune_model, embedding_rows, tokenizer_sha256
        tokenizer, tokenizer_file = ft.tokenizer, ft.tokenizer_file
        raw_model = build_finetune_model(ft, recipe, Path(start_from) if start_from else None)
        # continued pretraining compares the prepared shards' tokenizer; rows, the tokenizer as trained
        sha = manifest["tokenizer"]["sha256"] if manifest is not None else tokenizer_sha256(tokenizer)
        state = TrainingState(vocab_size=embedding_rows(raw_model, tokenizer), tokenizer_sha256=sha,
                              base_sha256=ft.base_sha256)
    optimizer = make_optimizer(raw_model, recipe.train, dist.device, say=notes.append)
    validates = bool(source.val_batches(dist.rank, dist.world))
    return Setup(raw_model, raw_model, optimizer, tokenizer, tokenizer_file, source, state,
                 takes_reduction(raw_model), finetune=ft, validates=validates,
                 rows_tokenizer=ft is not None and manifest is None, notes=notes)


def _restore(s: Setup, checkpoint: Path) -> None:
    """Weights (unless the model already holds the checkpoint's adapters), optimizer and RNG states
    from a checkpoint, after everything that draws random numbers."""
    expected = s.state.tokenizer_sha256
    if not ckpt.is_adapter_checkpoint(checkpoint):
        ckpt.load_weights(s.raw_model, checkpoint)
    s.state = ckpt.load_training_state(checkpoint, s.optimizer)
    if s.state.tokenizer_sha256 not in (None, expected):
        if s.rows_tokenizer:
            raise CheckpointError(f"{checkpoint} was trained with another tokenizer than this run's (the base's, "
                                  f"with its pad and template tokens). Resume with the original base and template.")
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


def _summarize(s: Setup, recipe: Recipe, dist: Distributed, report: Reporter, start_step: int,
               verdict: bool) -> None:
    """The run's summary line on the main process, and (unless interrupted) whether it learned."""
    if not dist.is_main:
        return
    st = s.state
    report.say(summary_text(
        steps=st.step, tokens=st.step * s.source.tokens_per_step(dist.world), first_train=st.first_train_loss,
        last_train=st.train_loss, first_val=st.first_val_loss, last_val=st.val_loss, best_val=st.best_val_loss,
        best_step=st.best_step, counts=parameter_counts(s.raw_model), change=s.watch.change_norm(),
        since_step=start_step, not_measured=s.watch.not_kept))
    if st.select_by != "val_loss":
        best_step, value, _ = st.chosen()
        report.say(f"best checkpoint by {st.select_by} (train.select_by): "
                   + (f"{ckpt.checkpoint_name(best_step)}, {format_selection(st.select_by, value)}"
                      if best_step is not None else "none, no evaluation could judge it"))
    line = learning_verdict(st.first_val_loss, st.val_loss, st.best_val_loss, recipe.run_path) if verdict else None
    if line:
        report.say(line)


__all__ = ["train", "prepare_data", "TrainResult", "TrainingDiverged", "LearningError", "check_resumable",
           "make_optimizer"]
