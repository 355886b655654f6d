"""Training pairs from extracted expressions, by named strategies.

    rows, report = make_pairs(read_expressions("expressions.jsonl"),
                              [CompletionStrategy(max_per_expression=2),
                               TemplateStrategy(input="int {x}", output="{x}", type="interpretation")],
                              seed=1)

or `fledge data pairs --spec recipes/data/limn-pairs.yaml`. Strategies (`STRATEGIES`):

    completion  prefix -> suffix, cut at word boundaries, at most N cuts per expression
    next        the previous k expressions of the same file -> the next one
    split       "query | response" -> query -> response, cut at a delimiter
    template    input and output templates over {x} (the expression), {context}, {file}, {line}

Rows are `{"input", "output", "metadata": {"type", "strategy", "file", "line"[, "context"]}}`.
The same seed gives the same rows; each strategy draws from its own seeded stream, so adding
one strategy leaves the rows of the others unchanged.
"""

from __future__ import annotations

import difflib
import random
import re
import string
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fledge.data.sources import Invalid, iter_raw_rows
from fledge.errors import DataError, RecipeError
from fledge.recipe import _build, load_config, option

TEMPLATE_FIELDS = ("x", "context", "file", "line")


@dataclass
class Expression:
    text: str
    file: str = ""
    line: int | None = None
    context: str = ""


@dataclass
class StrategyOptions:
    """Keys every strategy takes."""

    type: str = option("", "metadata.type of its rows; empty: the strategy's name")
    limit: int = option(0, "at most this many rows from this strategy, drawn at random; 0: all", min=0)


@dataclass
class CompletionStrategy(StrategyOptions):
    max_per_expression: int = option(2, "cuts per expression, drawn at random among its word boundaries", min=1)
    min_words: int = option(2, "skip expressions with fewer words", min=2)


@dataclass
class NextStrategy(StrategyOptions):
    context_size: int = option(2, "previous expressions of the same file given as context", min=1)
    min_context: int = option(1, "skip expressions with fewer previous ones", min=1)
    joiner: str = option(" | ", "text between context expressions")
    input: str = option("ctx {context} | qry nex", "input template; {context} is the joined previous ones")


@dataclass
class SplitStrategy(StrategyOptions):
    delimiter: str = option(" | ", "text that separates query and response")
    at: str = option("first", "cut at the first or the last delimiter", choices=("first", "last"))


@dataclass
class TemplateStrategy(StrategyOptions):
    input: str = option("int {x}", "input template over {x} (the expression), {context}, {file}, {line}")
    output: str = option("{x}", "output template, same fields; rows whose template uses {context} are "
                                "made only for expressions that have one")


@dataclass
class PairsConfig:
    inputs: list = option([], "expression files: extract output (.jsonl with text, file, line) or a JSON "
                              "array / object of {content, source_file, line_number, context}")
    output: str = option("", "JSONL file to write (the CLI's -o)")
    seed: int = option(1, "seed of every random choice")
    strategies: list = option([], "strategies to apply: each a mapping with `name` and its keys")
    dedupe: bool = option(True, "drop rows whose input and output repeat an earlier row")
    drop_identity: bool = option(True, "drop rows whose input equals their output (nothing to learn)")
    shuffle: bool = option(True, "shuffle the rows (seeded) instead of keeping strategy order")


def _completion(exprs: list[Expression], o: CompletionStrategy, rng: random.Random) -> list[tuple]:
    out = []
    for e in exprs:
        text = e.text.strip()
        gaps = [m.span() for m in re.finditer(r"\s+", text)]
        if len(gaps) + 1 < o.min_words:
            continue
        for start, end in sorted(rng.sample(gaps, min(o.max_per_expression, len(gaps)))):
            out.append((text[:start], text[end:], e))
    return out


def _next(exprs: list[Expression], o: NextStrategy, rng: random.Random) -> list[tuple]:
    by_file: dict[str, list[Expression]] = defaultdict(list)
    for e in exprs:
        by_file[e.file].append(e)
    out = []
    for file in sorted(by_file):
        ordered = sorted(by_file[file], key=lambda e: e.line or 0)
        for i in range(o.min_context, len(ordered)):
            context = o.joiner.join(p.text for p in ordered[max(0, i - o.context_size):i])
            out.append((o.input.format(context=context), ordered[i].text, ordered[i]))
    return out


def _split(exprs: list[Expression], o: SplitStrategy, rng: random.Random) -> list[tuple]:
    out = []
    for e in exprs:
        if o.delimiter not in e.text:
            continue
        left, _, right = e.text.partition(o.delimiter) if o.at == "first" else e.text.rpartition(o.delimiter)
        if left.strip() and right.strip():
            out.append((left.strip(), right.strip(), e))
    return out


def _template(exprs: list[Expression], o: TemplateStrategy, rng: random.Random) -> list[tuple]:
    needs_context = "context" in _placeholders(o.input) | _placeholders(o.output)
    out = []
    for e in exprs:
        if needs_context and not e.context:
            continue
        values = {"x": e.text, "context": e.context, "file": e.file, "line": e.line}
        out.append((o.input.format(**values), o.output.format(**values), e))
    return out


# name -> (options class, function): the one list of strategies
STRATEGIES: dict[str, tuple[type, Callable]] = {
    "completion": (CompletionStrategy, _completion),
    "next": (NextStrategy, _next),
    "split": (SplitStrategy, _split),
    "template": (TemplateStrategy, _template),
}


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


@dataclass
class PairsReport:
    made: Counter = field(default_factory=Counter)        # rows each strategy produced
    kept: Counter = field(default_factory=Counter)        # rows of each strategy written
    duplicates: int = 0
    identity: int = 0
    expressions: int = 0

    def summary(self) -> str:
        per = ", ".join(f"{k} {self.kept[k]:,}/{self.made[k]:,}" for k in self.made)
        return (f"{sum(self.kept.values()):,} rows from {self.expressions:,} expressions (kept/made: {per}); "
                f"dropped {self.duplicates:,} duplicates and {self.identity:,} rows with input == output")


def strategy_name(options: StrategyOptions) -> str:
    return next(name for name, (cls, _) in STRATEGIES.items() if type(options) is cls)


def make_pairs(expressions: list[Expression], strategies: list[StrategyOptions], seed: int = 1,
               dedupe: bool = True, drop_identity: bool = True, shuffle: bool = True) -> tuple[list[dict], PairsReport]:
    """Apply every strategy to the expressions; rows are tagged with their strategy."""
    report = PairsReport(expressions=len(expressions))
    rows: list[dict] = []
    seen: set[tuple[str, str]] = set()
    for index, options in enumerate(strategies):
        name = strategy_name(options)
        rng = random.Random(f"{seed}:{index}:{name}")
        made = STRATEGIES[name][1](expressions, options, rng)
        report.made[name] += len(made)
        if options.limit and len(made) > options.limit:
            made = [made[i] for i in sorted(rng.sample(range(len(made)), options.limit))]
        for prompt, response, e in made:
            if drop_identity and prompt.strip() == response.strip():
                report.identity += 1
                continue
            if dedupe:
                if (prompt, response) in seen:
                    report.duplicates += 1
                    continue
                seen.add((prompt, response))
            metadata = {"type": options.type or name, "strategy": name, "file": e.file, "line": e.line}
            if e.context:
                metadata["context"] = e.context
            rows.append({"input": prompt, "output": response, "metadata": metadata})
            report.kept[name] += 1
    if shuffle:
        random.Random(f"{seed}:shuffle").shuffle(rows)
    return rows, report


def read_expressions(path: str | Path, text_field: str = "") -> list[Expression]:
    """Expressions from extract output ({text, file, line, context}) or a raw corpus JSON
    ({"expressions": [{content, source_file, line_number, context}]})."""
    out = []
    for line, row in iter_raw_rows(path):
        if isinstance(row, Invalid):
            raise DataError(row.message + ". Fix the line.", path=str(path), line=line)
        if not isinstance(row, dict):
            raise DataError(f"an expression row is an object with a text field, not {type(row).__name__}",
                            path=str(path), line=line)
        key = text_field or next((k for k in ("text", "content", "expression") if k in row), "")
        if not key or not isinstance(row.get(key), str):
            raise DataError(f"no text field (tried {text_field or 'text, content, expression'}; the row has "
                            f"{', '.join(row) or 'no fields'}). Name it with --text-field.", path=str(path), line=line)
        out.append(Expression(row[key], str(row.get("file", row.get("source_file", path))),
                              row.get("line", row.get("line_number", line)), row.get("context") or ""))
    return out


def build_strategies(items: list, problems: list[str]) -> list[StrategyOptions]:
    """Validate `strategies:` items ({name: ..., keys}) into options objects, collecting problems."""
    built = []
    for i, item in enumerate(items):
        where = f"strategies[{i}]"
        if not isinstance(item, dict) or "name" not in item:
            problems.append(f"{where}: each strategy is a mapping with a name ({', '.join(STRATEGIES)})")
            continue
        name = item["name"]
        if name not in STRATEGIES:
            close = difflib.get_close_matches(str(name), list(STRATEGIES), n=1)
            problems.append(f"{where}.name {name!r} is not a strategy" + (f"; did you mean {close[0]}?" if close else "")
                            + f" Strategies: {', '.join(STRATEGIES)}")
            continue
        cls = STRATEGIES[name][0]
        options = _build(cls, {k: v for k, v in item.items() if k != "name"}, f"{where}.", problems)
        allowed = ("context",) if name == "next" else TEMPLATE_FIELDS
        for key in ("input", "output"):
            value = getattr(options, key, None)
            if not isinstance(value, str):
                continue
            try:
                unknown = _placeholders(value) - set(allowed)
            except ValueError as e:
                problems.append(f"{where}.{key} {value!r} is not a valid template ({e}); write literal "
                                f"braces as {{{{ and }}}}")
                continue
            if unknown:
                problems.append(f"{where}.{key} uses {', '.join('{' + u + '}' for u in sorted(unknown))}; "
                                f"its templates may use {', '.join('{' + a + '}' for a in allowed)}")
        built.append(options)
    return built


def load_pairs_config(source: str | Path | dict) -> PairsConfig:
    """A validated PairsConfig from a YAML spec (its strategies stay mappings; see `strategies_of`)."""
    def finish(config: PairsConfig, problems: list[str]) -> None:
        build_strategies(config.strategies, problems)
        if not config.strategies:
            problems.append(f"strategies is empty; name at least one of {', '.join(STRATEGIES)}")
    return load_config(PairsConfig, source, "pairs spec", finish)


def strategies_of(config: PairsConfig) -> list[StrategyOptions]:
    """The options objects of a validated config's strategies."""
    problems: list[str] = []
    built = build_strategies(config.strategies, problems)
    if problems:
        raise RecipeError("pairs spec: " + "; ".join(problems))
    return built


_OPTION_START = re.compile(r",\s*(?=[A-Za-z_]\w*\s*=)")   # a comma that starts the next key=value


def parse_strategy_flag(text: str) -> dict:
    """`completion:max_per_expression=3,type=comp` (the CLI's --strategy) -> a strategy mapping.

    Values are plain text, taken as written (`input=int {x}` keeps its braces, `joiner= | ` its
    spaces, and a comma not followed by `key=` stays in the value), except for the strategy's
    integer and true/false keys, which are converted.
    """
    name, _, rest = text.partition(":")
    item: dict = {"name": name.strip()}
    types = _option_types(item["name"])
    for part in _OPTION_START.split(rest) if rest.strip() else []:
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"--strategy {text!r}: write options as key=value, e.g. completion:max_per_expression=3")
        item[key] = _flag_value(value, types.get(key))
    return item


def _option_types(name: str) -> dict[str, type]:
    if name not in STRATEGIES:
        return {}   # build_strategies names the unknown strategy
    import typing
    return typing.get_type_hints(STRATEGIES[name][0])


def _flag_value(value: str, typ: type | None) -> object:
    """`value` converted for a known int or bool key; left as text when it does not convert, so the
    spec check reports it with the key's name."""
    if typ is int:
        try:
            return int(value.strip())
        except ValueError:
            return value
    if typ is bool and value.strip().lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
        return value.strip().lower() in ("true", "yes", "1", "on")
    return value
