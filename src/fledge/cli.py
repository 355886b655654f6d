"""The `fledge` command: verbs map to library calls; this file only parses and prints.

    fledge quickstart                      # train a small model on Python's own source, no data needed
    fledge prepare RECIPE [--set k=v]      # corpus -> tokenizer -> token shards
    fledge train RECIPE [--resume]         # prepare (reusing what is unchanged), then train (torchrun: N processes)
    fledge sample RUN --prompt "..."       # generate from a run's best checkpoint
    fledge env                             # devices, precision, threads, versions, matmul peak
    fledge recipe keys | check RECIPE      # every recipe key with its default and help; validate a recipe
    fledge data extract|pairs|synth|check|split|merge   # shape and check training data

Errors a user can fix print one line and exit non-zero (2 for a bad recipe or option); an
unexpected exception is a bug in fledge: one line that says where, exit 70. `--debug`
(before or after the verb) shows the traceback. Output cut short by a closed pipe
(`fledge recipe keys | head -1`) ends quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from fledge.errors import FledgeError, InternalError

EXIT_BROKEN_PIPE = 141      # what a shell reports for a process ended by SIGPIPE (128 + 13)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Known before parsing, so that a failure while building the parser honours it too.
    debug = "--debug" in (argv[:argv.index("--")] if "--" in argv else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = args.debug
        if not getattr(args, "func", None):
            parser.print_help()
            code = 0
        else:
            code = args.func(args) or 0
        sys.stdout.flush()      # a closed pipe shows up here, inside the handlers below
        return code
    except FledgeError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`). Point stdout at devnull so that Python's final
        # flush at exit does not raise again (the recipe in Python's signal module docs).
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as e:
        if debug:
            raise
        print(f"error: {internal_error_message(e)}", file=sys.stderr)
        return InternalError.exit_code


def internal_error_message(e: BaseException) -> str:
    """One line for an exception fledge did not expect: a bug, where it happened, how to report it."""
    package = Path(__file__).resolve().parent
    where = "unknown place"
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        try:
            relative = Path(frame.filename).resolve().relative_to(package.parent)
        except ValueError:
            continue
        where = f"{relative.as_posix()}:{frame.lineno}"
        break
    detail = " ".join(str(e).split())
    if len(detail) > 300:
        detail = detail[:300] + "..."
    return (f"this is a bug in fledge: {type(e).__name__}{': ' + detail if detail else ''} (at {where}). Please "
            f"report it with the command you ran and the output of `fledge env`; rerun with --debug to see the "
            f"traceback.")


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):   # stdout replaced by an object without a descriptor
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fledge", description="From your own data to a small language model you can ship.",
        epilog="Start with `fledge quickstart`. Recipes: see recipes/ and `fledge recipe keys`.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.set_defaults(debug=False)
    verbs = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = verbs.add_parser("quickstart", help="train a small model on Python's own source code (no network, minutes)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the embedded recipe's)")
    p.add_argument("--corpus-mb", type=float, default=None, help="megabytes of standard-library source to use")
    p.add_argument("--run-dir", default=None, help="run folder (default: a new runs/quickstart[-N])")
    _add_common(p)
    p.set_defaults(func=_quickstart)

    p = verbs.add_parser("prepare", help="corpus -> tokenizer -> token shards with a manifest")
    p.add_argument("recipe", help="YAML recipe")
    _add_overrides(p)
    _add_common(p)
    p.set_defaults(func=_prepare)

    p = verbs.add_parser("train", help="train a model from a recipe (prepares the corpus if needed)",
                         description="Train from a recipe. Several processes: "
                                     "torchrun --nproc_per_node N -m fledge train RECIPE")
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    _add_overrides(p)
    _add_common(p)
    p.set_defaults(func=_train)

    p = verbs.add_parser("sample", help="generate text from a run or checkpoint")
    p.add_argument("run", help="run folder (uses its best checkpoint) or a checkpoint folder")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (recipe's sample default)")
    p.add_argument("--temperature", type=float, default=None, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens; 0: off")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass; 1: off")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: same seed, same text")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps, or auto (cuda > mps > cpu)")
    p.add_argument("--allow-code", action="store_true",
                   help="let the checkpoint's recipe import the module its model.arch names (importing runs "
                        "that module's code: only for checkpoints you trust)")
    p.set_defaults(func=_sample)

    from fledge.data.commands import register as register_data_commands
    register_data_commands(verbs)

    p = verbs.add_parser("env", help="devices, precision, threads, library versions, measured matmul peak")
    p.add_argument("--no-measure", action="store_true", help="skip the matmul measurement")
    p.set_defaults(func=_env)

    p = verbs.add_parser("recipe", help="list recipe keys, or validate a recipe")
    sub = p.add_subparsers(title="recipe commands", metavar="ACTION")
    q = sub.add_parser("keys", help="every recipe key with its default and help")
    q.set_defaults(func=_recipe_keys)
    q = sub.add_parser("check", help="validate a recipe and print it resolved")
    q.add_argument("recipe")
    _add_overrides(q)
    q.set_defaults(func=_recipe_check)
    _add_debug_to_verbs(parser)
    return parser


def _add_debug_to_verbs(parser: argparse.ArgumentParser) -> None:
    """Accept --debug after the verb too (`fledge sample RUN --debug`). SUPPRESS as the default
    keeps a --debug given before the verb: a subcommand's defaults would overwrite it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("--debug" in a.option_strings for a in sub._actions):
                    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                     help="show tracebacks for errors")
                _add_debug_to_verbs(sub)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set train.lr=3e-4 (repeatable)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _quickstart(args) -> int:
    from fledge.quickstart import quickstart
    quickstart(steps=args.steps, corpus_mb=args.corpus_mb, run_dir=args.run_dir, progress=not args.quiet)
    return 0


def _prepare(args) -> int:
    from fledge.prepare import prepare
    from fledge.recipe import load_recipe
    recipe = load_recipe(args.recipe, args.overrides)
    manifest = prepare(recipe, progress=not args.quiet)
    splits = manifest["splits"]
    print(f"prepared {recipe.prepared_path}: {splits['train']['tokens']:,} train tokens, "
          f"{splits['val']['tokens']:,} val tokens, vocab {manifest['tokenizer']['vocab_size']}")
    return 0


def _train(args) -> int:
    from fledge.recipe import load_recipe
    from fledge.train import prepare_data, train
    recipe = load_recipe(args.recipe, args.overrides)
    prepare_data(recipe, progress=not args.quiet)
    result = train(recipe, resume=args.resume, progress=not args.quiet)
    return 130 if result.interrupted else 0


SAMPLE_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                "top_p": "--top-p", "num_samples": "--num-samples", "seed": "--seed", "device": "--device"}


def _sample(args) -> int:
    from fledge.sample import sample, sample_options
    values = {key: getattr(args, key) for key in SAMPLE_FLAGS}
    sample_options(values, SAMPLE_FLAGS, "fledge sample")     # every bad option named by its flag, first
    stream = args.num_samples == 1
    started = False

    def show(i: int, piece: str) -> None:
        nonlocal started
        if not started:     # the prompt only once the model has loaded, so an error stands alone
            print(args.prompt, end="")
            started = True
        print(piece, end="", flush=True)

    texts = sample(args.run, args.prompt, **values, allow_code=args.allow_code, on_text=show if stream else None)
    if stream:
        print(("" if started else args.prompt) + "\n", end="")
        return 0
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1}\n{args.prompt}{text}")
    return 0


def _env(args) -> int:
    from fledge.env import collect_env
    for key, value in collect_env(measure=not args.no_measure).items():
        print(f"{key:28s} {value}")
    return 0


def _recipe_keys(args) -> int:
    from fledge.model.registry import PRESETS
    from fledge.recipe import describe_keys
    for key, default, helptext in describe_keys():
        if not default:
            print(f"\n{key}:  {helptext}")
        else:
            print(f"  {key:28s} {default:14s} {helptext}")
    print("\nmodel presets: " + ", ".join(f"{k} ({v['n_layers']}x{v['dim']})" for k, v in PRESETS.items()))
    return 0


def _recipe_check(args) -> int:
    from fledge.recipe import load_recipe
    print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
