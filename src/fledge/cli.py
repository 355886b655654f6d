"""The `fledge` command: verbs map to library calls; this file only parses and prints.

    fledge quickstart                      # train a small model on Python's own source, no data needed
    fledge prepare RECIPE [--set k=v]      # corpus -> tokenizer -> token shards
    fledge train RECIPE [--resume]         # prepare if needed, then train (torchrun for several processes)
    fledge sample RUN --prompt "..."       # generate from a run's best checkpoint
    fledge env                             # devices, precision, threads, versions, matmul peak
    fledge recipe keys | check RECIPE      # every recipe key with its default and help; validate a recipe
    fledge data extract|pairs|synth|check|split|merge   # shape and check training data

Errors a user can fix print one line and exit non-zero; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

from fledge.errors import FledgeError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except FledgeError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


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
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps")
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
    return parser


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
    from fledge.train import train
    result = train(load_recipe(args.recipe, args.overrides), resume=args.resume, progress=not args.quiet)
    return 130 if result.interrupted else 0


def _sample(args) -> int:
    from fledge.sample import sample
    stream = args.num_samples == 1
    if stream:
        print(args.prompt, end="", flush=True)
    texts = sample(args.run, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, num_samples=args.num_samples, seed=args.seed,
                   device=args.device,
                   on_text=(lambda i, piece: print(piece, end="", flush=True)) if stream else None)
    if stream:
        print()
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
