"""Generation evaluations during training (`eval.every`): greedy answers to a fixed subset of
held-out rows, scored like `fledge eval` scores them, for the progress line, metrics.jsonl, and,
with `train.select_by` one of their metrics, the best checkpoint and early stopping.

    stage = build_eval_stage(recipe, model, tokenizer, template, source, device)   # main process
    scores = stage.run(precision)       # {"rows", "seconds", "metrics": {name: {"value", "k", "n", ...}},
                                        #  "targets": {name: {"target", "value", "met"}}, "notes"}

The loop (fledge.train.loop) calls it on the main process only, every `eval.every` steps and at
the last step, and hands the result to the other processes, so early stopping stays in lockstep.

- Rows: `eval.data` when set (read as `fledge eval` reads a data file), else the run's validation
  rows (`RowBatches.val_records`: data.val_rows, or the data.val_fraction split, after rows too
  long were dropped). Text rows have no prompt and are left out. Of the rest, `eval.rows` are
  drawn once by numpy's generator seeded with train.seed and kept in file order: the same rows at
  every evaluation, and after a resume.
- Answers: fledge.evaluate.run renders the prompts with the run's template (`encode_rows`; plain
  BOS + prompt without one) and generates them greedily, prompts of equal length batched with the
  KV cache (`generate_answers`), at most `eval.max_new_tokens` tokens (0: twice the longest
  reference of the subset in tokens, plus 16), under the run's autocast precision.
- Scores: fledge.evaluate.score (`assemble_result`): exact_match, normalized_match, one pass rate
  per eval.validate validator, purity and adherence with a vocabulary validator, named as in
  `fledge eval`'s summary.json. eval.targets on these metrics are judged each time; loss, ppl and
  bpb targets are left to `fledge eval` (the validation loss of training is on other rows).

Generation uses a torch.Generator of its own (greedy draws nothing), the subset a numpy generator
of its own, and the model goes back to train mode after: nothing touches the global RNG, so a run
with evaluations trains exactly as one without, and resumes bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fledge.errors import RecipeError
from fledge.recipe import Recipe

BATCH_SIZE = 16            # prompts of one length generated together, as `fledge eval`'s default
RESAMPLES = 1_000          # adherence's bootstrap interval: enough for a progress line


def generation_due(recipe: Recipe, step: int) -> bool:
    """Whether a generation evaluation follows this step: every eval.every steps, and the last one."""
    every = recipe.eval.every
    return bool(every) and (step % every == 0 or step == recipe.train.max_steps)


def higher_is_better(metric: str) -> bool:
    """val_loss falls as a model improves; every generation metric is a share that rises."""
    return metric != "val_loss"


@dataclass
class EvalStage:
    """The fixed rows, how they are prompted and scored; `run` answers and scores them."""

    subject: object                 # fledge.evaluate.run.Subject: the training model, its tokenizer and template
    records: list                   # the fixed subset (fledge.data.records.Record)
    prompts: list[list[int]]        # their prompt ids
    decoding: object                # fledge.evaluate.run.Decoding
    validators: list                # fledge.evaluate.metrics.NamedValidator, built
    targets: dict[str, float]       # eval.targets on generation metrics
    data: str                       # where the rows come from, in words
    held_out: int                   # rows with a prompt the subset was drawn from

    def describe(self, every: int) -> str:
        names = ", ".join(["exact_match", "normalized_match", *(v.label for v in self.validators)])
        return (f"generation evaluations every {every} steps on {len(self.records)} fixed rows (of {self.held_out:,} "
                f"with a prompt) of {self.data}: greedy, at most {self.decoding.max_new_tokens} new tokens; {names}")

    def run(self, precision) -> dict:
        """Answer and score the rows; a small dict of plain values (it is broadcast to every process)."""
        from fledge.evaluate.run import generate_answers
        from fledge.evaluate.score import SystemOutput, assemble_result
        start = time.perf_counter()
        model = self.subject.loaded.model
        device = next(model.parameters()).device
        was_training = model.training
        try:
            with precision.autocast(device):
                texts = generate_answers(self.subject, self.prompts, self.decoding)
        finally:
            model.train(was_training)
        output = SystemOutput(self.subject.label, "training", texts)
        result = assemble_result(self.data, self.records, self.validators, output, targets=self.targets,
                                 resamples=RESAMPLES, seed=self.decoding.seed)
        metrics = {name: {k: m[k] for k in ("title", "kind", "value", "k", "n", "unjudged") if k in m}
                   for name, m in result.to_dict()["metrics"].items()}
        targets = {name: {k: t[k] for k in ("target", "value", "met")} for name, t in result.targets.items()}
        return {"rows": len(self.records), "seconds": time.perf_counter() - start, "metrics": metrics,
                "targets": targets, "notes": list(result.notes)}


def build_eval_stage(recipe: Recipe, model: torch.nn.Module, tokenizer, template, source, device) -> EvalStage:
    """The stage of `recipe.eval` for the model being trained (see the module docstring). Raises
    RecipeError when there are no held-out rows with a prompt, DataError for a bad eval.data row."""
    from fledge.evaluate.metrics import build_validators
    from fledge.evaluate.run import Decoding, Subject, default_max_new_tokens, encode_rows
    from fledge.sample import Loaded
    e, t = recipe.eval, recipe.train
    if not callable(getattr(model, "generate", None)):
        raise RecipeError(f"eval.every ({e.every}) generates answers, and the model ({type(model).__name__}) has no "
                          f"generate method; add one to your model.arch (see GPT.generate), or set eval.every: 0.")
    records, data = held_out_rows(recipe, source)
    prompted = [r for r in records if not r.is_completion]
    if not prompted:
        raise RecipeError(f"eval.every ({e.every}) answers held-out rows, and the {len(records):,} rows of {data} "
                          f"are all text rows without a prompt. Give eval.data with prompts and answers, or set "
                          f"eval.every: 0.")
    subset = fixed_subset(prompted, e.rows, t.seed)
    loaded = Loaded(model, tokenizer, recipe, template, recipe.run_path)
    subject = Subject.of(loaded, recipe.name)
    encoded = encode_rows(subject, subset)
    validators = build_validators(e.validate)
    generated = {"exact_match", "normalized_match", *(v.label for v in validators),
                 *(["adherence"] if any(v.is_vocabulary for v in validators) else [])}
    targets = {name: value for name, value in e.targets.items() if name in generated}
    decoding = Decoding(e.max_new_tokens or default_max_new_tokens(subject, subset), 0.0, t.seed, BATCH_SIZE)
    return EvalStage(subject, subset, [x.prompt for x in encoded], decoding, validators, targets, data,
                     len(prompted))


def held_out_rows(recipe: Recipe, source) -> tuple[list, str]:
    """(records, where they come from): eval.data, else the source's validation rows."""
    from fledge.evaluate.score import read_data
    if recipe.eval.data:
        return read_data(recipe.eval.data), recipe.eval.data
    records = list(getattr(source, "val_records", None) or [])
    if not records:
        raise RecipeError(f"eval.every ({recipe.eval.every}) answers held-out rows, and this run has no validation "
                          f"rows ({source.describe()}). Give eval.data (a rows file), or set eval.every: 0.")
    return records, "the validation rows"


def fixed_subset(records: Sequence, n: int, seed: int) -> list:
    """`n` of the records (all when there are fewer), drawn by a generator of their own, in file order."""
    if len(records) <= n:
        return list(records)
    picked = np.random.default_rng([seed, 0x45_56_41_4C]).choice(len(records), size=n, replace=False)
    return [records[i] for i in sorted(picked.tolist())]


def judge_selection(value: float | None, best: float | None, metric: str, min_delta: float) -> tuple[bool, bool]:
    """(improved: a new best, better: improved by more than min_delta, which resets early stopping's count).
    A value of None (no row could be judged) improves nothing."""
    if value is None:
        return False, False
    if best is None:
        return True, True
    if higher_is_better(metric):
        return value > best, value > best + min_delta
    return value < best, value < best - min_delta


def format_selection(metric: str, value: float | None) -> str:
    """A value of train.select_by as people read it: a loss to 4 decimals, a share in percent."""
    if value is None:
        return "n/a"
    return f"{value:.4f}" if not higher_is_better(metric) else f"{metric} {100 * value:.1f}%"


def format_scores(step: int, scores: dict, select_by: str, improved: bool) -> str:
    """The progress line of one generation evaluation."""
    parts = [f"[bold]generate[/] step {step}", f"{scores['rows']} rows in {scores['seconds']:.1f}s"]
    for name, m in scores["metrics"].items():
        if m["value"] is None:
            text = f"n/a ({m['unjudged']} unjudged)"
        else:
            text = f"{100 * m['value']:.1f}%" + (f" ({m['k']}/{m['n']})" if "k" in m else "")
        target = scores["targets"].get(name)
        if target is not None:
            verdict = {True: "met", False: "missed", None: "not judged"}[target["met"]]
            text += f" (target {100 * target['target']:.0f}%: {verdict})"
        parts.append(f"{m['title']} {text}")
    if improved and select_by != "val_loss":
        parts.append(f"best so far ({select_by})")
    return " | ".join(parts)


def scores_row(scores: dict) -> dict:
    """What metrics.jsonl keeps of one generation evaluation (besides step and elapsed time)."""
    return {"eval_metrics": {name: m["value"] for name, m in scores["metrics"].items()},
            "eval_counts": {name: {k: m[k] for k in ("k", "n", "unjudged") if k in m}
                            for name, m in scores["metrics"].items()},
            "eval_rows": scores["rows"], "eval_seconds": round(scores["seconds"], 3),
            **({"eval_targets": {name: t["met"] for name, t in scores["targets"].items()}}
               if scores["targets"] else {})}


__all__ = ["EvalStage", "build_eval_stage", "generation_due", "higher_is_better", "judge_selection",
           "format_selection", "format_scores", "scores_row", "held_out_rows", "fixed_subset"]
