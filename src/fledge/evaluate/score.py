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
p-value, and a sentence in plain words. Targets compare a metric's value (the point estimate,
not an interval bound) with a threshold: at least the target, or at most for "ppl" and "loss".

summary.json is `EvalResult.to_dict()`:
    {"data", "outputs", "baseline", "n_rows", "names": [tuned, baseline], "level",
     "metrics": {name: {"value", "lo", "hi", "n", "k" (rates), "kind", "unjudged"}},
     "baseline_metrics": {...} or null,
     "targets": {name: {"target", "value", "met", "direction": "higher" | "lower"}},
     "comparisons": [{"metric", "tuned", "baseline", "diff", "lo", "hi", "p_value", "sentence", "n",
                      "tuned_k", "baseline_k", "tuned_only", "baseline_only" (rates)}],
     "rows_file"}
rows.jsonl has one line per data row: row (1-based), source (file:line), prompt, reference,
generation, exact_match, normalized_match, validators {name: {ok, extracted, message, score?,
details?}}, and with a baseline "baseline": {generation, exact_match, normalized_match,
validators}. A value is null where it cannot be computed (no row judged).
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
from fledge.evaluate.metrics import (BUILT_IN_METRICS, VOCABULARY_METRICS, Column, NamedValidator, build_validators,
                                     close_name, metric_columns, score_rows, summarize)
from fledge.evaluate.stats import compare_sentence, format_p, mcnemar_exact, paired_bootstrap, ratio_of_sums
from fledge.files import write_atomic
from fledge.validators import VALIDATORS

LOWER_IS_BETTER = {"ppl": "perplexity", "loss": "validation loss"}


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

    @property
    def targets_met(self) -> bool:
        """True when every target is met (also when there are none); a target not judged is not met."""
        return all(t["met"] is True for t in self.targets.values())

    def to_dict(self) -> dict:
        return _finite({"data": self.data, "outputs": self.outputs, "baseline": self.baseline, "n_rows": self.n_rows,
                        "names": list(self.names), "level": self.level, "metrics": self.metrics,
                        "baseline_metrics": self.baseline_metrics, "targets": self.targets,
                        "comparisons": self.comparisons, "notes": self.notes, "rows_file": self.rows_file})

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
        lines = [head + (f", {base} = {self.baseline}" if self.baseline else ""), ""]
        width = max([len("metric"), *map(len, self.titles.values())]) + 2
        level = f"{self.level:.0%}"
        header = (f"{'metric':<{width}}{tuned + f' % [{level} interval]':<34}"
                  + (f"{base} % [{level} interval]" if self.baseline_metrics else ""))
        lines.append(header.rstrip())
        for name, summary in self.metrics.items():
            row = f"{self.titles[name]:<{width}}{_cell(summary):<34}"
            if self.baseline_metrics:
                row += _cell(self.baseline_metrics[name])
            lines.append(row.rstrip())
        if self.comparisons:
            lines += ["", f"{'difference':<{width}}{f'{tuned} - {base}, points [{level}]':<34}p"]
            for c in self.comparisons:
                diff = ("n/a" if c["diff"] is None else
                        f"{_points(c['diff'])} [{_points(c['lo'])}, {_points(c['hi'])}]")
                p = "" if c["p_value"] is None else format_p(c["p_value"]).removeprefix("p ").removeprefix("= ")
                lines.append(f"{self.titles[c['metric']]:<{width}}{diff:<34}{p}".rstrip())
            lines += [""] + [c["sentence"] for c in self.comparisons]
        if self.targets:
            lines += ["", "targets"]
            for name, t in self.targets.items():
                sign = ">=" if t["direction"] == "higher" else "<="
                verdict = {True: "met", False: "MISSED", None: "not judged (no row judged)"}[t["met"]]
                value = "n/a" if t["value"] is None else _percent(t["value"])
                lines.append(f"{self.titles.get(name, name):<{width}}{value} {sign} {_percent(t['target'])}: {verdict}")
        if self.notes:
            lines += [""] + self.notes
        if self.rows_file:
            lines += ["", f"per-row results: {self.rows_file}"]
        return "\n".join(lines)


def _cell(summary: dict) -> str:
    if summary["value"] is None:
        return f"n/a ({summary['unjudged']:,} unjudged)"
    text = f"{_percent(summary['value'])} [{_percent(summary['lo'], False)}, {_percent(summary['hi'], False)}]"
    text = (f"{summary['k']}/{summary['n']} " if "k" in summary else f"n={summary['n']} ") + text
    return text + (f" +{summary['unjudged']} unjudged" if summary["unjudged"] else "")


def _percent(x: float | None, sign: bool = True) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}" + ("%" if sign else "")


def _points(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:+.1f}"


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
    problems = []
    for name, value in targets.items():
        if name in LOWER_IS_BETTER:
            problems.append(f"--target {name}: {LOWER_IS_BETTER[name]} needs a model, and scoring an outputs file "
                            "runs none; drop this target here")
        elif name not in metric_names:
            if name in VOCABULARY_METRICS:
                hint = " It comes from the vocabulary validator: add --validate vocabulary:path=WORDS_FILE."
            elif name in VALIDATORS or ":" in name:
                hint = f" Add --validate {name} to compute it."
            else:
                hint = close_name(name, metric_names)
            problems.append(f"--target {name}: this evaluation computes no metric {name!r}.{hint} Metrics here: "
                            f"{', '.join(metric_names)}")
        elif not isinstance(value, (int, float)) or not 0 <= value <= 1:
            hint = f"; did you mean {value / 100:g}?" if isinstance(value, (int, float)) and 1 < value <= 100 else ""
            problems.append(f"--target {name}={value}: {name} is a share between 0 and 1{hint}")
    if problems:
        raise RecipeError("; ".join(problems))
    return {name: float(value) for name, value in targets.items()}


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
    entry: dict[str, Any] = {"metric": tuned.name, "tuned": None, "baseline": None, "diff": None, "lo": None,
                             "hi": None, "p_value": None, "n": len(both)}
    if not both:
        entry["sentence"] = f"cannot compare {tuned.title}: no row was judged for both {names[0]} and {names[1]}"
        return entry
    a = np.array([tuned.values[i] for i in both], dtype=np.float64)
    b = np.array([baseline.values[i] for i in both], dtype=np.float64)
    if tuned.kind == "rate":
        diff, lo, hi = paired_bootstrap(a, b, n=resamples, seed=seed, level=level)
        baseline_only, tuned_only, p = mcnemar_exact(a.astype(bool).tolist(), b.astype(bool).tolist())
        k_a, k_b = int(a.sum()), int(b.sum())
        sentence = compare_sentence(tuned.title, (k_a, len(both)), (k_b, len(both)), p, names=names)
        entry.update(tuned=k_a / len(both), baseline=k_b / len(both), p_value=p, tuned_k=k_a, baseline_k=k_b,
                     tuned_only=tuned_only, baseline_only=baseline_only)
    else:
        diff, lo, hi = paired_bootstrap(a, b, statistic=ratio_of_sums, n=resamples, seed=seed, level=level)
        value_a, value_b = (float(ratio_of_sums(x[None])[0]) for x in (a, b))
        sentence = compare_sentence(tuned.title, value_a, value_b, interval=(lo, hi), names=names, level=level)
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
    named = (list(validators) if all(isinstance(v, NamedValidator) for v in validators)
             else build_validators(validators))
    metric_names = [*BUILT_IN_METRICS, *(n for v in named for n in ((v.label, "adherence") if v.is_vocabulary
                                                                   else (v.label,)))]
    checked_targets = check_targets(targets or {}, metric_names)
    if not field:
        raise RecipeError("--field is empty; name the outputs' field that holds the text (default: generation)")

    records = read_data(data_file, fields)
    references = [r.response for r in records]
    generations = read_outputs(outputs_file, records, field)
    baseline = read_outputs(baseline_file, records, field) if baseline_file is not None else None

    options = dict(resamples=resamples, seed=seed, level=level)
    scores = score_rows(generations, references, named)
    columns = metric_columns(scores, named)
    result = EvalResult(str(data_file), str(outputs_file), None if baseline_file is None else str(baseline_file),
                        len(records), {name: summarize(c, **options) for name, c in columns.items()},
                        {name: c.title for name, c in columns.items()}, names=names, level=level)
    result.notes = _unjudged_notes(columns, names[0] if baseline is not None else "")
    rows = [{"row": i, "source": r.location, "prompt": r.prompt, "reference": r.response, "generation": g,
             **s.to_dict()} for i, (r, g, s) in enumerate(zip(records, generations, scores), 1)]
    if baseline is not None:
        base_scores = score_rows(baseline, references, named)
        base_columns = metric_columns(base_scores, named)
        result.baseline_metrics = {name: summarize(c, **options) for name, c in base_columns.items()}
        result.comparisons = [compare_columns(columns[name], base_columns[name], names=names, **options)
                              for name in columns]
        result.notes += _unjudged_notes(base_columns, names[1])
        for row, text, s in zip(rows, baseline, base_scores):
            row["baseline"] = {"generation": text, **s.to_dict()}
    result.rows = rows
    result.targets = judge_targets(checked_targets, result.metrics)
    return result


def _unjudged_notes(columns: Mapping[str, Column], who: str) -> list[str]:
    out = []
    for c in columns.values():
        unjudged = len(c.values) - len(c.judged())
        if unjudged and c.name != "adherence":      # adherence shares purity's note
            prefix = f"{who}: " if who else ""
            out.append(f"{prefix}{c.title}: {unjudged:,} of {len(c.values):,} rows could not be judged "
                       f"({c.first_unjudged})")
    return out
