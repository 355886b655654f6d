"""Check training files before a run: schema, duplicates, leakage, lengths, balance, validity.

    report = check(["train.jsonl"], CheckConfig(tokenizer="runs/x/data", max_length=128,
                                                category_field="metadata.type"), val=["val.jsonl"])
    print(report.format())          # errors and warnings apart, every bad row as file:line
    report.ok                       # False when any error (exit code 1 from the CLI)

or `fledge data check train.jsonl --val val.jsonl --tokenizer runs/x/data --max-length 128`.
Files are read one at a time and one row at a time; per row only a 64-bit key, its place and
(for near duplicates) a 64 x 16-bit MinHash signature are kept, so a million short rows take
minutes and a few hundred megabytes however many files hold them.

What is an error and what a warning is set by thresholds (`max_duplicate_rate`, ...): a count
above its threshold is an error, a nonzero count at or below it a warning.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fledge.data.dedupe import DuplicateIndex, NearOptions, cross_duplicates, exact_keys
from fledge.data.records import (FieldMap, Record, RowProblem, expand_sources, non_finite_problems, refuse_non_finite,
                                 scan_file)
from fledge.errors import DataError, DependencyError, FledgeError
from fledge.recipe import load_config, option, section

BATCH = 8192
LISTED_PROBLEMS = 10_000   # schema problems kept for --json; all are counted


@dataclass
class CheckConfig:
    input_field: str = option("", "field holding the input (default: detected per row)")
    output_field: str = option("", "field holding the output (default: detected per row)")
    near_duplicates: bool = option(True, "look for near duplicates (MinHash LSH) besides exact ones")
    near: NearOptions = section(NearOptions, "how near duplicates are found")
    max_invalid_rows: int = option(0, "rows that fit no format allowed before it is an error", min=0)
    max_duplicate_rate: float = option(0.01, "share of rows repeating an earlier row, above which it is an error",
                                       min=0.0, max=1.0)
    max_near_duplicate_rate: float = option(1.0, "share of rows nearly repeating another, above which it is an "
                                                 "error (default: only a warning; templated data is often near)",
                                            min=0.0, max=1.0)
    max_identity_rate: float = option(0.01, "share of rows whose input equals their output, above which it is "
                                            "an error", min=0.0, max=1.0)
    max_leakage_rate: float = option(0.0, "share of validation rows found verbatim in training, above which it "
                                          "is an error", min=0.0, max=1.0)
    max_near_leakage_rate: float = option(0.05, "share of validation rows nearly repeating a training row, above "
                                                "which it is an error", min=0.0, max=1.0)
    tokenizer: str = option("", "tokenizer to measure lengths with: a fledge tokenizer file or folder, or a "
                                "Hugging Face tokenizer folder (local only); empty: characters")
    max_length: int = option(0, "training max length; longer rows would be truncated (0: no check)", min=0)
    max_truncated_rate: float = option(0.0, "share of rows over max_length, above which it is an error",
                                       min=0.0, max=1.0)
    category_field: str = option("", "field whose values are counted for balance, e.g. metadata.type")
    min_category_share: float = option(0.01, "warn about categories below this share of rows", min=0.0, max=1.0)
    validators: list = option([], "validators: 'field=name' (output=cypher) or {field, validator, options}")
    min_valid_rate: float = option(0.95, "validator pass rate below which it is an error", min=0.0, max=1.0)
    histogram_bins: int = option(12, "bars in the length histogram", min=2, max=100)
    examples: int = option(5, "example rows shown per finding", min=0)
    strict: bool = option(False, "treat warnings as errors")


def load_check_config(source: str | Path | dict) -> CheckConfig:
    def finish(config: CheckConfig, problems: list[str]) -> None:
        for i, v in enumerate(config.validators):
            try:
                parse_validator_spec(v)
            except FledgeError as e:
                problems.append(f"validators[{i}]: {e}")
        problems.extend(non_finite_problems(config))
    return load_config(CheckConfig, source, "check config", finish)


@dataclass
class Finding:
    check: str
    level: str            # "error" or "warning"
    message: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    files: list[str]
    val_files: list[str]
    rows: int                       # readable training rows
    invalid: int                    # training rows that fit no format
    formats: dict[str, int]
    findings: list[Finding]
    stats: dict[str, Any]
    problems: list[str]             # every bad row as file:line (up to LISTED_PROBLEMS)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def finding(self, check: str) -> Finding | None:
        return next((f for f in self.findings if f.check == check), None)

    def count(self, check: str) -> int:
        found = self.finding(check)
        return found.count if found else 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["errors"] = [asdict(f) for f in self.errors]
        out["warnings"] = [asdict(f) for f in self.warnings]
        out["ok"] = self.ok
        del out["findings"]
        return out

    def format(self, examples: int = 5) -> str:
        fmts = ", ".join(f"{k} {v:,}" for k, v in sorted(self.formats.items()))
        head = (f"Checked {self.rows + self.invalid:,} rows in {len(self.files)} file"
                f"{'s' if len(self.files) != 1 else ''} ({fmts or 'no readable rows'})")
        if self.val_files:
            head += f" against {self.stats.get('val_rows', 0):,} validation rows in {len(self.val_files)} file" + (
                "s" if len(self.val_files) != 1 else "")
        lines = [head, ""]
        for title, items in (("Errors", self.errors), ("Warnings", self.warnings)):
            lines.append(f"{title} ({len(items)})" if items else f"{title}: none")
            for f in items:
                lines.append(f"  {'x' if f.level == 'error' else '!'} {f.message}")
                shown = f.examples[:examples]
                lines.extend(f"      {e}" for e in shown)
                if shown and f.count > len(shown):
                    lines.append(f"      ... and {f.count - len(shown):,} more (--json lists up to {LISTED_PROBLEMS:,})")
            lines.append("")
        lengths = self.stats.get("lengths")
        if lengths and lengths.get("count"):
            lines.append(f"Lengths in {lengths['unit']} of prompt + response: p50 {lengths['p50']:,}  "
                         f"p90 {lengths['p90']:,}  p99 {lengths['p99']:,}  max {lengths['max']:,}  "
                         f"mean {lengths['mean']:.1f}")
            lines.extend(histogram_lines(lengths["histogram"], lengths.get("max_length", 0)))
            lines.append("")
        cats = self.stats.get("categories")
        if cats:
            total = sum(cats["counts"].values())
            lines.append(f"Categories ({cats['field']}): {len(cats['counts'])} values")
            for value, n in list(cats["counts"].items())[:25]:
                lines.append(f"  {value:<28} {n:>9,}  {n / total:6.1%}")
            if len(cats["counts"]) > 25:
                lines.append(f"  ... {len(cats['counts']) - 25} more values")
            lines.append("")
        for name, v in self.stats.get("validators", {}).items():
            lines.append(f"Validator {name}: {v['passed']:,} passed, {v['failed']:,} failed, "
                         f"{v['unjudged']:,} not judged; pass rate {v['pass_rate']:.1%}")
        lines.append("OK" if self.ok else f"FAILED: {len(self.errors)} error{'s' if len(self.errors) != 1 else ''}")
        return "\n".join(lines)


def histogram_lines(histogram: list[list[int]], max_length: int = 0, width: int = 40) -> list[str]:
    peak = max((c for _, _, c in histogram), default=0) or 1
    digits = len(f"{histogram[-1][1]:,}") if histogram else 1
    out = []
    for lo, hi, n in histogram:
        bar = "#" * max(1 if n else 0, round(width * n / peak))
        mark = "  (over max length)" if max_length and lo > max_length else ""
        out.append(f"  {lo:>{digits},}-{hi:<{digits},} {bar:<{width}} {n:,}{mark}")
    return out


def length_histogram(lengths: np.ndarray, bins: int) -> list[list[int]]:
    """[[low, high, count], ...]: at most `bins` whole-number bins from the shortest to the longest."""
    if not len(lengths):
        return []
    low, top = int(lengths.min()), int(lengths.max())
    width = max(1, math.ceil((top - low + 1) / bins))
    counts = np.bincount((lengths - low) // width)
    return [[low + i * width, low + (i + 1) * width - 1, int(c)] for i, c in enumerate(counts)]


# --- validators and tokenizers -----------------------------------------------------------------

def parse_validator_spec(spec: str | dict) -> tuple[str, str, dict]:
    """'output=cypher' or {field, validator, options} -> (field, validator name, options)."""
    if isinstance(spec, dict):
        unknown = set(spec) - {"field", "validator", "options"}
        if unknown or "validator" not in spec:
            raise DataError(f"a validator entry has field, validator and options keys, got {sorted(spec)}")
        return str(spec.get("field", "output")), str(spec["validator"]), dict(spec.get("options") or {})
    field_name, sep, name = str(spec).partition("=")
    if not sep or not field_name.strip() or not name.strip():
        raise DataError(f"--validate {spec!r}: write FIELD=VALIDATOR, e.g. output=cypher or output=pkg.mod:func")
    return field_name.strip(), name.strip(), {}


def resolve_validator(name: str, options: dict | None = None) -> Any:
    """A validator from fledge.validators: a built-in name or a 'package.module:function' reference."""
    from fledge.validators import get_validator
    return get_validator(name, **(options or {}))


def verdict_ok(verdict: Any) -> bool | None:
    """True, False or None (cannot judge) from a Verdict or a plain bool."""
    if isinstance(verdict, bool) or verdict is None:
        return verdict
    return getattr(verdict, "ok")


def validate_texts(validator: Any, texts: list[str]) -> list:
    """One verdict per text, batched where the validator can."""
    if hasattr(validator, "validate_many"):
        return list(validator.validate_many(texts))
    return [validator(t) for t in texts]


def load_token_counter(path: str) -> Callable[[list[str]], list[int]]:
    """Token counts per text: a fledge tokenizer, else a Hugging Face tokenizer.json or local folder."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such tokenizer: {p}. Pass a tokenizer.json, tokenizer.model, or a folder holding "
                        f"one (a run's data folder, or a Hugging Face model folder).")
    reasons = []
    try:
        from fledge.tokenizer import load_tokenizer
        tok = load_tokenizer(p)
        return lambda texts: [len(ids) for ids in tok.encode_batch(texts)]
    except ImportError as e:
        reasons.append(f"fledge.tokenizer: {e}")
    except FledgeError as e:
        reasons.append(str(e))
    hf_file = p / "tokenizer.json" if p.is_dir() else p
    if hf_file.is_file() and hf_file.suffix == ".json":
        try:
            from tokenizers import Tokenizer
            hf = Tokenizer.from_file(str(hf_file))
            return lambda texts: [len(e.ids) for e in hf.encode_batch(texts, add_special_tokens=False)]
        except Exception as e:  # tokenizers raises plain Exception for a file it cannot parse
            reasons.append(f"tokenizers could not read {hf_file.name} ({type(e).__name__}: {e})")
    known = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")
    if p.is_dir() and not any((p / name).is_file() for name in known):
        have = sorted(x.name for x in p.iterdir())[:10]
        raise DataError(f"{p}: no tokenizer files ({', '.join(known)}); found {', '.join(have) or 'nothing'}. "
                        f"Pass a run's data folder (fledge prepare RECIPE makes one) or a Hugging Face model folder.")
    if p.is_dir():
        code = _custom_code(p)
        if code:
            raise DataError(f"{p}: this tokenizer needs its own Python code ({code}), and fledge does not run code "
                            f"from a model folder. Pass a folder with a tokenizer.json or tokenizer.model instead.")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DependencyError(f"{p}: reading this tokenizer folder needs transformers (pip install "
                                  f"transformers), or pass its tokenizer.json.") from None
        try:   # trust_remote_code=False: never run a folder's own code, never ask whether to
            auto = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
            return lambda texts: [len(ids) for ids in auto(texts, add_special_tokens=False)["input_ids"]]
        except (OSError, ValueError, KeyError, TypeError) as e:  # what transformers raises for a folder it cannot read
            reasons.append(f"transformers could not load it ({type(e).__name__}: {e})")
    first_lines = "; ".join(r.strip().splitlines()[0] for r in reasons if r.strip())
    raise DataError(f"{p}: cannot load a tokenizer ({first_lines}). Pass a tokenizer.json, tokenizer.model, or "
                    f"a folder holding one.")


def _custom_code(folder: Path) -> str:
    """Where a model folder asks for its own Python code (an auto_map entry), or ''."""
    for name in ("tokenizer_config.json", "config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue   # transformers reports an unreadable config itself
        if isinstance(config, dict) and config.get("auto_map"):
            return f"auto_map in {name}"
    return ""


# --- the check ---------------------------------------------------------------------------------

class _Side:
    """What is kept per row of the training (or validation) files."""

    def __init__(self, paths: list[Path], near: NearOptions | None):
        self.paths = paths
        self.index = DuplicateIndex(near)
        self.prompt_keys: list[np.ndarray] = []
        self.file_ids: list[np.ndarray] = []
        self.lines: list[np.ndarray] = []
        self.formats: Counter = Counter()
        self.problems: list[RowProblem] = []
        self.invalid = 0
        self.empty_files: list[str] = []

    def where(self, rows: np.ndarray) -> list[str]:
        """file:line of rows given by number."""
        if len(self.file_ids) > 1:
            self.file_ids, self.lines = [np.concatenate(self.file_ids)], [np.concatenate(self.lines)]
        return [f"{self.paths[self.file_ids[0][r]]}:{self.lines[0][r]}" for r in rows]

    def read(self, fields: FieldMap, on_batch: Callable[[list[Record]], None] | None) -> None:
        batch: list[Record] = []
        for file_id, path in enumerate(self.paths):
            before = self.index.size + len(batch) + self.invalid
            for item in scan_file(path, fields):
                if isinstance(item, RowProblem):
                    self.invalid += 1
                    if len(self.problems) < LISTED_PROBLEMS:
                        self.problems.append(item)
                    continue
                batch.append(item)
                if len(batch) >= BATCH:
                    self._flush(batch, file_id, on_batch)
                    batch = []
            self._flush(batch, file_id, on_batch)
            batch = []
            if self.index.size + self.invalid == before:
                self.empty_files.append(str(path))

    def _flush(self, batch: list[Record], file_id: int, on_batch: Callable | None) -> None:
        if not batch:
            return
        self.index.add([r.text for r in batch])
        self.prompt_keys.append(exact_keys([r.prompt for r in batch]))
        self.file_ids.append(np.full(len(batch), file_id, dtype=np.int32))
        self.lines.append(np.fromiter((r.line or 0 for r in batch), dtype=np.int32, count=len(batch)))
        self.formats.update(r.format for r in batch)
        if on_batch is not None:
            on_batch(batch)


class _Measures:
    """Per-batch measurements of training rows: identity, lengths, categories, validators."""

    def __init__(self, config: CheckConfig):
        self.config = config
        self.count_tokens = load_token_counter(config.tokenizer) if config.tokenizer else None
        self.validators = []
        for spec in config.validators:
            field_name, name, options = parse_validator_spec(spec)
            self.validators.append((f"{field_name}={name}", field_name, resolve_validator(name, options)))
        self.identity: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.categories: Counter = Counter()
        self.missing_category = 0
        self.validity: dict[str, Counter] = {key: Counter() for key, _, _ in self.validators}
        self.failures: dict[str, list[tuple[int, str]]] = {key: [] for key, _, _ in self.validators}
        self.seen = 0

    def __call__(self, batch: list[Record]) -> None:
        self.identity.append(np.fromiter((r.repeats_input for r in batch), dtype=bool, count=len(batch)))
        texts = [f"{r.prompt}\n{r.response}" if r.prompt else r.response for r in batch]
        counts = self.count_tokens(texts) if self.count_tokens else [len(t) for t in texts]
        self.lengths.append(np.asarray(counts, dtype=np.int64))
        if self.config.category_field:
            for r in batch:
                value = r.get(self.config.category_field)
                if value is None:
                    self.missing_category += 1
                else:
                    self.categories[str(value)] += 1
        for key, field_name, validator in self.validators:
            values = [r.get(field_name) for r in batch]
            texts = [v if isinstance(v, str) else "" for v in values]
            for i, verdict in enumerate(validate_texts(validator, texts)):
                ok = verdict_ok(verdict)
                self.validity[key]["unjudged" if ok is None else "passed" if ok else "failed"] += 1
                if ok is False and len(self.failures[key]) < 10_000:
                    message = " ".join(str(getattr(verdict, "message", "") or "invalid").split())
                    self.failures[key].append((self.seen + i, message[:160] + ("..." if len(message) > 160 else "")))
        self.seen += len(batch)


def check(paths: list[str | Path], config: CheckConfig | None = None,
          val: list[str | Path] | None = None) -> CheckReport:
    """Check training files (and validation files for leakage); see the module docstring."""
    config = config or CheckConfig()
    refuse_non_finite(config, "check config")
    fields = FieldMap(config.input_field, config.output_field)
    near = config.near if config.near_duplicates else None
    train = _Side(expand_sources(paths), near)
    measures = _Measures(config)
    train.read(fields, measures)
    findings: list[Finding] = []
    stats: dict[str, Any] = {}
    n = train.index.size

    def add(check_name: str, count: int, limit: float | None, message: str, examples: list[str],
            rate_of: int | None = None, warn_only: bool = False) -> None:
        if count <= 0:
            return
        base = n if rate_of is None else rate_of
        rate = count / max(1, base)
        too_many = limit is not None and (rate > limit if isinstance(limit, float) else count > limit)
        level = "error" if (too_many and not warn_only) or config.strict else "warning"
        if limit is not None and isinstance(limit, float):
            message += f" ({rate:.1%} of {base:,}" + (f"; limit {limit:.1%})" if limit < 1.0 else ")")
        findings.append(Finding(check_name, level, message, count, examples))

    add("schema", train.invalid, config.max_invalid_rows,
        f"{train.invalid:,} row{'s' if train.invalid != 1 else ''} fit no training format"
        + (f" (limit {config.max_invalid_rows})" if config.max_invalid_rows else ""),
        [str(p) for p in train.problems])
    if n + train.invalid == 0:
        add("no_rows", 1, 0, _no_rows_message(train.paths, "training"), [])
    else:
        for path in train.empty_files:
            add("empty_file", 1, None, f"{path} holds no rows", [], warn_only=True)
    if n:
        _duplicate_findings(train, config, add)
        identity = np.flatnonzero(np.concatenate(measures.identity))
        add("identity", len(identity), config.max_identity_rate,
            f"{len(identity):,} rows have input == output", train.where(identity[:LISTED_PROBLEMS]))
        stats["lengths"] = _length_stats(measures, config, add, train)
        if config.category_field:
            stats["categories"] = {"field": config.category_field,
                                   "counts": dict(measures.categories.most_common()),
                                   "missing": measures.missing_category}
            _category_findings(measures, config, add)
        stats["validators"] = _validator_findings(measures, config, add, train)
    if val:
        stats["val_rows"] = _leakage_findings(train, val, config, fields, near, add)
    return CheckReport([str(p) for p in train.paths], [str(v) for v in val or []], n, train.invalid,
                       dict(train.formats), findings, stats, [str(p) for p in train.problems])


def _no_rows_message(paths: list[Path], what: str) -> str:
    names = ", ".join(map(str, paths[:5])) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    return (f"no {what} rows: {names} hold{'s' if len(paths) == 1 else ''} no rows. Check the paths, or make rows "
            f"with fledge data extract, pairs or synth")


def _duplicate_findings(train: _Side, config: CheckConfig, add: Callable) -> None:
    listed = LISTED_PROBLEMS
    found = train.index.find()
    exact = np.flatnonzero(found.exact_of >= 0)
    keys = train.index.keys
    _, counts = np.unique(keys, return_counts=True)
    add("duplicates", len(exact), config.max_duplicate_rate,
        f"{len(exact):,} exact duplicate rows ({int((counts > 1).sum()):,} texts occur more than once, the most "
        f"{int(counts.max())} times)",
        [f"{a} repeats {b}" for a, b in zip(train.where(exact[:listed]), train.where(found.exact_of[exact[:listed]]))])
    if train.index.near is not None:
        near = np.flatnonzero(found.near_of >= 0)
        add("near_duplicates", len(near), config.max_near_duplicate_rate,
            f"{len(near):,} near-duplicate rows (Jaccard >= {config.near.threshold} on character "
            f"{config.near.ngram}-grams; exact copies not counted)",
            [f"{a} nearly repeats {b}" for a, b in zip(train.where(near[:listed]),
                                                       train.where(found.near_of[near[:listed]]))])


def _length_stats(measures: _Measures, config: CheckConfig, add: Callable, train: _Side) -> dict:
    listed = LISTED_PROBLEMS
    lengths = np.concatenate(measures.lengths)
    unit = "tokens" if measures.count_tokens else "characters"
    out = {"unit": unit, "count": int(len(lengths)), "mean": float(lengths.mean()), "max": int(lengths.max()),
           "max_length": config.max_length, "histogram": length_histogram(lengths, config.histogram_bins)}
    for q in (50, 90, 99):
        out[f"p{q}"] = int(np.percentile(lengths, q))
    if config.max_length:
        over = np.flatnonzero(lengths > config.max_length)
        out["truncated"] = int(len(over))
        add("truncation", len(over), config.max_truncated_rate,
            f"{len(over):,} rows are longer than max length {config.max_length} {unit} and would be truncated"
            + ("" if measures.count_tokens else " (measured in characters; pass --tokenizer for tokens)"),
            [f"{w} ({lengths[r]:,} {unit})" for w, r in zip(train.where(over[:listed]), over[:listed])])
    return out


def _category_findings(measures: _Measures, config: CheckConfig, add: Callable) -> None:
    if measures.missing_category:
        add("category_missing", measures.missing_category, None,
            f"{measures.missing_category:,} rows have no {config.category_field}", [], warn_only=True)
    total = sum(measures.categories.values())
    rare = [(v, c) for v, c in measures.categories.items() if c / total < config.min_category_share]
    if rare:
        add("category_balance", len(rare), None,
            f"{len(rare)} of {len(measures.categories)} {config.category_field} values are under "
            f"{config.min_category_share:.0%} of rows", [f"{v}: {c:,} rows ({c / total:.2%})" for v, c in rare],
            warn_only=True)


def _validator_findings(measures: _Measures, config: CheckConfig, add: Callable, train: _Side) -> dict:
    listed = LISTED_PROBLEMS
    out = {}
    for key, _, _ in measures.validators:
        v = measures.validity[key]
        judged = v["passed"] + v["failed"]
        rate = v["passed"] / judged if judged else 1.0
        out[key] = {"passed": v["passed"], "failed": v["failed"], "unjudged": v["unjudged"], "pass_rate": rate}
        rows = np.array([r for r, _ in measures.failures[key][:listed]], dtype=np.int64)
        examples = [f"{w}: {msg}" for w, (_, msg) in zip(train.where(rows), measures.failures[key])]
        if v["failed"]:
            add(f"validator:{key}", v["failed"], 1.0 - config.min_valid_rate,
                f"{v['failed']:,} rows fail validator {key} (pass rate {rate:.1%}, minimum {config.min_valid_rate:.0%})",
                examples, rate_of=judged)
        if v["unjudged"]:
            add(f"validator_unjudged:{key}", v["unjudged"], None,
                f"validator {key} could not judge {v['unjudged']:,} rows", [], warn_only=True)
    return out


def _leakage_findings(train: _Side, val_paths: list, config: CheckConfig, fields: FieldMap,
                      near: NearOptions | None, add: Callable) -> int:
    listed = LISTED_PROBLEMS
    val = _Side(expand_sources(val_paths), near)
    val.read(fields, None)
    add("val_schema", val.invalid, config.max_invalid_rows,
        f"{val.invalid:,} validation rows fit no training format", [str(p) for p in val.problems])
    m = val.index.size
    if m + val.invalid == 0:
        add("val_no_rows", 1, 0, _no_rows_message(val.paths, "validation"), [])
    if not m or not train.index.size:
        return m
    exact, close = cross_duplicates(train.index, val.index)
    leaked = np.flatnonzero(exact >= 0)
    add("leakage", len(leaked), config.max_leakage_rate,
        f"{len(leaked):,} validation rows also appear verbatim in training",
        [f"{a} is {b}" for a, b in zip(val.where(leaked[:listed]), train.where(exact[leaked[:listed]]))], rate_of=m)
    near_leaked = np.flatnonzero(close >= 0)
    if near is not None:
        add("near_leakage", len(near_leaked), config.max_near_leakage_rate,
            f"{len(near_leaked):,} validation rows nearly repeat a training row",
            [f"{a} ~ {b}" for a, b in zip(val.where(near_leaked[:listed]), train.where(close[near_leaked[:listed]]))],
            rate_of=m)
    train_prompts = np.concatenate(train.prompt_keys)
    val_prompts = np.concatenate(val.prompt_keys)
    empty = exact_keys([""])[0]
    same_prompt = np.flatnonzero(np.isin(val_prompts, train_prompts) & (exact < 0) & (val_prompts != empty))
    add("prompt_leakage", len(same_prompt), None,
        f"{len(same_prompt):,} validation inputs also appear in training (with another output)",
        val.where(same_prompt[:listed]), rate_of=m, warn_only=True)
    return m
