"""Per-row scores of generations against references, and their summary with intervals.

    validators = build_validators(["dot", "vocabulary:path=limn/vocabulary.json"])
    rows = score_rows(generations, references, validators)     # one RowScore per row
    columns = metric_columns(rows, validators)                 # {"exact_match": Column, "dot": ..., ...}
    summarize(columns["dot"])                                  # {"value", "lo", "hi", "n", "k", ...}

Metrics (every one is a share between 0 and 1, higher is better):
- exact_match: the generation equals the reference once leading and trailing whitespace is
  removed from both (a model's trailing newline is not a mistake).
- normalized_match: equal after `normalize_answer` on both: case folded (str.casefold), every
  run of whitespace made one space, then quotes (" ' ` and curly quotes) removed from both
  ends and the punctuation . , ; : ! ? removed from the end, repeatedly, with whitespace
  stripped between rounds. So '  "The  Cat." ' and 'the cat' match; 'the cat?' and 'the
  cat!' match too, by design.
- one validity rate per validator (`--validate NAME`): the share of rows whose extracted
  candidate the validator accepts. Rows it cannot judge (ok None: Graphviz missing, a
  timeout, no words) are left out of the rate and counted as unjudged.
- with a `vocabulary` validator, user 1's two measures from its one word split: purity, the
  share of outputs with no word outside the vocabulary (the validator's ok), and adherence,
  the share of all output words that are in the vocabulary (a micro average: known words
  summed over rows / words summed over rows). Outputs with no words are left out of both.

Rates get a Wilson interval; adherence, a mean of words, a bootstrap interval over rows.

With a model (`fledge eval RUN`, fledge.evaluate.run) three more, each lower is better, from
per-row (summed loss in nats, target tokens, scored bytes):
- loss: the mean loss per target token, sum of losses / sum of tokens over the rows (token
  weighted: a long answer counts for its tokens, not as one row);
- ppl: perplexity, exp(loss);
- bpb: bits per byte, sum of losses / (sum of UTF-8 bytes of the scored text x ln 2): the same
  quantity per byte of text instead of per token, so runs with different tokenizers compare.
Their intervals are bootstrap intervals over rows of the same ratio of sums (ppl: its exp).

Validator flags: `NAME[:key=value,...]`, e.g. `dot`, `sql:dialect=postgres`,
`vocabulary:path=limn/vocabulary.json,words=["qry","ctx"]`, or a user function
`pkg.module:function[:key=value,...]`. A comma starts a new option only when `key=` follows
it. Values are text, converted to the type of the option's default (true/false, integers,
numbers); a value starting with [ or { is read as JSON.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fledge.data.check import resolve_validator, validate_texts
from fledge.errors import RecipeError
from fledge.evaluate.stats import bootstrap_interval, ratio_of_sums, wilson_interval
from fledge.validators import VALIDATORS, Validator, Verdict

BUILT_IN_METRICS = ("exact_match", "normalized_match")
VOCABULARY_METRICS = ("purity", "adherence")
LOSS_METRICS = ("loss", "ppl", "bpb")
TITLES = {"exact_match": "exact match", "normalized_match": "normalized match", "purity": "purity",
          "adherence": "adherence", "loss": "loss (nats/token)", "ppl": "perplexity", "bpb": "bits per byte"}
# Column kinds: "rate" (pass/fail per row), "ratio" (a micro average, higher is better), "loss" (a
# micro average, lower is better) and "perplexity" (exp of a loss). Only rates and ratios are shares.
LOWER_IS_BETTER_KINDS = ("loss", "perplexity")
SHARE_KINDS = ("rate", "ratio")

_FLAG = re.compile(r"(?P<name>[A-Za-z_][\w.-]*(?::[A-Za-z_]\w*)?)(?::(?P<options>.*))?", re.DOTALL)
_OPTION_START = re.compile(r",\s*(?=[A-Za-z_]\w*\s*=)")   # a comma that starts the next key=value
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
_END_PUNCTUATION = ".,;:!?"
_SPACE = re.compile(r"\s+")


# --- validators -------------------------------------------------------------------------------

@dataclass(frozen=True)
class NamedValidator:
    """A validator with the metric name it reports under (its name, or its whole flag if repeated)."""

    label: str
    spec: str
    validator: Validator | None      # None: planned only (plan_validators), not built

    @property
    def is_vocabulary(self) -> bool:
        return self.spec.split(":", 1)[0] == "vocabulary"


def parse_validator_flag(text: str) -> tuple[str, dict]:
    """`NAME[:key=value,...]` -> (validator name, options); see the module docstring."""
    text = str(text).strip()
    match = _FLAG.fullmatch(text)
    if not match:
        if "=" in text and ":" not in text.split("=", 1)[0]:
            raise RecipeError(f"--validate {text!r}: eval always validates the generation, so name only the "
                              f"validator, e.g. --validate {text.split('=', 1)[1].strip() or 'dot'}")
        raise RecipeError(f"--validate {text!r}: write NAME[:key=value,...], e.g. dot, sql:dialect=postgres or "
                          "vocabulary:path=words.txt")
    name, rest = match.group("name"), match.group("options")
    head = name.split(":", 1)[0]
    if ":" in name and head in VALIDATORS:
        raise RecipeError(f"--validate {text!r}: write options as key=value after the name, e.g. "
                          f"{head}:{name.split(':', 1)[1]}=VALUE")
    options: dict[str, Any] = {}
    defaults = _option_defaults(name)
    for part in _OPTION_START.split(rest) if rest and rest.strip() else []:
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"--validate {text!r}: write options as key=value after the name, e.g. "
                              f"{name}:key=value")
        options[key] = _option_value(value.strip(), defaults.get(key), f"--validate {text!r}: option {key}")
    return name, options


def _option_defaults(name: str) -> dict[str, Any]:
    factory = VALIDATORS.get(name)
    if factory is None:
        return {}
    return {p: spec.default for p, spec in inspect.signature(factory).parameters.items()
            if spec.default is not inspect.Parameter.empty}


def _option_value(value: str, default: Any, where: str) -> Any:
    if value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{where}: {value!r} starts like JSON but is not ({e.msg})") from None
    if isinstance(default, bool):
        if value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise RecipeError(f"{where}: {value!r} is not true or false")
    if isinstance(default, (int, float)):
        try:
            return type(default)(value)
        except ValueError:
            raise RecipeError(f"{where}: {value!r} is not a {type(default).__name__}") from None
    return value


def build_validators(specs: Sequence[str]) -> list[NamedValidator]:
    """Validators from flags, each with a unique metric name; every problem is raised here, before scoring."""
    return [NamedValidator(label, spec, resolve_validator(name, options))
            for spec, name, options, label in _plan_validators(specs)]


def plan_validators(specs: Sequence[str]) -> list[NamedValidator]:
    """The validators `build_validators` would build, with their metric names, but not built: no code
    is imported and no file read (validator None). For checking metric names, e.g. a recipe's
    eval.targets, where the validators may not be built here. RecipeError as build_validators."""
    return [NamedValidator(label, spec, None) for spec, _, _, label in _plan_validators(specs)]


def _plan_validators(specs: Sequence[str]) -> list[tuple[str, str, dict, str]]:
    """(flag, validator name, options, metric name) per flag; syntax and names checked."""
    parsed = [(str(spec).strip(), *parse_validator_flag(spec)) for spec in specs]
    names = [name for _, name, _ in parsed]
    if names.count("vocabulary") > 1:
        raise RecipeError("--validate vocabulary is given twice; purity and adherence come from one vocabulary. "
                          "Merge the word lists into one file, or add words with words=[...]")
    out, labels = [], set()
    for spec, name, options in parsed:
        label = "purity" if name == "vocabulary" else (name if names.count(name) == 1 else spec)
        if label in labels:
            raise RecipeError(f"--validate {spec!r} is given twice")
        if label in BUILT_IN_METRICS:
            raise RecipeError(f"--validate {spec!r}: {label!r} is the name of a built-in metric; register the "
                              "validator under another name")
        labels.add(label)
        out.append((spec, name, options, label))
    return out


# --- one row ----------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """Case folded, whitespace collapsed, quotes and end punctuation stripped (module docstring)."""
    text = _SPACE.sub(" ", text.casefold()).strip()
    while True:
        stripped = text.strip(_QUOTES).rstrip(_END_PUNCTUATION).strip()
        if stripped == text:
            return text
        text = stripped


def exact_match(generation: str, reference: str) -> bool:
    return generation.strip() == reference.strip()


def normalized_match(generation: str, reference: str) -> bool:
    return normalize_answer(generation) == normalize_answer(reference)


@dataclass
class RowScore:
    """The scores of one generation: the two matches and each validator's verdict by label."""

    exact_match: bool
    normalized_match: bool
    verdicts: dict[str, Verdict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"exact_match": self.exact_match, "normalized_match": self.normalized_match,
                "validators": {label: verdict_dict(v) for label, v in self.verdicts.items()}}


def verdict_dict(verdict: Verdict) -> dict:
    """A verdict as JSON: ok, the extracted candidate, the message; score and details where given."""
    out = {"ok": verdict.ok, "extracted": verdict.extracted, "message": verdict.message}
    if verdict.score is not None:
        out["score"] = verdict.score
    if verdict.details:
        out["details"] = verdict.details
    return out


def score_rows(generations: Sequence[str], references: Sequence[str],
               validators: Sequence[NamedValidator]) -> list[RowScore]:
    """One RowScore per generation; validators run batched (validate_many) where they can."""
    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations for {len(references)} references")
    rows = [RowScore(exact_match(g, r), normalized_match(g, r)) for g, r in zip(generations, references)]
    for named in validators:
        for row, verdict in zip(rows, validate_texts(named.validator, list(generations)), strict=True):
            row.verdicts[named.label] = verdict
    return rows


# --- columns and summaries ----------------------------------------------------------------------

@dataclass
class Column:
    """One metric over every row: a pass rate (bool or None per row), or a ratio, loss or perplexity
    ((numerator, denominator) or None per row; see the kinds above)."""

    name: str
    title: str
    kind: str                    # "rate", "ratio", "loss" or "perplexity"
    values: list
    first_unjudged: str = ""     # the message of the first row that could not be judged
    denominator: str = ""        # what the denominators count ("tokens", "bytes"), summed in the summary

    def judged(self) -> list[int]:
        return [i for i, v in enumerate(self.values) if v is not None]

    @property
    def higher_is_better(self) -> bool:
        return self.kind not in LOWER_IS_BETTER_KINDS

    @property
    def statistic(self):
        """The bootstrap statistic of a non-rate column: the ratio of sums (perplexity: its exp)."""
        return exp_ratio_of_sums if self.kind == "perplexity" else ratio_of_sums


def exp_ratio_of_sums(values: np.ndarray) -> np.ndarray:
    """exp(sum of losses / sum of tokens): perplexity, (resamples, rows, 2) -> (resamples,).
    Past about exp(709) it is infinite (null in JSON), never silently capped."""
    with np.errstate(over="ignore"):
        return np.exp(ratio_of_sums(values))


def loss_columns(per_row: Sequence[tuple[float, int, int] | None], reason: str = "") -> dict[str, Column]:
    """loss, ppl and bpb from per-row (summed loss in nats, target tokens, scored bytes); None: not scored
    (`reason` says why, e.g. longer than the model's window)."""
    pairs = [None if r is None else (r[0], r[1]) for r in per_row]
    per_byte = [None if r is None or not r[2] else (r[0] / math.log(2), r[2]) for r in per_row]
    return {"loss": Column("loss", TITLES["loss"], "loss", pairs, reason, "tokens"),
            "ppl": Column("ppl", TITLES["ppl"], "perplexity", pairs, reason, "tokens"),
            "bpb": Column("bpb", TITLES["bpb"], "loss", per_byte, reason, "bytes")}


def metric_columns(rows: Sequence[RowScore], validators: Sequence[NamedValidator]) -> dict[str, Column]:
    """Every metric's per-row values, in report order: matches, then each validator."""
    columns = {name: Column(name, TITLES[name], "rate", [getattr(r, name) for r in rows])
               for name in BUILT_IN_METRICS}
    for named in validators:
        verdicts = [r.verdicts[named.label] for r in rows]
        unjudged = next((v.message for v in verdicts if v.ok is None), "")
        title = "purity" if named.is_vocabulary else f"{named.label} validity"
        columns[named.label] = Column(named.label, title, "rate", [v.ok for v in verdicts], unjudged)
        if named.is_vocabulary:
            columns["adherence"] = Column("adherence", "adherence", "ratio",
                                          [_word_counts(v) for v in verdicts], unjudged)
    return columns


def _word_counts(verdict: Verdict) -> tuple[int, int] | None:
    n_words = verdict.details.get("n_words", 0)
    return (verdict.details["n_known"], n_words) if n_words else None


def summarize(column: Column, *, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """{"value", "lo", "hi", "n", "k" (rates), "tokens" or "bytes" (losses), "kind", "unjudged"}; value
    None when no row was judged."""
    judged = [column.values[i] for i in column.judged()]
    out: dict[str, Any] = {"value": None, "lo": None, "hi": None, "n": len(judged)}
    if column.kind == "rate":
        out["k"] = sum(judged)
        if judged:
            out["value"] = out["k"] / len(judged)
            out["lo"], out["hi"] = wilson_interval(out["k"], len(judged), level)
    elif judged:
        value, lo, hi = bootstrap_interval(np.array(judged, dtype=np.float64), statistic=column.statistic,
                                           n=resamples, seed=seed, level=level)
        out.update(value=value, lo=lo, hi=hi)
    if column.denominator:
        out[column.denominator] = int(sum(v[1] for v in judged))
    out["kind"] = column.kind
    out["unjudged"] = len(column.values) - len(judged)
    return out


def close_name(name: str, known: Sequence[str]) -> str:
    """" did you mean 'x'?" or ""."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""
