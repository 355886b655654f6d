"""`fledge eval`: parsing and printing for scoring generations; the work is in fledge.evaluate.score.

    fledge eval --data val.jsonl --outputs tuned.jsonl [--baseline base.jsonl] [--validate dot]...
                [--target dot=0.9]... [--field generation] [-o OUT_DIR] [--json]

`register(subparsers)` adds the `eval` verb to the main parser. A positional RUN is reserved
for `fledge eval RUN --data FILE [--baseline BASE]`, where the run generates its outputs; that
is not built yet and says so.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from fledge.errors import FledgeError, RecipeError

EXIT_TARGET_MISSED = 3

EPILOG = """\
Outputs file: one JSON object per data row, in the same order, with the generated text in
"generation" (or --field): {"generation": "digraph { a -> b }"}. The reference is each data
row's response (its last assistant turn); any row format of `fledge data` is read.

Metrics: exact_match, normalized_match, one validity rate per --validate (NAME[:key=value,...],
e.g. dot, json, sql:dialect=postgres), and with --validate vocabulary:path=WORDS also purity and
adherence. Rates come with a Wilson 95% interval; adherence with a bootstrap interval. With
--baseline, each metric's difference gets a paired bootstrap 95% interval, pass rates an exact
McNemar p-value, and a sentence in plain words. See docs/evaluation.md.

Writes OUT_DIR/summary.json and OUT_DIR/rows.jsonl (default OUT_DIR: <outputs stem>.eval/ beside
the outputs file).

Exit status: 0 scored, every target met (or none given); 3 scored, but a target was missed or
could not be judged; 1 a data or file problem; 2 a bad option."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="score generations against references: matches, validity, vocabulary; "
                                           "compare with a baseline (paired bootstrap, McNemar)",
                              description="Score a file of generations against a data file's references, "
                                          "optionally against a baseline's generations on the same rows.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default=None,
                   help="a run to generate the outputs with (not built yet: pass --outputs)")
    p.add_argument("--data", required=True, metavar="FILE", help="data file whose rows were prompted (references)")
    p.add_argument("--outputs", default=None, metavar="FILE", help="generations, one JSON object per data row")
    p.add_argument("--baseline", default=None, metavar="FILE",
                   help="a baseline's generations for the same rows (same shape as --outputs)")
    p.add_argument("--field", default="generation", metavar="NAME",
                   help="field of the outputs files holding the text (default: generation)")
    p.add_argument("--validate", action="append", default=[], metavar="NAME[:key=value,...]",
                   help="validity rate by this validator: dot, cypher, sql, json, python, regex:pattern=..., "
                        "vocabulary:path=WORDS, or pkg.module:function (repeat)")
    p.add_argument("--target", action="append", default=[], metavar="NAME=VALUE",
                   help="a threshold to meet, e.g. dot=0.9 or purity=85%% (repeat; see exit status)")
    p.add_argument("-o", "--out-dir", default=None, metavar="DIR",
                   help="where summary.json and rows.jsonl go (default: <outputs stem>.eval/ beside the outputs)")
    p.add_argument("--name", default="tuned", help="what the outputs' system is called in the report")
    p.add_argument("--baseline-name", default="baseline", help="what the baseline is called in the report")
    p.add_argument("--input-field", default=None, metavar="NAME", help="data field holding the input "
                                                                       "(default: detected)")
    p.add_argument("--output-field", default=None, metavar="NAME", help="data field holding the reference "
                                                                        "(default: detected)")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's own generator (default: 0)")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    p.set_defaults(func=run_eval)


def parse_targets(flags: list[str]) -> dict[str, float]:
    """`NAME=VALUE` flags -> {name: value}; VALUE is a number, or a percentage such as 85%."""
    targets: dict[str, float] = {}
    for flag in flags:
        name, sep, text = flag.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name or not text:
            raise RecipeError(f"--target {flag!r}: write NAME=VALUE, e.g. dot=0.9 or purity=85%")
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise RecipeError(f"--target {flag!r}: {text!r} is not a number (e.g. 0.9 or 90%)") from None
        if not math.isfinite(value):
            raise RecipeError(f"--target {flag!r}: the value must be a finite number")
        if name in targets:
            raise RecipeError(f"--target {name} is given twice; give each target once")
        targets[name] = value
    return targets


def run_eval(args: argparse.Namespace) -> int:
    from fledge.data.records import FieldMap
    from fledge.data.sources import refuse_overwrite
    from fledge.evaluate.score import default_out_dir, score_outputs
    if args.run is not None:
        raise FledgeError(f"fledge eval {args.run}: generating outputs from a run is not built yet; generate them "
                          "first and pass --outputs FILE (one JSON object per data row, text in \"generation\").")
    if args.outputs is None:
        raise RecipeError("no outputs to score: pass --outputs FILE (one JSON object per data row, text in "
                          "\"generation\").")
    if args.resamples < 1:
        raise RecipeError(f"--resamples {args.resamples}: the bootstrap needs at least 1 resample (e.g. 10000)")
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir(args.outputs)
    if out_dir.exists() and not out_dir.is_dir():
        raise RecipeError(f"-o {out_dir} is a file; -o names a folder for summary.json and rows.jsonl.")
    inputs = [args.data, args.outputs] + ([args.baseline] if args.baseline else [])
    refuse_overwrite([("the summary file", out_dir / "summary.json"), ("the per-row file", out_dir / "rows.jsonl")],
                     inputs)
    result = score_outputs(args.data, args.outputs, field=args.field, validators=args.validate,
                           baseline_file=args.baseline, targets=parse_targets(args.target),
                           fields=FieldMap(args.input_field or "", args.output_field or ""),
                           names=(args.name, args.baseline_name), resamples=args.resamples, seed=args.seed)
    result.write(out_dir)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1, ensure_ascii=False))
    else:
        print(result.format())
    return 0 if result.targets_met else EXIT_TARGET_MISSED
