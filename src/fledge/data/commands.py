"""`fledge data ...`: parsing and printing for the data tools; the work is in the library modules.

    fledge data extract ROOT -o expressions.jsonl [--spec extract.yaml] [--include '*.md' ...]
    fledge data pairs expressions.jsonl -o pairs.jsonl [--spec pairs.yaml] [--strategy completion ...]
    fledge data synth spec.yaml -o synth.jsonl [--count N] [--seed S] [--space]
    fledge data check train.jsonl [--val val.jsonl] [--tokenizer DIR --max-length N] [--json]
    fledge data split SOURCES... --out-dir data/ [--ratio 0.9] [--stratify F] [--group F]
    fledge data merge SOURCES... -o merged.jsonl [--dedupe near]

`register(subparsers)` adds the `data` verb to the main parser. Each sub-verb's function takes
the parsed arguments and returns the exit code; user errors raise FledgeError for the caller
to print. Flags override the keys of a spec or config file (`--spec`, `--config`), and both
are validated by the same code as recipes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

from fledge.errors import DataError


def register(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="extract, pair, synthesize, check, split and merge training data",
                                 description=__doc__.split("\n\n")[1] if __doc__ else None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = data.add_subparsers(title="data commands", metavar="ACTION")
    data.set_defaults(func=lambda args: (data.print_help(), 0)[1])
    _add_extract(verbs)
    _add_pairs(verbs)
    _add_synth(verbs)
    _add_check(verbs)
    _add_split(verbs)
    _add_merge(verbs)


# --- helpers -------------------------------------------------------------------------------

def _configure(loader: Callable[[Any], Any], spec: str | None, flags: dict[str, Any]) -> Any:
    """Spec file (or defaults) with the given flags on top, validated once by `loader`."""
    raw: dict = dataclasses.asdict(loader(spec)) if spec else {}
    for key, value in flags.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return loader(raw)


def number(text: str) -> float:
    """argparse type of every rate and threshold flag: a finite number (NaN and inf are refused)."""
    value = float(text)   # ValueError: argparse says "invalid number value"
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _fields(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-field", default=None, metavar="NAME", help="field holding the input (default: detected)")
    p.add_argument("--output-field", default=None, metavar="NAME", help="field holding the output (default: detected)")


def _output(args: argparse.Namespace, configured: str, what: str) -> str:
    out = args.output or configured
    if not out:
        raise DataError(f"no output file: pass -o FILE.jsonl (or set output: in the {what}).")
    return out


# --- extract ------------------------------------------------------------------------------------

def _add_extract(verbs: Any) -> None:
    p = verbs.add_parser("extract", help="take files, lines, Markdown code blocks or Python definitions out of a "
                                         "folder into JSONL with file and line")
    p.add_argument("root", nargs="?", default=None, help="folder to walk (default: the spec's root)")
    p.add_argument("-o", "--output", default=None, help="JSONL file to write")
    p.add_argument("--spec", default=None, help="YAML extract spec (keys: fledge.data.extract.ExtractConfig)")
    p.add_argument("--include", action="append", default=None, metavar="GLOB", help="files to read (repeat)")
    p.add_argument("--exclude", action="append", default=None, metavar="GLOB", help="files or folders to skip")
    p.add_argument("--unit", default=None, choices=("auto", "file", "lines", "blocks", "python"),
                   help="what one row is (auto: Markdown blocks, Python definitions, else lines)")
    p.add_argument("--language", action="append", default=None, dest="languages",
                   help="fenced-block language to take (repeat; default: every block)")
    p.add_argument("--block-lines", action="store_true", default=None, help="one row per line of a fenced block")
    p.add_argument("--inline-code", action="store_true", default=None, help="also take `inline code` spans")
    p.add_argument("--keep", default=None, metavar="REGEX", help="keep only rows matching")
    p.add_argument("--drop", default=None, metavar="REGEX", help="drop rows matching")
    p.add_argument("--comment-prefix", action="append", default=None, dest="comment_prefixes",
                   help="lines starting with this are comments (repeat)")
    p.add_argument("--context-from-comments", action="store_true", default=None,
                   help="comment lines directly above a row become its context")
    p.add_argument("--no-dedupe", dest="dedupe", action="store_false", default=None, help="keep repeated rows")
    p.set_defaults(func=run_extract)


def run_extract(args: argparse.Namespace) -> int:
    from fledge.data.extract import extract, load_extract_config, walk_files
    from fledge.data.records import write_jsonl
    from fledge.data.sources import refuse_overwrite
    keys = ("include", "exclude", "unit", "languages", "block_lines", "inline_code", "keep", "drop",
            "comment_prefixes", "context_from_comments", "dedupe")
    config = _configure(load_extract_config, args.spec, {"root": args.root, **{k: getattr(args, k) for k in keys}})
    out = _output(args, config.output, "spec")
    refuse_overwrite([("-o", out)], (path for path, _ in walk_files(config.root, config.include, config.exclude)))
    result = extract(config)
    write_jsonl(result.rows, out)
    print(f"{out}: {result.summary()}")
    return 0


# --- pairs --------------------------------------------------------------------------------------

def _add_pairs(verbs: Any) -> None:
    p = verbs.add_parser("pairs", help="training pairs from extracted expressions by named strategies")
    p.add_argument("inputs", nargs="*", help="expression files (extract output, or a raw corpus JSON)")
    p.add_argument("-o", "--output", default=None, help="JSONL file to write")
    p.add_argument("--spec", default=None, help="YAML pairs spec (inputs, seed, strategies, ...)")
    p.add_argument("--strategy", action="append", default=None, metavar="NAME[:k=v,...]",
                   help="a strategy and its options, e.g. completion:max_per_expression=3 or "
                        "'template:input=int {x},type=interpretation' (repeat; replaces the spec's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--text-field", default="", help="field holding the expression (default: text or content)")
    p.add_argument("--keep-identity", dest="drop_identity", action="store_false", default=None,
                   help="keep rows whose input equals their output")
    p.add_argument("--no-dedupe", dest="dedupe", action="store_false", default=None, help="keep repeated rows")
    p.set_defaults(func=run_pairs)


def run_pairs(args: argparse.Namespace) -> int:
    from fledge.data.pairs import (load_pairs_config, make_pairs, parse_strategy_flag, read_expressions,
                                   strategies_of)
    from fledge.data.records import write_jsonl
    from fledge.data.sources import refuse_overwrite
    flags = {"seed": args.seed, "drop_identity": args.drop_identity, "dedupe": args.dedupe,
             "inputs": args.inputs or None,
             "strategies": [parse_strategy_flag(s) for s in args.strategy] if args.strategy else None}
    if not args.spec and not args.strategy:
        raise DataError("no strategies: pass --strategy NAME (completion, next, split, template) or --spec FILE.yaml.")
    config = _configure(load_pairs_config, args.spec, flags)
    strategies = strategies_of(config)
    if not config.inputs:
        raise DataError("no input files: pass expression files (extract output) or set inputs: in the spec.")
    out = _output(args, config.output, "spec")
    refuse_overwrite([("-o", out)], config.inputs + ([args.spec] if args.spec else []))
    expressions = [e for path in config.inputs for e in read_expressions(path, args.text_field)]
    rows, report = make_pairs(expressions, strategies, config.seed, config.dedupe, config.drop_identity,
                              config.shuffle)
    write_jsonl(rows, out)
    print(f"{out}: {report.summary()}")
    return 0


# --- synth --------------------------------------------------------------------------------------

def _add_synth(verbs: Any) -> None:
    p = verbs.add_parser("synth", help="unique rows from templates with slots: exactly --count, or why not")
    p.add_argument("spec", help="YAML synth spec (count, seed, slots, templates, validate)")
    p.add_argument("-o", "--output", default=None, help="JSONL file to write")
    p.add_argument("--count", type=int, default=None, help="rows to make (default: the spec's count)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--allow-fewer", action="store_true", default=None,
                   help="write what can be made when fewer unique valid rows exist")
    p.add_argument("--space", action="store_true", help="print each template's space and exit")
    p.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from fledge.data.records import write_jsonl
    from fledge.data.sources import refuse_overwrite
    from fledge.data.synthesize import load_synth_spec, slot_files, synthesize, template_space
    if args.count is not None and args.count < 1:
        raise DataError(f"--count {args.count}: count must be at least 1 (the number of rows to make).")
    synth = load_synth_spec(args.spec)
    if args.allow_fewer:
        synth.spec.allow_fewer = True
    if args.space:
        space = template_space(synth)
        for name, size in space.items():
            print(f"{name:<30} {size:>14,}")
        print(f"{'total':<30} {sum(space.values()):>14,}")
        return 0
    out = _output(args, synth.spec.output, "spec")
    refuse_overwrite([("-o", out)], [args.spec, *slot_files(synth)])
    result = synthesize(synth, count=args.count, seed=args.seed)
    write_jsonl(result.rows, out)
    print(f"{out}: {result.summary()}")
    return 0


# --- check --------------------------------------------------------------------------------------

_CHECK_RATES = ("max_duplicate_rate", "max_near_duplicate_rate", "max_identity_rate", "max_leakage_rate",
                "max_near_leakage_rate", "max_truncated_rate", "min_valid_rate")


def _add_check(verbs: Any) -> None:
    p = verbs.add_parser("check", help="schema, duplicates, leakage, lengths, balance and validity of training files")
    p.add_argument("files", nargs="+", help="training files (.jsonl, .json, .csv) or folders")
    p.add_argument("--val", action="append", default=None, metavar="FILE",
                   help="validation file to check for leakage against the training files (repeat for several)")
    p.add_argument("--config", default=None, help="YAML check config (keys: fledge.data.check.CheckConfig)")
    _fields(p)
    p.add_argument("--tokenizer", default=None, help="measure lengths in this tokenizer's tokens (a fledge "
                                                     "tokenizer, or a local Hugging Face tokenizer folder)")
    p.add_argument("--max-length", type=int, default=None, help="report rows longer than this (truncated)")
    p.add_argument("--by", "--category-field", dest="category_field", default=None, metavar="FIELD",
                   help="count values of this field for balance, e.g. metadata.type")
    p.add_argument("--validate", action="append", default=None, metavar="FIELD=VALIDATOR",
                   help="validator pass rate of a field, e.g. output=cypher (repeat)")
    p.add_argument("--near-threshold", type=number, default=None, help="Jaccard similarity of near duplicates")
    p.add_argument("--no-near", dest="near_duplicates", action="store_false", default=None,
                   help="skip near-duplicate detection")
    for rate in _CHECK_RATES:
        p.add_argument("--" + rate.replace("_", "-"), type=number, default=None, metavar="RATE")
    p.add_argument("--max-invalid-rows", type=int, default=None, metavar="N")
    p.add_argument("--examples", type=int, default=None, help="example rows shown per finding")
    p.add_argument("--strict", action="store_true", default=None, help="treat warnings as errors")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from fledge.data.check import check, load_check_config
    flags = {k: getattr(args, k) for k in _CHECK_RATES + ("input_field", "output_field", "tokenizer", "max_length",
                                                          "category_field", "near_duplicates", "max_invalid_rows",
                                                          "examples", "strict")}
    flags["validators"] = args.validate
    flags["near.threshold"] = args.near_threshold
    config = _configure(load_check_config, args.config, flags)
    report = check(args.files, config, val=args.val)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1, ensure_ascii=False))
    else:
        print(report.format(config.examples))
    return 0 if report.ok else 1


# --- split and merge ----------------------------------------------------------------------------

def _dedupe_flags(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--dedupe", default=None, choices=("none", "exact", "near"),
                   help=f"drop repeated rows (default: {default})")
    p.add_argument("--near-threshold", type=number, default=None, help="Jaccard similarity of near duplicates")
    p.add_argument("--to", default=None, help="row shape written: keep (default), io, alpaca, chat, "
                                              "prompt_completion, text")
    p.add_argument("--drop-invalid", action="store_true", default=None,
                   help="skip rows that fit no format instead of failing")
    _fields(p)


def _add_split(verbs: Any) -> None:
    p = verbs.add_parser("split", help="merge, deduplicate and split into train/val without leakage")
    p.add_argument("sources", nargs="+", help="data files or folders")
    p.add_argument("--out-dir", default=None, help="write train.jsonl and val.jsonl here")
    p.add_argument("--train-out", default=None, help="training file (instead of --out-dir)")
    p.add_argument("--val-out", default=None, help="validation file (instead of --out-dir)")
    p.add_argument("--ratio", type=number, default=None, help="share of rows for training (default 0.9)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stratify", default=None, metavar="FIELD", help="keep this field's value shares on both sides")
    p.add_argument("--group", default=None, metavar="FIELD", help="rows sharing this field's value stay together; "
                                                                  "@file: the source file")
    _dedupe_flags(p, "exact")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_split)


def _merge_flags(args: argparse.Namespace) -> dict:
    return {"dedupe": args.dedupe, "near.threshold": args.near_threshold, "to": args.to,
            "drop_invalid": args.drop_invalid, "input_field": args.input_field, "output_field": args.output_field}


def run_split(args: argparse.Namespace) -> int:
    from fledge.data.sources import refuse_overwrite
    from fledge.data.split import SplitOptions, split
    if args.out_dir and (args.train_out or args.val_out):
        raise DataError("pass either --out-dir or --train-out/--val-out, not both.")
    if not args.out_dir and not (args.train_out and args.val_out):
        raise DataError("no outputs: pass --out-dir DIR (writes DIR/train.jsonl and DIR/val.jsonl) or both "
                        "--train-out and --val-out.")
    train_out = args.train_out or str(Path(args.out_dir) / "train.jsonl")
    val_out = args.val_out or str(Path(args.out_dir) / "val.jsonl")
    refuse_overwrite([("--train-out", train_out), ("--val-out", val_out)], [])
    flags = {**_merge_flags(args), "ratio": args.ratio, "seed": args.seed, "stratify": args.stratify,
             "group": args.group}
    options = _configure(_options_loader(SplitOptions, "fledge data split"), None, flags)
    report = split(args.sources, train_out, val_out, options)
    _print_report(args, report, f"{train_out}, {val_out}")
    return 0


def _add_merge(verbs: Any) -> None:
    p = verbs.add_parser("merge", help="concatenate data files into one JSONL, dropping duplicates")
    p.add_argument("sources", nargs="+", help="data files or folders")
    p.add_argument("-o", "--output", required=True, help="JSONL file to write")
    _dedupe_flags(p, "exact")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from fledge.data.sources import refuse_overwrite
    from fledge.data.split import MergeOptions, merge
    refuse_overwrite([("-o", args.output)], [])
    options = _configure(_options_loader(MergeOptions, "fledge data merge"), None, _merge_flags(args))
    report = merge(args.sources, args.output, options)
    _print_report(args, report, args.output)
    return 0


def _options_loader(cls: type, what: str) -> Callable[[Any], Any]:
    from fledge.data.records import non_finite_problems
    from fledge.recipe import load_config
    return lambda raw: load_config(cls, raw if raw is not None else {}, what,
                                   lambda options, problems: problems.extend(non_finite_problems(options)))


def _print_report(args: argparse.Namespace, report: Any, where: str) -> None:
    if args.json:
        out = dataclasses.asdict(report)
        out["invalid"] = [str(p) for p in report.invalid]
        print(json.dumps(out, indent=1, ensure_ascii=False))
    else:
        print(f"{where}: {report.summary()}")
