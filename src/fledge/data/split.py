"""Merge sources with deduplication, and split them into train and validation without leakage.

    report = merge(["a.jsonl", "b.json"], "merged.jsonl", MergeOptions(dedupe="near"))
    report = split(["merged.jsonl"], "train.jsonl", "val.jsonl",
                   SplitOptions(ratio=0.9, seed=1, stratify="metadata.type", group="@file"))
    print(report.summary())        # counts, achieved ratio, per-stratum shares, leakage after

or `fledge data merge ...` / `fledge data split ...`. Both read their sources twice: the first
pass keeps per row only a key, a MinHash signature and small integer ids (group, stratum); the
second writes the rows. Memory grows with rows, not with files or row length.

A split never puts copies on both sides: rows with identical text, near duplicates (when the
near index is on) and rows sharing a `group` value form one unit, and units are assigned
whole. `stratify` keeps each value's share of rows the same on both sides (to within one unit).
Leakage is measured again on the written split and reported.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fledge.data.dedupe import DuplicateIndex, NearOptions, connected_components, leakage_between
from fledge.data.records import (OUTPUT_FORMATS, FieldMap, RowProblem, dump_row, expand_sources, read_records,
                                 refuse_non_finite)
from fledge.data.sources import refuse_overwrite
from fledge.errors import DataError
from fledge.files import atomic_open
from fledge.recipe import option, section

BATCH = 8192


@dataclass
class MergeOptions:
    dedupe: str = option("exact", "drop repeated rows: none, exact (identical text) or near (also MinHash "
                                  "near duplicates)", choices=("none", "exact", "near"))
    near: NearOptions = section(NearOptions, "how near duplicates are found")
    to: str = option("keep", "row shape written: keep (as read) or a format", choices=OUTPUT_FORMATS)
    input_field: str = option("", "field holding the input (default: detected per row)")
    output_field: str = option("", "field holding the output (default: detected per row)")
    drop_invalid: bool = option(False, "skip rows that fit no format (and report them) instead of failing")


@dataclass
class SplitOptions(MergeOptions):
    ratio: float = option(0.9, "share of rows for training; the rest is validation", min=0.0, max=1.0)
    seed: int = option(1, "seed of the split")
    stratify: str = option("", "field whose values keep their share on both sides, e.g. metadata.type")
    group: str = option("", "field whose rows stay on one side together, e.g. metadata.file; @file: the "
                            "source file")
    keep_near_together: bool = option(True, "near duplicates (MinHash) stay on one side even when not dropped")


@dataclass
class MergeReport:
    sources: list[str]
    read: int = 0
    invalid: list[RowProblem] = field(default_factory=list)
    exact_dropped: int = 0
    near_dropped: int = 0
    written: int = 0
    per_source: dict[str, list[int]] = field(default_factory=dict)   # source -> [read, kept]

    def summary(self) -> str:
        files = f"{len(self.sources)} file{'s' if len(self.sources) != 1 else ''}"
        text = (f"{self.written:,} rows written from {self.read:,} read in {files}; dropped "
                f"{self.exact_dropped:,} exact and {self.near_dropped:,} near duplicates")
        if self.invalid:
            text += f" and {len(self.invalid):,} invalid rows (first: {self.invalid[0]})"
        return text


@dataclass
class SplitReport(MergeReport):
    train: int = 0
    val: int = 0
    units: int = 0
    strata: dict[str, list[int]] = field(default_factory=dict)    # value -> [train, val]
    val_asked: int = 0
    groups: int = 0
    missing_group: int = 0
    leaked_exact: int = 0
    leaked_near: int | None = None

    def summary(self) -> str:
        share = self.train / max(1, self.train + self.val)
        lines = [MergeReport.summary(self),
                 f"train {self.train:,}, val {self.val:,} ({share:.1%} / {1 - share:.1%}) in {self.units:,} units"
                 + (f" from {self.groups:,} groups" if self.groups else "")]
        if abs(self.val - self.val_asked) > max(1, 0.02 * (self.train + self.val)):
            lines.append(f"warning: validation has {self.val:,} rows where {self.val_asked:,} were asked; groups, "
                         f"copies and near duplicates are kept whole, so units this large cannot split finer")
        if self.missing_group:
            lines.append(f"warning: {self.missing_group:,} rows have no group value; each is its own group")
        if self.strata:
            lines.append("stratum                       train      val   val share")
            for value, (t, v) in self.strata.items():
                lines.append(f"  {value:<26} {t:>8,} {v:>8,}   {v / max(1, t + v):6.1%}")
        near = "not checked" if self.leaked_near is None else f"{self.leaked_near:,}"
        lines.append(f"leakage after the split: {self.leaked_exact:,} exact, {near} near")
        return "\n".join(lines)


def _key_of(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _first_pass(sources: list[Path], options: MergeOptions, near: NearOptions | None, report: MergeReport,
                extra: tuple[str, ...] = ()) -> tuple[DuplicateIndex, list[list]]:
    """Index every row; collect the values of `extra` fields per row."""
    index = DuplicateIndex(near)
    values: list[list] = [[] for _ in extra]
    fields = FieldMap(options.input_field, options.output_field)
    texts: list[str] = []
    for path in sources:
        read = 0
        for record in read_records([path], fields, options.drop_invalid, report.invalid):
            read += 1
            texts.append(record.text)
            for column, name in zip(values, extra):
                column.append(_key_of(record.get(name)))
            if len(texts) >= BATCH:
                index.add(texts)
                texts = []
        report.per_source[str(path)] = [read, 0]
        report.read += read
    if texts:
        index.add(texts)
    return index, values


def _write(sources: list[Path], options: MergeOptions, destinations: np.ndarray, outputs: list[str | Path],
           report: MergeReport) -> list[int]:
    """Second pass: row i goes to outputs[destinations[i]] (-1: dropped). Returns rows per output."""
    fields = FieldMap(options.input_field, options.output_field)
    written = [0] * len(outputs)
    row = 0
    with contextlib.ExitStack() as stack:   # every output is replaced together, or none is
        handles = [stack.enter_context(atomic_open(out)) for out in outputs]
        for path in sources:
            for record in read_records([path], fields, options.drop_invalid, None):
                d = destinations[row] if row < len(destinations) else -1
                row += 1
                if d < 0:
                    continue
                handles[d].write(dump_row(record.to_format(options.to), outputs[d], written[d] + 1))
                written[d] += 1
                report.per_source[str(path)][1] += 1
        if row != len(destinations):
            raise DataError(f"the sources changed while being read ({len(destinations):,} rows, then {row:,}); "
                            f"run again when nothing writes to them.")
    return written


def merge(sources: Iterable[str | Path], output: str | Path, options: MergeOptions | None = None) -> MergeReport:
    """Concatenate sources into one JSONL file, dropping duplicates as `options.dedupe` asks."""
    options = options or MergeOptions()
    refuse_non_finite(options, "merge options")
    paths = expand_sources(sources)
    refuse_overwrite([("output", output)], paths)
    report = MergeReport([str(p) for p in paths])
    index, _ = _first_pass(paths, options, options.near if options.dedupe == "near" else None, report)
    keep, _ = _kept(index, options, report)
    report.written = _write(paths, options, np.where(keep, 0, -1), [output], report)[0]
    return report


def _kept(index: DuplicateIndex, options: MergeOptions, report: MergeReport) -> tuple[np.ndarray, Any]:
    """Which rows survive deduplication, and the Duplicates found (None when not looked for)."""
    if options.dedupe == "none" or index.size == 0:
        return np.ones(index.size, dtype=bool), None
    found = index.find()
    report.exact_dropped = found.n_exact
    report.near_dropped = found.n_near if options.dedupe == "near" else 0
    keep = found.exact_of < 0
    if options.dedupe == "near":
        keep &= found.near_of < 0
    return keep, found


def assign_split(n: int, ratio: float, seed: int, links: list[np.ndarray] = (),
                 strata: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(is_val per row, number of units). Rows joined by any `links` array (rows with the same
    nonnegative label are linked) form one unit and land on one side. Strata keep their shares."""
    pairs = []
    for labels in links:
        labels = np.asarray(labels)
        rows = np.flatnonzero(labels >= 0)
        if len(rows):
            _, first, inverse = np.unique(labels[rows], return_index=True, return_inverse=True)
            pairs.append(np.stack([rows[first][inverse.reshape(-1)], rows], axis=1))
    unit = connected_components(n, np.concatenate(pairs) if pairs else np.empty((0, 2), dtype=np.int64))
    unit_ids, unit_of_row, sizes = np.unique(unit, return_inverse=True, return_counts=True)
    unit_of_row = unit_of_row.reshape(-1)
    stratum_of_unit = (strata[unit_ids] if strata is not None else np.zeros(len(unit_ids), dtype=np.int64))
    want_val = n - round(n * ratio)
    values, per_stratum = np.unique(stratum_of_unit, return_inverse=True)
    rows_in = np.bincount(per_stratum.reshape(-1), weights=sizes, minlength=len(values))
    targets = _largest_remainder(rows_in * (1 - ratio), want_val)
    rng = random.Random(seed)
    is_val_unit = np.zeros(len(unit_ids), dtype=bool)
    for s in range(len(values)):
        members = np.flatnonzero(per_stratum.reshape(-1) == s).tolist()
        rng.shuffle(members)
        left = targets[s]
        for u in members:
            if left <= 0:
                break
            if sizes[u] <= left:
                is_val_unit[u] = True
                left -= sizes[u]
    return is_val_unit[unit_of_row], len(unit_ids)


def _largest_remainder(exact: np.ndarray, total: int) -> list[int]:
    base = np.floor(exact).astype(int)
    short = int(total - base.sum())
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - base[i]), i))
    for i in order[:max(0, short)]:
        base[i] += 1
    return base.tolist()


def split(sources: Iterable[str | Path], train_out: str | Path, val_out: str | Path,
          options: SplitOptions | None = None) -> SplitReport:
    """Merge and deduplicate the sources, split them, write both sides, check leakage after."""
    options = options or SplitOptions()
    refuse_non_finite(options, "split options")
    paths = expand_sources(sources)
    refuse_overwrite([("training output", train_out), ("validation output", val_out)], paths)
    report = SplitReport([str(p) for p in paths])
    want_near = options.dedupe == "near" or options.keep_near_together
    extra = tuple(f for f in (options.stratify, options.group) if f)
    index, values = _first_pass(paths, options, options.near if want_near else None, report, extra)
    column = dict(zip(extra, values))
    keep, found = _kept(index, options, report)
    rows = np.flatnonzero(keep)
    # labels per kept row; rows with equal labels are linked (a row's own number: no link yet)
    found = found if found is not None else index.find()
    everyone = np.arange(index.size)
    links = [np.where(found.exact_of >= 0, found.exact_of, everyone)[rows]]
    if want_near:
        links.append(np.where(found.near_of >= 0, found.near_of, everyone)[rows])
    strata = None
    if options.group:
        group_values = [column[options.group][r] for r in rows.tolist()]
        ids = {v: i for i, v in enumerate(dict.fromkeys(v for v in group_values if v is not None))}
        report.groups = len(ids)
        report.missing_group = sum(v is None for v in group_values)
        links.append(np.array([ids[v] if v is not None else -1 for v in group_values], dtype=np.int64))
    if options.stratify:
        strata_values = ["(missing)" if v is None else v for v in (column[options.stratify][r] for r in rows.tolist())]
        names = list(dict.fromkeys(strata_values))
        ids = {v: i for i, v in enumerate(names)}
        strata = np.array([ids[v] for v in strata_values], dtype=np.int64)
    is_val, report.units = assign_split(len(rows), options.ratio, options.seed, links, strata)
    report.val_asked = len(rows) - round(len(rows) * options.ratio)
    destinations = np.full(index.size, -1, dtype=np.int64)
    destinations[rows] = is_val.astype(np.int64)
    report.train, report.val = _write(paths, options, destinations, [train_out, val_out], report)
    report.written = report.train + report.val
    if strata is not None:
        counts = Counter(zip(strata.tolist(), is_val.tolist()))
        report.strata = {name: [counts[(i, False)], counts[(i, True)]] for i, name in enumerate(names)}
    report.leaked_exact, report.leaked_near = leakage_between(index, rows[~is_val], rows[is_val])
    return report
