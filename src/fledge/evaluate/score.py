"""Score a file of generations against a data file, optionally against a baseline's generations.

    result = score_outputs("val.jsonl", "tuned.jsonl", validators=["dot"], baseline_file="base.jsonl",
                           targets={"dot": 0.9})
    print(result.format())                     # a table, and one sentence per comparison
    result.write("tuned.eval")                 # summary.json (result.to_dict()) and rows.jsonl
    result.targets_met                         # False when a target is missed or cannot be judged

An outputs file holds one JSON object per data row, in the same order, with the generated
text in "generation" (or `field`): `{"generation": "digraph { a -> b }"}`. Other keys are
ignored. It may be .jsonl, .json (an array), .csv or .parquet, as data files are. The data
file is read with fledge.data.records, so any row format works; the reference is the row's
response (its last assistant turn).

With a baseline, each metric is compared on the rows both systems were judged on: the
difference (tuned - baseline) with a paired bootstrap interval (fledge.evaluate.stats; every
metric uses the same seed, so the same resampled rows), for pass rates also the exact McNemar
p-value, and a sentence in plain words. For pass rates the verdict of the sentence is the exact
McNemar test's; the interval beside it is the paired bootstrap's percentile interval, and when
the two disagree (possible with few rows that differ) the sentence says so. For other metrics
the verdict is whether the bootstrap interval leaves out 0. Targets compare a metric's value
(the point estimate, not an interval bound) with a threshold: at least the target, or at most
for "loss", "ppl" and "bpb", which only an evaluation with a model has (fledge.evaluate.run,
which builds its result with `assemble_result` below).

summary.json is `EvalResult.to_dict()`:
    {"data", "outputs", "baseline", "n_rows", "names": [tuned, baseline], "level",
     "metrics": {name: {"title", "value", "lo", "hi", "n", "k" (rates), "tokens" | "bytes" (losses),
                        "kind": "rate" | "ratio" | "loss" | "perplexity", "unjudged"}},
     "baseline_metrics": {...} or null,
     "targets": {name: {"target", "value", "met", "direction": "higher" | "lower"}},
     "comparisons": [{"metric", "kind", "tuned", "baseline", "diff", "lo", "hi", "p_value", "sentence", "n",
                      "tuned_k", "baseline_k", "tuned_only", "baseline_only" (rates)}],
     "about": [lines describing how the outputs and losses were made], "settings": {...},
     "notes", "rows_file"}
Rates and ratios are shares (0 to 1); loss is in nats per token, bpb in bits per byte, ppl a
number; `diff`, `lo` and `hi` are in the metric's own unit.
rows.jsonl has one line per data row: row (1-based), source (file:line), prompt, reference,
generation, exact_match, normalized_match, validators {name: {ok, extracted, message, score?,
details?}}, with a model "loss": {loss (nats per token), tokens, bytes} or null, and with a
baseline "baseline": {generation, exact_match, normalized_match, validators, loss?}. A value is
null where it cannot be computed (no row judged); a row without a prompt (a text row, scored
for loss only) has generation null and no verdicts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fledge.data.records import FieldMap, Record, RowProblem, scan_file, write_jsonl
from fledge.data.sources import Invalid, expand_sources, iter_raw_rows
from fledge.errors import DataError, RecipeError
from fledge.evaluate.metrics import (BUILT_IN_METRICS, LOSS_METRICS, SHARE_KINDS, VOCABULARY_METRICS, Column, NamedValidator,
                                     RowScore, build_validators, close_name, loss_columns, metric_columns, score_rows,
                                     summarize)
from fledge.evaluate.stats import compare_sentence, format_p, mcnemar_exact, paired_bootstrap
from fledge.files import write_atomic
from fledge.validators import VALIDATORS

LOWER_IS_BETTER = {"ppl": "perplexity", "loss": "loss", "bpb": "bits per byte"}


@dataclass
class EvalResult:
    """Everything one scoring produced; `to_dict` is the summary.json contract (module docstring)."""

    data: str
    outputs: str
    baseline: str | None
    n_rows: int
    metrics: dict[str, dict]
    titles: dict[str, str]
    baseline_metrics: dict[str, dict] | None = None
    targets: dict[str, dict] = field(default_factory=dict)
    comparisons: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list, repr=False)
    names: tuple[str, str] = ("tuned", "baseline")
    level: float = 0.95
    notes: list[str] = field(default_factory=list)
    rows_file: str | None = None
    about: list[str] = field(default_factory=list)     # how the outputs and losses were made, in words
    settings: dict = field(default_factory=dict)       # the same, for programs

    @property
    def targets_met(self) -> bool:
        """True when every target is met (also when there are none); a target not judged is not met."""
        return all(t["met"] is True for t in self.targets.values())

    def to_dict(self) -> dict:
        def titled(metrics: dict[str, dict] | None) -> dict | None:
            return None if metrics is None else {name: {"title": self.titles.get(name, name), **m}
                                                 for name, m in metrics.items()}

        return _finite({"data": self.data, "outputs": self.outputs, "baseline": self.baseline, "n_rows": self.n_rows,
                        "names": list(self.names), "level": self.level, "metrics": titled(self.metrics),
                        "baseline_metrics": titled(self.baseline_metrics), "targets": self.targets,
                        "comparisons": self.comparisons, "about": self.about, "settings": self.settings,
                        "notes": self.notes, "rows_file": self.rows_file})

    def write(self, out_dir: str | Path) -> Path:
        """rows.jsonl, then summary.json, each written atomically into `out_dir`; returns summary.json's path."""
        out = Path(out_dir)
        self.rows_file = str(out / "rows.jsonl")
        write_jsonl(self.rows, self.rows_file)
        summary = out / "summary.json"
        write_atomic(summary, json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False) + "\n")
        return summary

    def format(self) -> str:
        """The summary as a table for the terminal."""
        tuned, base = self.names
        head = f"{self.n_rows:,} rows of {self.data}: {tuned} = {self.outputs}"
        lines = [head + (f", {base} = {self.baseline}" if self.baseline else "")]
        lines += self.about
        lines.append("")
        width = max([len("metric"), *map(len, self.titles.values())]) + 2
        level = f"{self.level:.0%}"
        cells = {name: _cell(summary) for name, summary in self.metrics.items()}
        diffs = {c["metric"]: ("n/a" if c["diff"] is None else
                               f"{_signed(c['diff'], c['kind'])} [{_signed(c['lo'], c['kind'])}, "
                               f"{_signed(c['hi'], c['kind'])}]") for c in self.comparisons}
        heads = (f"{tuned} [{level} interval]", f"{tuned} - {base} [{level} bootstrap]")
        column = max(34, *(len(x) + 2 for x in (*cells.values(), *diffs.values(), heads[0])),
                     len(heads[1]) + 2 if self.comparisons else 0)
        header = f"{'metric':<{width}}{heads[0]:<{column}}" + (f"{base} [{level} interval]"
                                                                 if self.baseline_metrics else "")
        lines.append(header.rstrip())
        for name in self.metrics:
            row = f"{self.titles[name]:<{width}}{cells[name]:<{column}}"
            if self.baseline_metrics:
                row += _cell(self.baseline_metrics.get(name))
            lines.append(row.rstrip())
        if self.comparisons:
            lines += ["", f"{'difference':<{width}}{heads[1]:<{column}}p (McNemar)"]
            for c in self.comparisons:
                p = "" if c["p_value"] is None else format_p(c["p_value"]).removeprefix("p ").removeprefix("= ")
                lines.append(f"{self.titles[c['metric']]:<{width}}{diffs[c['metric']]:<{column}}{p}".rstrip())
            lines += ["", "differences of rates are in points; p is the exact McNemar test's, and the sentence's "
                          "verdict follows it (bootstrap intervals for the other metrics)"]
            lines += [""] + [c["sentence"] for c in self.comparisons]
        if self.targets:
            lines += ["", "targets"]
            for name, t in self.targets.items():
                sign = ">=" if t["direction"] == "higher" else "<="
                verdict = {True: "met", False: "MISSED", None: "not judged (no row judged)"}[t["met"]]
                kind = self.metrics[name]["kind"]
                lines.append(f"{self.titles.get(name, name):<{width}}{_value(t['value'], kind)} {sign} "
                             f"{_value(t['target'], kind)}: {verdict}")
        if self.notes:
            lines += [""] + self.notes
        if self.rows_file:
            lines += ["", f"per-row results: {self.rows_file}"]
        return "\n".join(lines)


def _cell(summary: dict | None) -> str:
    if summary is None:
        return "n/a"
    if summary["value"] is None:
        return f"n/a ({summary['unjudged']:,} unjudged)"
    kind = summary["kind"]
    if kind not in SHARE_KINDS:
        count = next((f"{summary[k]:,} {k} " for k in ("tokens", "bytes") if k in summary), "")
        text = f"{count}{_number(summary['value'])} [{_number(summary['lo'])}, {_number(summary['hi'])}]"
    else:
        text = f"{_percent(summary['value'])} [{_percent(summary['lo'], False)}, {_percent(summary['hi'], False)}]"
        text = (f"{summary['k']}/{summary['n']} " if "k" in summary else f"n={summary['n']} ") + text
    return text + (f" +{summary['unjudged']} unjudged" if summary["unjudged"] else "")


def _percent(x: float | None, sign: bool = True) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}" + ("%" if sign else "")


def _points(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:+.1f}"


def _number(x: float | None, sign: str = "") -> str:
    """A loss, perplexity or bits per byte: 3 decimals, or 1 past 100."""
    if x is None or not math.isfinite(x):
        return "n/a" if x is None or math.isnan(x) else ("inf" if x > 0 else "-inf")
    return f"{x:{sign},.1f}" if abs(x) >= 100 else f"{x:{sign}.3f}"


def _value(x: float | None, kind: str) -> str:
    return _percent(x) if kind in SHARE_KINDS else _number(x)


def _signed(x: float | None, kind: str) -> str:
    return _points(x) if kind in SHARE_KINDS else _number(x, "+")


def _finite(value: Any) -> Any:
    """NaN and infinity (JSON has neither) as None, all the way down."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def default_out_dir(outputs_file: str | Path) -> Path:
    """Beside the outputs file: `<outputs stem>.eval/`."""
    p = Path(outputs_file)
    return p.with_name(p.stem + ".eval")


# --- reading --------------------------------------------------------------------------------------

def read_data(data_file: str | Path, fields: FieldMap = FieldMap()) -> list[Record]:
    """Every row of the data file(s) in order; a row that cannot be read is an error at file:line."""
    records = []
    for path in expand_sources([data_file]):
        for item in scan_file(path, fields, require_response=False):
            if isinstance(item, RowProblem):
                stop = "" if item.message.endswith(".") else "."
                raise item.error(f"{stop} Fix the row: outputs are matched to data rows by their order, so none "
                                 "may be skipped.")
            records.append(item)
    if not records:
        raise DataError("no rows to evaluate; the data file is empty.", path=str(data_file))
    return records


def read_outputs(outputs_file: str | Path, records: Sequence[Record], field_name: str = "generation") -> list[str]:
    """The text of every line of an outputs file, one per data row; any mismatch is one line naming file:line."""
    path, n_rows = str(outputs_file), len(records)
    shape = f'an outputs file holds one JSON object per data row, in the same order, with the text in "{field_name}"'
    texts: list[str] = []
    for line, row in iter_raw_rows(outputs_file):
        if isinstance(row, Invalid):
            raise DataError(f"{row.message}; {shape}.", path=path, line=line)
        if len(texts) == n_rows:
            raise DataError(f"an output beyond the {n_rows:,} data rows of {records[0].source}; {shape}. Were the "
                            "outputs generated from this data file?", path=path, line=line)
        if not isinstance(row, dict):
            raise DataError(f"a JSON object is expected, not {type(row).__name__}; {shape}.", path=path, line=line)
        if field_name not in row:
            found = ", ".join(map(str, row)) or "none"
            raise DataError(f'"{field_name}" is missing (fields: {found}); {shape}. Pass --field NAME if the text '
                            "is in another field.", path=path, line=line)
        text = row[field_name]
        if not isinstance(text, str):
            raise DataError(f'"{field_name}" must be a string, got {type(text).__name__}; {shape}.', path=path,
                            line=line)
        texts.append(text)
    if len(texts) < n_rows:
        missing = records[len(texts)]
        raise DataError(f"{len(texts):,} outputs for {n_rows:,} data rows: {missing.location} has none; {shape}. "
                        "Were the outputs generated from this data file?", path=path)
    return texts


# --- targets --------------------------------------------------------------------------------------

def check_targets(targets: Mapping[str, float], metric_names: Sequence[str]) -> dict[str, float]:
    """The targets as {metric: threshold}; every problem in one line (RecipeError) before anything is scored."""
    problems = [f"--target {name}{f'={value}' if shows_value else ''}: {text}"
                for name, value, shows_value, text in target_problems(targets, metric_names)]
    if problems:
        raise RecipeError("; ".join(problems))
    return {name: float(value) for name, value in targets.items()}


def target_problems(targets: Mapping[str, float], metric_names: Sequence[str], *,
                    add: str = "add --validate {}") -> list[tuple[str, Any, bool, str]]:
    """(name, value, whether the message is about the value, what is wrong) per bad target. `add`
    says how a validator is asked for ("add --validate {}" on the command line; a recipe names its key)."""
    problems = []
    for name, value in targets.items():
        if name in LOWER_IS_BETTER and name not in metric_names:
            problems.append((name, value, False, f"{LOWER_IS_BETTER[name]} needs a model, and scoring an outputs "
                             "file runs none; evaluate the run instead (fledge eval RUN --data FILE) or drop this "
                             "target"))
        elif name not in metric_names:
            if name in VOCABULARY_METRICS:
                hint = f" It comes from the vocabulary validator: {add.format('vocabulary:path=WORDS_FILE')}."
            elif name in VALIDATORS or ":" in name:
                hint = f" {add.format(name)[:1].upper()}{add.format(name)[1:]} to compute it."
            else:
                hint = close_name(name, metric_names)
            problems.append((name, value, False, f"this evaluation computes no metric {name!r}.{hint} Metrics here: "
                                                 f"{', '.join(metric_names)}"))
        elif name in LOWER_IS_BETTER:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                problems.append((name, value, True, f"{LOWER_IS_BETTER[name]} is a positive number, met when the "
                                                    f"value is at most the target (e.g. ppl=20)"))
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            hint = f"; did you mean {value / 100:g}?" if isinstance(value, (int, float)) and 1 < value <= 100 else ""
            problems.append((name, value, True, f"{name} is a share between 0 and 1{hint}"))
    return problems


def judge_targets(targets: Mapping[str, float], metrics: Mapping[str, dict]) -> dict[str, dict]:
    out = {}
    for name, target in targets.items():
        value = metrics[name]["value"]
        higher = name not in LOWER_IS_BETTER
        met = None if value is None else (value >= target if higher else value <= target)
        out[name] = {"target": target, "value": value, "met": met, "direction": "higher" if higher else "lower"}
    return out


# --- comparing ------------------------------------------------------------------------------------

def compare_columns(tuned: Column, baseline: Column, *, names: tuple[str, str] = ("tuned", "baseline"),
                    resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """One comparison entry (module docstring) over the rows both systems were judged on."""
    both = [i for i, (a, b) in enumerate(zip(tuned.values, baseline.values)) if a is not None and b is not None]
    entry: dict[str, Any] = {"metric": tuned.name, "kind": tuned.kind, "tuned": None, "baseline": None, "diff": None,
                             "lo": None, "hi": None, "p_value": None, "n": len(both)}
    if not both:
        entry["sentence"] = f"cannot compare {tuned.title}: no row was judged for both {names[0]} and {names[1]}"
        return entry
    a = np.array([tuned.values[i] for i in both], dtype=np.float64)
    b = np.array([baseline.values[i] for i in both], dtype=np.float64)
    if tuned.kind == "rate":
        diff, lo, hi = paired_bootstrap(a, b, n=resamples, seed=seed, level=level)
        baseline_only, tuned_only, p = mcnemar_exact(a.astype(bool).tolist(), b.astype(bool).tolist())
        k_a, k_b = int(a.sum()), int(b.sum())
        sentence = compare_sentence(tuned.title, (k_a, len(both)), (k_b, len(both)), p, interval=(lo, hi),
                                    names=names, level=level)
        entry.update(tuned=k_a / len(both), baseline=k_b / len(both), p_value=p, tuned_k=k_a, baseline_k=k_b,
                     tuned_only=tuned_only, baseline_only=baseline_only)
    else:
        statistic = tuned.statistic
        diff, lo, hi = paired_bootstrap(a, b, statistic=statistic, n=resamples, seed=seed, level=level)
        value_a, value_b = (float(statistic(x[None])[0]) for x in (a, b))
        sentence = compare_sentence(tuned.title, value_a, value_b, interval=(lo, hi), names=names, level=level,
                                    higher_is_better=tuned.higher_is_better)
        entry.update(tuned=value_a, baseline=value_b)
    entry.update(diff=diff, lo=lo, hi=hi, sentence=sentence)
    return entry


# --- the stage ------------------------------------------------------------------------------------

def score_outputs(data_file: str | Path, outputs_file: str | Path, *, field: str = "generation",
                  validators: Sequence[str | NamedValidator] = (), baseline_file: str | Path | None = None,
                  targets: Mapping[str, float] | None = None, fields: FieldMap = FieldMap(),
                  names: tuple[str, str] = ("tuned", "baseline"), resamples: int = 10_000, seed: int = 0,
                  level: float = 0.95) -> EvalResult:
    """Score `outputs_file` (and `baseline_file`) against `data_file`; see the module docstring.

    validators: flags such as "dot" or "vocabulary:path=words.txt" (fledge.evaluate.metrics), or
    the list build_validators made of them. fields: the data file's field map, as in the data tools. Options and
    targets are checked before any file is read."""
    named = as_validators(validators)
    checked_targets = check_targets(targets or {}, metric_names(named))
    if not field:
        raise RecipeError("--field is empty; name the outputs' field that holds the text (default: generation)")

    records = read_data(data_file, fields)
    tuned = SystemOutput(names[0], str(outputs_file), read_outputs(outputs_file, records, field))
    baseline = (None if baseline_file is None else
                SystemOutput(names[1], str(baseline_file), read_outputs(baseline_file, records, field)))
    return assemble_result(str(data_file), records, named, tuned, baseline, targets=checked_targets,
                           resamples=resamples, seed=seed, level=level)


def as_validators(validators: Sequence[str | NamedValidator]) -> list[NamedValidator]:
    """Validator flags built (RecipeError for a bad one), or the list build_validators made already."""
    if all(isinstance(v, NamedValidator) for v in validators):
        return list(validators)
    return build_validators(validators)


def metric_names(named: Sequence[NamedValidator], *, generations: bool = True, losses: bool = False) -> list[str]:
    """The metrics an evaluation computes, in report order: losses (with a model), then matches and validators."""
    names = list(LOSS_METRICS) if losses else []
    if generations:
        names += [*BUILT_IN_METRICS, *(n for v in named for n in ((v.label, "adherence") if v.is_vocabulary
                                                                 else (v.label,)))]
    return names


@dataclass
class SystemOutput:
    """What one system gave on the data rows, in their order."""

    label: str                  # what the table and the sentences call it
    source: str                 # the outputs file, or the checkpoint that generated
    generations: list[str | None] | None        # None for a row not generated (no prompt); None: no generation
    losses: list[tuple[float, int, int] | None] | None = None   # (summed loss in nats, tokens, bytes) per row
    loss_note: str = ""         # why a row has no loss (e.g. longer than the model's window)


def assemble_result(data: str, records: Sequence[Record], named: Sequence[NamedValidator], tuned: SystemOutput,
                    baseline: SystemOutput | None = None, *, targets: Mapping[str, float] | None = None,
                    compare_losses: bool = True, loss_reason: str = "", resamples: int = 10_000, seed: int = 0,
                    level: float = 0.95) -> EvalResult:
    """Score the systems' outputs and losses on `records`, compare them, judge `targets` (checked already).

    compare_losses: False when the two systems' token ids differ (other tokenizers, or another
    rendering): loss and perplexity per token are then not compared (`loss_reason` says why), bits
    per byte still are."""
    options = dict(resamples=resamples, seed=seed, level=level)
    columns, scores = _columns(records, named, tuned)
    names = (tuned.label, baseline.label if baseline is not None else "baseline")
    result = EvalResult(data, tuned.source, None if baseline is None else baseline.source, len(records),
                        {name: summarize(c, **options) for name, c in columns.items()},
                        {name: c.title for name, c in columns.items()}, names=names, level=level)
    result.notes = _unjudged_notes(columns, tuned.label if baseline is not None else "")
    rows = [_row(i, r, tuned, scores[i - 1]) for i, r in enumerate(records, 1)]
    if baseline is not None:
        if (tuned.generations is None) != (baseline.generations is None) or (
                tuned.generations is not None and
                [g is None for g in tuned.generations] != [g is None for g in baseline.generations]):
            raise ValueError("both systems must have generated on the same rows")
        base_columns, base_scores = _columns(records, named, baseline)
        result.baseline_metrics = {name: summarize(c, **options) for name, c in base_columns.items()}
        result.comparisons = []
        for name, column in columns.items():
            if name not in base_columns:
                continue
            if name in ("loss", "ppl") and not compare_losses:
                result.comparisons.append(
                    {"metric": name, "kind": column.kind, "tuned": result.metrics[name]["value"],
                     "baseline": result.baseline_metrics[name]["value"], "diff": None, "lo": None, "hi": None,
                     "p_value": None, "n": 0, "sentence": f"{column.title} is not compared: {loss_reason}; compare "
                                                          "bits per byte"})
                continue
            result.comparisons.append(compare_columns(column, base_columns[name], names=names, **options))
        result.notes += _unjudged_notes(base_columns, baseline.label)
        for row, s, i in zip(rows, base_scores, range(len(records))):
            row["baseline"] = _row(i + 1, records[i], baseline, s, own=True)
    result.rows = rows
    result.targets = judge_targets(targets or {}, result.metrics)
    return result


def _columns(records: Sequence[Record], named: Sequence[NamedValidator],
             system: SystemOutput) -> tuple[dict[str, Column], list[RowScore | None]]:
    """The system's metric columns (losses first) and each row's score (None: not generated)."""
    columns: dict[str, Column] = {}
    if system.losses is not None:
        columns.update(loss_columns(system.losses, system.loss_note))
    scores: list[RowScore | None] = [None] * len(records)
    if system.generations is not None:
        generated = [i for i, g in enumerate(system.generations) if g is not None]
        scored = score_rows([system.generations[i] for i in generated], [records[i].response for i in generated],
                            named)
        for i, score in zip(generated, scored):
            scores[i] = score
        columns.update(metric_columns(scored, named))
    return columns, scores


def _row(number: int, record: Record, system: SystemOutput, score: RowScore | None, own: bool = False) -> dict:
    """One line of rows.jsonl (`own`: the baseline's part of it)."""
    row: dict[str, Any] = {} if own else {"row": number, "source": record.location, "prompt": record.prompt,
                                          "reference": record.response}
    if system.generations is not None:
        row["generation"] = system.generations[number - 1]
        row.update(score.to_dict() if score is not None else {})
    if system.losses is not None:
        loss = system.losses[number - 1]
        row["loss"] = None if loss is None else {"loss": loss[0] / loss[1], "tokens": loss[1], "bytes": loss[2]}
    return row


def _unjudged_notes(columns: Mapping[str, Column], who: str) -> list[str]:
    out = []
    for c in columns.values():
        unjudged = len(c.values) - len(c.judged())
        # adherence shares purity's note; the rows left out of the losses get the run's own note
        if unjudged and c.name != "adherence" and c.name not in LOSS_METRICS:
            prefix = f"{who}: " if who else ""
            out.append(f"{prefix}{c.title}: {unjudged:,} of {len(c.values):,} rows could not be judged "
                       f"({c.first_unjudged})")
    return out
