"""`fledge eval`: parsing and printing; the work is in fledge.evaluate.run (a run generates) and
fledge.evaluate.score (scoring files of generations).

    fledge eval RUN [--data val.jsonl] [--baseline RUN2 | --baseline base.jsonl] [--validate dot]...
                [--target ppl=20]... [--max-new-tokens N] [--batch-size N] [--temperature T] [--seed S]
                [--label L] [--no-generate] [--allow-code] [--device cpu] [-o OUT_DIR] [--json]
    fledge eval --data val.jsonl --outputs tuned.jsonl [--baseline base.jsonl] [--validate dot]...
                [--target dot=0.9]... [--field generation] [-o OUT_DIR] [--json]
    fledge eval RUN --lm-eval TASK_DIR [--task NAME]... [--limit N] [--lm-eval-chat]   (fledge.evaluate.lmeval)

`register(subparsers)` adds the `eval` verb to the main parser.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from fledge.errors import RecipeError

EXIT_TARGET_MISSED = 3

EPILOG = """\
With RUN: what --data, --validate, --target and --max-new-tokens leave out comes from the run's
recipe (eval.data, else its validation rows; eval.validate; eval.targets; eval.max_new_tokens),
and the output says which. The run (its best checkpoint) computes its loss, perplexity and bits
per byte on the data rows (answer tokens only for a fine-tune, rendered with its own template),
then answers every row with a prompt (greedy unless --temperature, stopping at its template's end
of turn); the answers are scored as below. --baseline is then another run or checkpoint (prompted
with the SAME template and decoding; a base without a template gets the run's) or a file of fixed
outputs. Results go to RUN/eval/LABEL/ (LABEL: the data file's stem, or --label). loss, ppl and
bpb targets are met at or below the value.

With --outputs: one JSON object per data row, in the same order, with the generated text in
"generation" (or --field): {"generation": "digraph { a -> b }"}. The reference is each data
row's response (its last assistant turn); any row format of `fledge data` is read.

Metrics: exact_match, normalized_match, one validity rate per --validate (NAME[:key=value,...],
e.g. dot, json, sql:dialect=postgres), and with --validate vocabulary:path=WORDS also purity and
adherence. Rates come with a Wilson 95% interval; adherence with a bootstrap interval. With
--baseline, each metric's difference gets a paired bootstrap 95% interval, pass rates an exact
McNemar p-value, and a sentence in plain words. See docs/evaluation.md.

Writes OUT_DIR/summary.json and OUT_DIR/rows.jsonl (default OUT_DIR: RUN/eval/LABEL/ with a run,
<outputs stem>.eval/ beside the outputs file with --outputs).

Exit status: 0 scored, every target met (or none given); 3 scored, but a target was missed or
could not be judged; 1 a data or file problem; 2 a bad option."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="evaluate a run on held-out rows (loss, perplexity, answers) or score "
                                           "generations; compare with a baseline (paired bootstrap, McNemar)",
                              description="Evaluate RUN on a data file's rows: loss, perplexity and bits per byte, "
                                          "then its answers scored against the references. Or score a file of "
                                          "generations (--outputs). Either against a baseline on the same rows.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default=None,
                   help="a run folder (its best checkpoint) or a checkpoint folder that generates the outputs")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="data file whose rows are prompted (references); with RUN, default: the recipe's eval.data, "
                        "else the run's validation rows")
    p.add_argument("--outputs", default=None, metavar="FILE",
                   help="score these generations instead of a run's: one JSON object per data row")
    p.add_argument("--baseline", default=None, metavar="RUN_OR_FILE",
                   help="with RUN: another run or checkpoint, or a file of outputs; with --outputs: a baseline's "
                        "generations for the same rows")
    p.add_argument("--field", default="generation", metavar="NAME",
                   help="field of the outputs files holding the text (default: generation)")
    p.add_argument("--validate", action="append", default=[], metavar="NAME[:key=value,...]",
                   help="validity rate by this validator: dot, cypher, sql, json, python, regex:pattern=..., "
                        "vocabulary:path=WORDS, or pkg.module:function (repeat)")
    p.add_argument("--target", action="append", default=[], metavar="NAME=VALUE",
                   help="a threshold to meet, e.g. dot=0.9, purity=85%%, or with RUN ppl=20 (repeat; see exit status)")
    run = p.add_argument_group("with RUN")
    run.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                     help="longest answer in tokens (default: twice the longest reference, plus 16)")
    run.add_argument("--batch-size", type=int, default=16, metavar="N",
                     help="prompts of equal length generated together, and rows per loss batch (default: 16)")
    run.add_argument("--temperature", type=float, default=0.0, metavar="T",
                     help="0: greedy (default); above 0 samples, reproducibly with --seed")
    run.add_argument("--label", default=None, metavar="L", help="results go to RUN/eval/L/ (default: the data "
                                                                "file's stem)")
    run.add_argument("--no-generate", action="store_true", help="loss, perplexity and bits per byte only")
    run.add_argument("--allow-code", action="store_true",
                     help="let a checkpoint's recipe import the model code it names, or run a transformers model's "
                          "own code (only for checkpoints you trust)")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps, or auto (default: cpu)")
    p.add_argument("-o", "--out-dir", default=None, metavar="DIR",
                   help="where summary.json and rows.jsonl go (default: RUN/eval/LABEL/, or <outputs stem>.eval/ "
                        "beside the outputs)")
    p.add_argument("--name", default=None, help="what the run or outputs are called in the report (default: the "
                                                "run's name, or tuned)")
    p.add_argument("--baseline-name", default=None, help="what the baseline is called in the report (default: its "
                                                         "run's name or file stem, or baseline)")
    p.add_argument("--input-field", default=None, metavar="NAME", help="data field holding the input "
                                                                       "(default: detected)")
    p.add_argument("--output-field", default=None, metavar="NAME", help="data field holding the reference "
                                                                        "(default: detected)")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's own generator and, with RUN and "
                                                       "--temperature, of sampling (default: 0)")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    lm = p.add_argument_group("with RUN and --lm-eval (pip install 'fledge[lm-eval]'; docs/lm-eval.md)")
    lm.add_argument("--lm-eval", default=None, metavar="TASK_DIR",
                    help="score RUN with lm-evaluation-harness on the YAML tasks in TASK_DIR, offline "
                         "(results in RUN/eval/lm-eval/, or -o DIR)")
    lm.add_argument("--task", action="append", default=None, metavar="NAME",
                    help="a task of TASK_DIR to run (repeatable; default: every task there)")
    lm.add_argument("--limit", type=float, default=None, metavar="N",
                    help="the first N documents of each task (below 1: that share)")
    lm.add_argument("--lm-eval-chat", action="store_true",
                    help="render each request with the run's chat template (lm-eval's apply_chat_template)")
    p.set_defaults(func=run_eval)


# Flags that only mean something when a run generates: (attribute, flag, default).
RUN_ONLY = (("max_new_tokens", "--max-new-tokens", None), ("batch_size", "--batch-size", 16),
            ("temperature", "--temperature", 0.0), ("label", "--label", None), ("no_generate", "--no-generate", False),
            ("allow_code", "--allow-code", False), ("device", "--device", "cpu"))


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
    if args.lm_eval is not None:
        return _run_lm_eval(args)
    lm_only = [flag for flag, value in (("--task", args.task), ("--limit", args.limit),
                                        ("--lm-eval-chat", args.lm_eval_chat)) if value]
    if lm_only:
        raise RecipeError(f"{', '.join(lm_only)} only appl{'y' if len(lm_only) > 1 else 'ies'} with --lm-eval TASK_DIR; "
                          f"add it, or drop {'them' if len(lm_only) > 1 else 'it'}.")
    if args.run is not None and args.outputs is not None:
        raise RecipeError(f"fledge eval: RUN and --outputs both given; give RUN ({args.run}) to generate with the "
                          f"run, or --outputs FILE to score existing generations, not both.")
    if args.run is None and args.outputs is None:
        raise RecipeError("fledge eval: nothing to evaluate; give a RUN to generate with (fledge eval runs/NAME --data "
                          "FILE) or --outputs FILE to score existing generations (one JSON object per data row, text "
                          "in \"generation\").")
    if args.run is None and args.data is None:
        raise RecipeError("fledge eval --outputs FILE needs --data FILE: the rows the outputs answer, in the same "
                          "order (their references).")
    if args.resamples < 1:
        raise RecipeError(f"--resamples {args.resamples}: the bootstrap needs at least 1 resample (e.g. 10000)")
    result = _evaluate_run(args) if args.run is not None else _score_outputs(args)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1, ensure_ascii=False))
    else:
        print(result.format())
    return 0 if result.targets_met else EXIT_TARGET_MISSED


def _run_lm_eval(args: argparse.Namespace) -> int:
    """`fledge eval RUN --lm-eval TASK_DIR`: fledge.evaluate.lmeval.run_lm_eval, printing its results."""
    from fledge.evaluate.lmeval import run_lm_eval
    if args.run is None:
        raise RecipeError("fledge eval --lm-eval TASK_DIR needs a RUN to score: fledge eval runs/NAME --lm-eval DIR")
    others = [flag for flag, value in (("--data", args.data), ("--outputs", args.outputs),
                                       ("--baseline", args.baseline), ("--validate", args.validate),
                                       ("--target", args.target), ("--label", args.label),
                                       ("--no-generate", args.no_generate)) if value]
    if others:
        raise RecipeError(f"{', '.join(others)} {'do' if len(others) > 1 else 'does'} not apply with --lm-eval: "
                          f"lm-evaluation-harness scores the tasks of {args.lm_eval}. Run fledge eval twice.")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = run_lm_eval(args.run, args.lm_eval, args.task, out=args.out_dir, limit=limit,
                          batch_size=args.batch_size, device=args.device, chat=args.lm_eval_chat,
                          allow_code=args.allow_code, say=None if args.json else print)
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


def _evaluate_run(args: argparse.Namespace):
    from fledge.data.records import FieldMap
    from fledge.evaluate.run import evaluate_run
    # A flag left out is None: evaluate_run takes it from the run's recipe (eval:) and says so.
    return evaluate_run(args.run, args.data, validators=args.validate or None,
                        targets=parse_targets(args.target) if args.target else None,
                        baseline=args.baseline, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        temperature=args.temperature, seed=args.seed, label=args.label, allow_code=args.allow_code,
                        generate=not args.no_generate, fields=FieldMap(args.input_field or "", args.output_field or ""),
                        names=(args.name, args.baseline_name), out_dir=args.out_dir, device=args.device,
                        baseline_field=args.field, resamples=args.resamples)


def _score_outputs(args: argparse.Namespace):
    from fledge.data.records import FieldMap
    from fledge.data.sources import refuse_overwrite
    from fledge.evaluate.score import default_out_dir, score_outputs
    given = [flag for attr, flag, default in RUN_ONLY if getattr(args, attr) != default]
    if given:
        raise RecipeError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} when a RUN generates; "
                          f"--outputs scores generations that exist. Drop {'them' if len(given) > 1 else 'it'}, or "
                          f"give a RUN instead of --outputs.")
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir(args.outputs)
    if out_dir.exists() and not out_dir.is_dir():
        raise RecipeError(f"-o {out_dir} is a file; -o names a folder for summary.json and rows.jsonl.")
    inputs = [args.data, args.outputs] + ([args.baseline] if args.baseline else [])
    refuse_overwrite([("the summary file", out_dir / "summary.json"), ("the per-row file", out_dir / "rows.jsonl")],
                     inputs)
    result = score_outputs(args.data, args.outputs, field=args.field, validators=args.validate,
                           baseline_file=args.baseline, targets=parse_targets(args.target),
                           fields=FieldMap(args.input_field or "", args.output_field or ""),
                           names=(args.name or "tuned", args.baseline_name or "baseline"), resamples=args.resamples,
                           seed=args.seed)
    result.write(out_dir)
    return result
