"""Synthetic training rows from templates with slots: exactly the count asked for, or why not.

    spec = load_synth_spec("recipes/data/cypher-synth.yaml")
    result = synthesize(spec)            # raises DataError when `count` cannot be reached
    write_jsonl(result.rows, "synth.jsonl"); print(result.summary())

or `fledge data synth recipes/data/cypher-synth.yaml -o synth.jsonl`. A spec names slots
(inline lists or files with one value per line), templates that use them as `{slot}` (a second,
independent value of the same slot is `{slot#2}`; literal braces such as Cypher maps stay as
they are, `{{`/`}}` force them), per-template weights and categories, optional chains (steps
whose templates may use `{prev}`, the previous step's output), a target count and a seed.

Each template's space is the product of its slots' sizes. Rows are drawn without replacement
from those spaces in proportion to the weights; a template whose space runs out hands its share
to the others. Rows are unique by (input, output). Optional validators reject rows (a DOT
output that does not parse); rejected rows are replaced by new draws while any space is left.
"""

from __future__ import annotations

import difflib
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from fledge.data.check import resolve_validator, validate_texts, verdict_ok
from fledge.data.records import Record, non_finite_problems
from fledge.errors import DataError
from fledge.recipe import _build, load_config, option

SLOT = re.compile(r"\{\{|\}\}|\{([A-Za-z_]\w*)(?:#(\d+))?\}")
FORMATS = ("io", "alpaca", "chat", "prompt_completion", "text")
SHUFFLED_SPACE = 1_000_000  # spaces up to this size are drawn from a full shuffled permutation


@dataclass
class StepSpec:
    input: str = option("", "input template of this step; may use {prev}")
    output: str = option("", "output template of this step; may use {prev}")


@dataclass
class TemplateSpec:
    name: str = option("", "template name, written to metadata.template")
    category: str = option("", "category, written to metadata.type; empty: the name")
    weight: float = option(1.0, "share of the rows relative to the other templates' weights", min=0.0)
    input: str = option("", "input template, e.g. 'Find all {label} nodes'")
    output: str = option("", "output template, e.g. 'MATCH (n:{label}) RETURN n'")
    steps: list = option([], "a chain instead of input/output: steps sharing slot values; the row's input is "
                             "the first step's input, its output the steps' outputs joined")
    join: str = option("\n", "text between chain step outputs")


@dataclass
class ValidateSpec:
    field: str = option("output", "which part of a row to validate", choices=("input", "output"))
    validator: str = option("", "validator name (dot, cypher, sql, json, python, regex, vocabulary) or "
                                "'package.module:function'")
    options: dict = option({}, "keyword options of the validator")


@dataclass
class SynthSpec:
    count: int = option(1000, "rows to make; all unique", min=1)
    seed: int = option(1, "seed of every draw")
    format: str = option("io", "row shape written", choices=FORMATS)
    instruction: str = option("", "alpaca: the instruction field; chat: the system message; io, "
                                  "prompt_completion, text: the prompt's first paragraph (empty: none)")
    drop_identity: bool = option(True, "replace rows whose input equals their output (nothing to learn)")
    allow_fewer: bool = option(False, "write what can be made when fewer than count unique valid rows exist, "
                                      "instead of failing")
    slots: dict = option({}, "slot name -> list of values, or {file: path} (one value per line; .json: a list)")
    templates: list = option([], "templates: mappings with name, category, weight, input, output or steps")
    validate: list = option([], "validators rows must pass: mappings with field, validator, options")
    output: str = option("", "JSONL file to write (the CLI's -o)")


@dataclass
class _Template:
    spec: TemplateSpec
    refs: list[tuple[str, str]]   # distinct (slot, draw) pairs in order of first use
    sizes: list[int]

    @property
    def space(self) -> int:
        return math.prod(self.sizes)


@dataclass
class Synth:
    """A validated spec: templates with their slot references, slot values."""

    spec: SynthSpec
    slots: dict[str, list[str]]
    templates: list[_Template]
    steps: dict[str, list[StepSpec]]
    checks: list[ValidateSpec]
    warnings: list[str] = field(default_factory=list)


def load_synth_spec(source: str | Path | dict) -> Synth:
    """Validate a synth spec; every problem (unknown keys with the closest name, unknown slots,
    unreadable slot files) is reported together."""
    holder: dict = {}

    def finish(spec: SynthSpec, problems: list[str]) -> None:
        holder["synth"] = _resolve(spec, problems)
    load_config(SynthSpec, source, "synth spec", finish)
    return holder["synth"]


def _resolve(spec: SynthSpec, problems: list[str]) -> Synth:
    slots, warnings = {}, []
    for name, values in spec.slots.items():
        loaded = _slot_values(name, values, problems)
        unique = list(dict.fromkeys(loaded or []))
        if loaded and len(unique) < len(loaded):
            warnings.append(f"slot {name} lists {len(loaded) - len(unique)} repeated values; each counts once")
        if loaded == []:
            problems.append(f"slots.{name} has no values")
        slots[name] = unique
    templates, steps = [], {}
    if not spec.templates:
        problems.append("templates is empty; add at least one template with input and output")
    names = set()
    for i, raw in enumerate(spec.templates):
        where = f"templates[{i}]"
        t = _build(TemplateSpec, raw, f"{where}.", problems)
        problems.extend(non_finite_problems(t, f"{where}."))
        t.name = t.name or f"template{i + 1}"
        t.category = t.category or t.name
        if t.name in names:
            problems.append(f"{where}.name {t.name!r} is used twice; give each template its own name")
        names.add(t.name)
        chain = [_build(StepSpec, s, f"{where}.steps[{k}].", problems) for k, s in enumerate(t.steps)]
        if chain and (t.input or t.output):
            problems.append(f"{where} has both steps and input/output; a chain's rows come from its steps")
        if not chain and not t.output:
            problems.append(f"{where}.output is empty; every template needs an output (or steps)")
        if t.steps and len(chain) < 2:
            problems.append(f"{where}.steps has {len(chain)} step; a chain needs at least 2")
        texts = [(f"{where}.input", t.input), (f"{where}.output", t.output)] + [
            (f"{where}.steps[{k}].{part}", getattr(s, part)) for k, s in enumerate(chain) for part in ("input", "output")]
        refs: list[tuple[str, str]] = []
        for key, text in texts:
            for slot, draw in _refs(text):
                if slot == "prev" and chain:
                    continue
                if slot not in slots:
                    close = difflib.get_close_matches(slot, list(slots), n=1)
                    problems.append(f"{key} uses {{{slot}}}, which is not a slot" + (
                        f"; did you mean {{{close[0]}}}?" if close else f"; slots: {', '.join(slots) or 'none'}"))
                elif (slot, draw) not in refs:
                    refs.append((slot, draw))
        templates.append(_Template(t, refs, [len(slots.get(s, [])) for s, _ in refs]))
        steps[t.name] = chain
    if templates and not any(t.spec.weight > 0 for t in templates):
        problems.append("every template has weight 0; give at least one a positive weight")
    checks = [_build(ValidateSpec, v, f"validate[{i}].", problems) for i, v in enumerate(spec.validate)]
    for i, c in enumerate(checks):
        if not c.validator:
            problems.append(f"validate[{i}].validator is empty; name a validator such as dot or cypher")
    return Synth(spec, slots, templates, steps, checks, warnings)


def _slot_values(name: str, values: object, problems: list[str]) -> list[str] | None:
    """The values of one slot, or None when they cannot be read (the problem is recorded)."""
    if isinstance(values, list):
        bad = [v for v in values if isinstance(v, (dict, list)) or v is None]
        if bad:
            problems.append(f"slots.{name} values must be text or numbers, got {bad[0]!r}")
        return [str(v) for v in values if v not in bad]
    if isinstance(values, dict) and set(values) == {"file"}:
        path = Path(str(values["file"]))
        if not path.is_file():
            problems.append(f"slots.{name}.file {path} " + ("is not a regular file" if path.exists() else
                            "does not exist (paths count from the working directory)"))
            return None
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(f"slots.{name}.file {path}: not valid JSON ({e.msg} at line {e.lineno})")
                return None
            if not isinstance(data, list):
                problems.append(f"slots.{name}.file {path} must hold a JSON list of values")
                return None
            return [str(v) for v in data]
        return [line.strip() for line in text.split("\n") if line.strip()]  # not splitlines: U+2028 is text
    problems.append(f"slots.{name} must be a list of values or {{file: path}}, got {values!r}")
    return None


def _refs(template: str) -> Iterator[tuple[str, str]]:
    for m in SLOT.finditer(template):
        if m.group(1):
            yield m.group(1), m.group(2) or ""


def _render(template: str, values: dict[tuple[str, str], str], prev: str = "") -> str:
    def sub(m: re.Match) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        key = (m.group(1), m.group(2) or "")
        if key == ("prev", ""):
            return prev
        return values[key]
    return SLOT.sub(sub, template)


def slot_files(synth: Synth) -> list[Path]:
    """The files the spec's slots read their values from."""
    return [Path(str(v["file"])) for v in synth.spec.slots.values() if isinstance(v, dict) and "file" in v]


def template_space(synth: Synth) -> dict[str, int]:
    """Distinct rows each template can make (before duplicates across templates and validators)."""
    return {t.spec.name: t.space for t in synth.templates}


def allocate(total: int, weights: list[float], capacity: list[int]) -> list[int]:
    """Split `total` in proportion to weights (largest remainder), no share above its capacity."""
    shares = [0] * len(weights)
    open_ = [i for i, w in enumerate(weights) if w > 0 and capacity[i] > 0]
    left = total
    while left > 0 and open_:
        w = sum(weights[i] for i in open_)
        exact = {i: left * weights[i] / w for i in open_}
        give = {i: int(exact[i]) for i in open_}
        rest = left - sum(give.values())
        for i in sorted(open_, key=lambda i: (-(exact[i] - give[i]), i))[:rest]:
            give[i] += 1
        left = 0
        for i in list(open_):
            room = capacity[i] - shares[i]
            take = min(give[i], room)
            shares[i] += take
            left += give[i] - take
            if shares[i] >= capacity[i]:
                open_.remove(i)
    return shares


def _index_stream(space: int, rng: random.Random) -> Iterator[int]:
    """Distinct indexes of [0, space) in random order."""
    if space <= SHUFFLED_SPACE:
        order = np.random.default_rng(rng.getrandbits(64)).permutation(space)
        for start in range(0, space, 4096):
            yield from order[start:start + 4096].tolist()
        return
    seen: set[int] = set()
    while len(seen) < space:
        i = rng.randrange(space)
        if i not in seen:
            seen.add(i)
            yield i


@dataclass
class SynthResult:
    rows: list[dict]
    requested: int
    space: dict[str, int]
    made: Counter                 # rows kept per template
    duplicates: int = 0           # draws whose text another draw already had
    identity: int = 0             # draws whose input equals their output (replaced)
    rejected: Counter = field(default_factory=Counter)     # per validator
    unjudged: Counter = field(default_factory=Counter)     # validator could not judge (kept)
    categories_asked: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def categories_made(self) -> dict[str, float]:
        counts: Counter = Counter(r["metadata"]["type"] for r in self.rows)
        return {c: counts[c] / max(1, len(self.rows)) for c in self.categories_asked}

    def shortfall(self) -> str:
        per = ", ".join(f"{k} {v:,}" for k, v in self.space.items())
        text = (f"asked for {self.requested:,} rows but made {len(self.rows):,}: the templates hold "
                f"{sum(self.space.values()):,} distinct rows ({per})")
        if self.duplicates:
            text += f", {self.duplicates:,} came out the same as another row"
        if self.identity:
            text += f", {self.identity:,} had input == output"
        for name, n in self.rejected.items():
            text += f", the {name} validator rejected {n:,}"
        return text

    def summary(self) -> str:
        lines = [f"{len(self.rows):,} rows (asked {self.requested:,}); template space "
                 f"{sum(self.space.values()):,}; replaced {self.duplicates:,} repeated draws and {self.identity:,} "
                 f"with input == output"]
        for name, n in self.rejected.items():
            judged = self.unjudged.get(name, 0)
            lines.append(f"validator {name}: rejected {n:,}" + (f", could not judge {judged:,} (kept)" if judged else ""))
        lines.append("category      asked   made")
        made = self.categories_made
        for c, share in self.categories_asked.items():
            lines.append(f"  {c:<12}{share:6.1%} {made.get(c, 0):6.1%}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def synthesize(synth: Synth, count: int | None = None, seed: int | None = None) -> SynthResult:
    """Make `count` unique rows (default: the spec's), or raise DataError saying why not."""
    spec = synth.spec
    count = spec.count if count is None else count
    seed = spec.seed if seed is None else seed
    if count < 1:
        raise DataError(f"count is {count}; it must be at least 1 (the number of rows to make).")
    space = template_space(synth)
    weights = [t.spec.weight for t in synth.templates]
    total_weight = sum(weights)
    asked: dict[str, float] = {}
    for t in synth.templates:
        asked[t.spec.category] = asked.get(t.spec.category, 0.0) + t.spec.weight / total_weight
    result = SynthResult([], count, space, Counter(), categories_asked=asked, warnings=list(synth.warnings))
    reachable = sum(s for t, s in zip(synth.templates, space.values()) if t.spec.weight > 0)
    if reachable < count and not spec.allow_fewer:
        per = ", ".join(f"{k} {v:,}" for k, v in space.items())
        raise DataError(f"asked for {count:,} rows but the templates can make at most {reachable:,} distinct rows "
                        f"({per}). Add slot values or templates, lower count, or set allow_fewer: true.")
    validators = [(c, resolve_validator(c.validator, c.options)) for c in synth.checks]
    for c in synth.checks:
        result.rejected[c.validator] += 0  # listed in the report even when it rejects nothing
    streams = {t.spec.name: _index_stream(t.space, random.Random(f"{seed}:{i}:{t.spec.name}"))
               for i, t in enumerate(synth.templates)}
    exhausted: set[str] = set()
    seen: set[tuple[str, str]] = set()
    kept: dict[str, list[dict]] = {t.spec.name: [] for t in synth.templates}
    drawn: Counter = Counter()
    while (made := sum(map(len, kept.values()))) < count:
        room = [0 if t.spec.name in exhausted else t.space - drawn[t.spec.name] for t in synth.templates]
        targets = allocate(count - made, weights, room)
        if not any(targets):
            break
        for t, want in zip(synth.templates, targets):
            if want:
                _fill(synth, t, want, streams[t.spec.name], seen, kept[t.spec.name], validators, result,
                      exhausted, drawn)
    rows = [r for t in synth.templates for r in kept[t.spec.name]]
    random.Random(f"{seed}:order").shuffle(rows)
    result.rows = rows
    for t in synth.templates:
        result.made[t.spec.name] = len(kept[t.spec.name])
    made = result.categories_made
    for category, share in asked.items():
        if made.get(category, 0.0) < share - 0.01:
            small = [f"{t.spec.name} holds {t.space:,}" for t in synth.templates if t.spec.category == category]
            result.warnings.append(f"category {category} got {made.get(category, 0.0):.1%} of rows instead of "
                                   f"{share:.1%} ({'; '.join(small)}); add slot values to its templates")
    if len(rows) < count and not spec.allow_fewer:
        raise DataError(result.shortfall() + ". Add slot values or templates, lower count, or set allow_fewer: true "
                        "to write what can be made.")
    if len(rows) < count:
        result.warnings.append(result.shortfall())
    return result


def _fill(synth: Synth, t: _Template, want: int, stream: Iterator[int], seen: set, out: list[dict],
          validators: list, result: SynthResult, exhausted: set, drawn: Counter) -> None:
    """Draw from t's space until `want` more rows are kept or the space runs out."""
    goal = len(out) + want
    while len(out) < goal:
        batch = []
        for index in stream:
            drawn[t.spec.name] += 1
            row = _make_row(synth, t, index)
            key = (row["_in"], row["_out"])
            if synth.spec.drop_identity and row["_in"].strip() == row["_out"].strip():
                result.identity += 1
                continue
            if key in seen:
                result.duplicates += 1
                continue
            seen.add(key)
            batch.append(row)
            if len(batch) >= goal - len(out):
                break
        if not batch:
            exhausted.add(t.spec.name)
            return
        ok = [True] * len(batch)
        for check, validator in validators:
            texts = [r["_in"] if check.field == "input" else r["_out"] for r in batch]
            verdicts = validate_texts(validator, texts)
            for k, v in enumerate(verdicts):
                judged = verdict_ok(v)
                if judged is None:
                    result.unjudged[check.validator] += 1
                elif not judged and ok[k]:
                    ok[k] = False
                    result.rejected[check.validator] += 1
        out.extend(_finish_row(synth, r) for r, good in zip(batch, ok) if good)


def _make_row(synth: Synth, t: _Template, index: int) -> dict:
    values = {}
    for (slot, draw), size in zip(t.refs, t.sizes):
        index, digit = divmod(index, size)
        values[(slot, draw)] = synth.slots[slot][digit]
    chain = synth.steps[t.spec.name]
    metadata = {"type": t.spec.category, "template": t.spec.name}
    if chain:
        prev, outputs, first_input = "", [], ""
        for k, step in enumerate(chain):
            step_input = _render(step.input, values, prev)
            prev = _render(step.output, values, prev)
            outputs.append(prev)
            first_input = first_input if k else step_input
        metadata["chain_length"] = len(chain)
        return {"_in": first_input, "_out": t.spec.join.join(outputs), "metadata": metadata}
    return {"_in": _render(t.spec.input, values), "_out": _render(t.spec.output, values), "metadata": metadata}


def _finish_row(synth: Synth, row: dict) -> dict:
    """The row in the spec's format, written by `Record.to_format` like every other writer: the
    instruction is alpaca's "instruction", chat's system message, and the prompt's first paragraph
    in the formats without a system role."""
    record = Record.pair(row["_in"], row["_out"], row["metadata"], system=synth.spec.instruction)
    return record.to_format(synth.spec.format)
