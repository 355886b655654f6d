"""The `fledge` command: verbs map to library calls; this file only parses and prints.

    fledge quickstart                      # train a small model on Python's own source, no data needed
    fledge prepare RECIPE [--set k=v]      # corpus -> tokenizer -> token shards
    fledge train RECIPE [--resume]         # prepare (reusing what is unchanged), then train (torchrun: N processes);
                                           # with model.base: fine-tune on data.rows, or continue pretraining
    fledge sample RUN --prompt "..."       # generate from a run's best checkpoint (in its chat template)
    fledge chat RUN                        # talk to a fine-tuned run, turn by turn
    fledge merge RUN [-o DIR]              # fold a run's adapters into full weights (runs/<name>/merged/)
    fledge export RUN --format hf|gguf [--quant Q ...] [-o DIR]   # transformers folder or GGUF + Modelfile, verified
    fledge eval RUN --data FILE            # loss, perplexity, validators on held-out rows; --baseline compares
    fledge report RUN                      # one self-contained HTML page: curves, evaluations, samples
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
    p.add_argument("--skip-invalid", action="store_true",
                   help="drop rows that are not valid records and report them (sets data.on_bad_row=skip)")
    p.add_argument("--allow-code", action="store_true",
                   help="let a fledge base's saved recipe import the module its model.arch names (importing runs "
                        "that module's code: only for bases you trust)")
    _add_overrides(p)
    _add_common(p)
    p.set_defaults(func=_train)

    p = verbs.add_parser("sample", help="generate text from a run or checkpoint",
                         description="Generate from a run's best checkpoint. A fine-tune's prompts are rendered "
                                     "with its chat template and the answer is printed; --raw continues text.")
    p.add_argument("run", help="run folder (uses its best checkpoint) or a checkpoint folder")
    p.add_argument("--prompt", default=None, help="the question (fine-tunes) or text to continue")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="prompts, one per line; or a .jsonl file (.json array) of objects with \"prompt\" or "
                        "\"messages\"")
    p.add_argument("--raw", action="store_true", help="no chat template: continue BOS + the prompt text")
    p.add_argument("--system", default=None, help="system prompt instead of the run's template.system (\"\": none)")
    _add_sampling(p)
    p.add_argument("--num-samples", type=int, default=1, help="independent samples")
    p.set_defaults(func=_sample)

    p = verbs.add_parser("chat", help="talk to a fine-tuned run in its chat template (/reset, /exit)",
                         description="Chat with a fine-tuned run: every turn is rendered with the run's chat "
                                     "template. /reset clears the conversation, /exit or Ctrl-D ends, Ctrl-C stops "
                                     "an answer.")
    p.add_argument("run", help="run folder (uses its best checkpoint) or a checkpoint folder")
    p.add_argument("--system", default=None, help="system prompt instead of the run's template.system (\"\": none)")
    _add_sampling(p)
    p.set_defaults(func=_chat)

    p = verbs.add_parser("merge", help="fold a run's adapters into full weights (a folder transformers loads)")
    p.add_argument("run", help="run folder (uses its best checkpoint) or an adapter checkpoint folder")
    p.add_argument("-o", "--out", default=None, metavar="DIR", help="output folder (default: runs/<name>/merged)")
    p.add_argument("--allow-code", action="store_true", help=ALLOW_CODE_HELP)
    p.set_defaults(func=_merge)

    p = verbs.add_parser("export", help="a transformers folder, or GGUF files for llama.cpp with Ollama Modelfiles, "
                                        "each checked against the run",
                         description="Export a run's best checkpoint: --format hf writes a transformers folder "
                                     "(adapters merged); --format gguf writes one GGUF file per --quant with an Ollama "
                                     "Modelfile beside it. Each is loaded back (transformers, llama.cpp) and compared "
                                     "with the run on held-out text unless --no-verify.")
    p.add_argument("run", help="run folder (uses its best checkpoint) or a checkpoint folder")
    p.add_argument("--format", required=True, metavar="FORMAT", help="hf (a transformers folder) or gguf (llama.cpp)")
    p.add_argument("--quant", action="append", default=None, metavar="Q",
                   help="gguf: f32, f16, bf16, q8_0, q5_k_m or q4_k_m; repeat for several (default f16)")
    p.add_argument("-o", "--out", default=None, metavar="DIR",
                   help="output folder (default: runs/<name>/export/hf or runs/<name>/export/gguf)")
    p.add_argument("--no-verify", action="store_true", help="skip loading the export back and comparing it")
    p.add_argument("--allow-code", action="store_true", help=ALLOW_CODE_HELP)
    p.set_defaults(func=_export)

    from fledge.data.commands import register as register_data_commands
    register_data_commands(verbs)
    from fledge.evaluate.commands import register as register_eval_commands
    register_eval_commands(verbs)

    p = verbs.add_parser("env", help="devices, precision, threads, library versions, measured matmul peak")
    p.add_argument("--no-measure", action="store_true", help="skip the matmul measurement")
    p.set_defaults(func=_env)
    from fledge.report import register as register_report
    register_report(verbs)

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
    from fledge.model.bases import resolve_base_tokenizer
    from fledge.prepare import prepare
    from fledge.recipe import load_recipe
    recipe = resolve_base_tokenizer(load_recipe(args.recipe, args.overrides))   # continued pretraining: the base's
    if recipe.data.rows:
        from fledge.errors import RecipeError
        raise RecipeError(f"{args.recipe}: data.rows are read by `fledge train` itself, which prints what it read "
                          f"before training (`fledge data check` checks rows). `fledge prepare` prepares the "
                          f"corpus of data.sources.")
    manifest = prepare(recipe, progress=not args.quiet)
    splits = manifest["splits"]
    print(f"prepared {recipe.prepared_path}: {splits['train']['tokens']:,} train tokens, "
          f"{splits['val']['tokens']:,} val tokens, vocab {manifest['tokenizer']['vocab_size']}")
    return 0


def _train(args) -> int:
    from fledge.model.bases import resolve_base_tokenizer
    from fledge.recipe import load_recipe
    from fledge.train import prepare_data, train
    overrides = args.overrides + (["data.on_bad_row=skip"] if args.skip_invalid else [])
    recipe = load_recipe(args.recipe, overrides)
    if not recipe.data.rows:    # a corpus (train reads rows itself); continued pretraining: the base's tokenizer
        prepare_data(resolve_base_tokenizer(recipe, allow_code=args.allow_code), progress=not args.quiet)
    result = train(recipe, resume=args.resume, progress=not args.quiet, allow_code=args.allow_code)
    if os.environ.get("RANK", "0") == "0" and (result.run_dir / "metrics.jsonl").is_file():
        from fledge.report import write_report
        print(f"report: {write_report(result.run_dir)}")
    return 130 if result.interrupted else 0


ALLOW_CODE_HELP = ("let the checkpoint's recipe import the module its model.arch names, or run its transformers "
                   "model's own code (this runs that code: only for checkpoints you trust)")
SAMPLE_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                "top_p": "--top-p", "num_samples": "--num-samples", "seed": "--seed", "device": "--device"}


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (recipe's sample default)")
    p.add_argument("--temperature", type=float, default=None, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens; 0: off")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass; 1: off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: same seed, same text")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps, or auto (cuda > mps > cpu)")
    p.add_argument("--allow-code", action="store_true", help=ALLOW_CODE_HELP)


def _load_to_sample(args, verb: str):
    """(loaded checkpoint, sample config, options) with every bad option named by its flag before loading."""
    from fledge.sample import inference_device, load_for_inference, sample_config, sample_options
    values = {key: getattr(args, key, None) for key in SAMPLE_FLAGS}
    options = sample_options(values, SAMPLE_FLAGS, f"fledge {verb}")
    loaded = load_for_inference(args.run, inference_device(options.device), allow_code=args.allow_code)
    return loaded, sample_config(loaded.recipe, options, values), options


def _sample(args) -> int:
    from fledge.errors import RecipeError
    from fledge.sample import generate_from, read_prompts
    if args.prompt is not None and args.prompts_file:
        raise RecipeError("fledge sample: give --prompt or --prompts-file, not both")
    prompts = read_prompts(args.prompts_file) if args.prompts_file else [args.prompt or ""]
    loaded, config, options = _load_to_sample(args, "sample")
    raw = args.raw or loaded.template is None
    stream = options.num_samples == 1
    for prompt in prompts:
        if len(prompts) > 1:
            print(f"=== {_one_line(prompt)}")
        # a continuation is shown after its prompt, an answer alone; the prompt only once generation
        # starts, so that an error about it stands alone
        lead = prompt if raw and isinstance(prompt, str) else ""
        started = []

        def show(i: int, piece: str) -> None:
            if not started:
                print(lead, end="")
                started.append(True)
            print(piece, end="", flush=True)

        texts = generate_from(loaded, prompt, config, raw=args.raw, system=args.system,
                              num_samples=options.num_samples, seed=options.seed, on_text=show if stream else None)
        if stream:
            print("" if started else lead)
            continue
        for i, text in enumerate(texts):
            print(f"--- sample {i + 1}\n{lead}{text}")
    return 0


def _one_line(prompt, width: int = 100) -> str:
    """A prompt (text or messages) as one header line: its last user text, newlines shown as \\n."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[:width - 3] + "..."


def _chat(args) -> int:
    from fledge.chat import chat
    loaded, config, options = _load_to_sample(args, "chat")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    chat(loaded, config, system=args.system, seed=options.seed, prompt="> " if interactive else "")
    return 0


def _merge(args) -> int:
    from fledge.merge import merge
    folder = merge(args.run, args.out, allow_code=args.allow_code)
    print(f"{folder}: full weights with the run's tokenizer and template; they load with fledge sample/chat, "
          f"transformers' AutoModelForCausalLM.from_pretrained, and as model.base of another fine-tune")
    return 0


def _export(args) -> int:
    from fledge.errors import ExportError
    from fledge.export import export
    if args.quant and args.format != "gguf":
        raise ExportError(f"--quant applies to --format gguf; --format {args.format} writes the weights as trained.")
    result = export(args.run, args.format, quant=args.quant or ["f16"], out=args.out, verify=not args.no_verify,
                    allow_code=args.allow_code, say=lambda line: print(line, flush=True))
    print(f"wrote {result.out}" + "".join(f"\n  {p.name}" for p in result.files if p != result.out)
          + ("" if not args.no_verify else "\n(not verified: --no-verify)"))
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
