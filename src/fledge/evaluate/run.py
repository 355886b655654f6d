"""`fledge eval RUN --data FILE`: a run's loss, perplexity and bits per byte on held-out rows, its
answers generated and scored, and the same for a baseline on the same rows.

    from fledge.evaluate.run import evaluate_run
    result = evaluate_run("runs/dot", "val.jsonl", validators=["dot"], baseline="runs/dot-base",
                          targets={"dot": 0.9, "ppl": 20})
    print(result.format())       # already written: runs/dot/eval/val/summary.json and rows.jsonl
    evaluate_run("runs/dot")     # data, validators and targets from the run's recipe (eval: section)

What happens, in order (every option and target is checked before a model loads):

- Defaults from the run's recipe (the recipe.yaml of the checkpoint evaluated), for what the call
  leaves out (None): the data is `eval.data`, else the run's validation rows (data.val_rows, or
  the data.val_fraction split of data.rows, rebuilt exactly as training split them); validators
  are `eval.validate` (not with generate=False), targets `eval.targets` (only those this
  evaluation computes), and `eval.max_new_tokens` when above 0. Each default taken is said (to
  `say`) and listed in the result's settings["from_recipe"]. A validator from the recipe that
  names code (pkg.module:function) is run only with `allow_code`.

- The run loads with `fledge.sample.load_for_inference` (its best checkpoint, by validation loss
  or train.select_by, else its latest), and the rows are read with fledge.data.records: any row
  format, with `fields` mapping a pair's field names.
- Loss. A fine-tune (its checkpoint has a template) renders each row as training renders it
  (`fledge.train.rows`, the run's template and `template.system`; a row with its own system
  message keeps it), and only answer tokens are scored: every answer of the row and its end
  token, never the prompt. A pretraining run (no template) scores a text row's every token after
  BOS (BOS + text + EOS, as it pretrained), and a row with a prompt as plain text, BOS + prompt +
  answer + EOS, scoring the answer and EOS. `loss` is token weighted: the summed loss of every
  scored token over the number of them (a mean per row would weigh a token of a short answer
  more). `ppl` = exp(loss). `bpb` = summed loss / (bytes x ln 2), bytes being the UTF-8 bytes of
  the scored text (the answers' text; the text of a text row), so runs with different tokenizers
  compare. A row longer than the model's window (`model.max_seq_len`) is left out of the loss
  and counted in a note; a row whose answers are all empty has no answer tokens and is left out
  too. A file where no row is left is a DataError.
- Generation, on the rows with a prompt (text rows are scored for loss only): the prompt
  rendered with the run's template (`templates.render_prompt`: the ids before the last answer in
  training), greedy by default; `temperature` > 0 samples, with a torch.Generator per batch
  seeded from `seed` and the batch's first row, so the same seed and batch size give the same
  text. Generation stops at the template's stop ids or stop strings and keeps the answer text
  (`templates.answer_text`). fledge's `GPT.generate` takes a batch of equal-length prompts and
  has no attention mask, so prompts are grouped by length (in token ids) and each group is cut
  into batches of `batch_size`: no padding, so a batch of greedy answers equals the answers one
  at a time. Data with many distinct prompt lengths gets small batches; left padding would need
  an attention mask and position ids in GPT.generate. At most `max_new_tokens` tokens (default:
  twice the longest reference in the run's tokens, plus 16).
- Scoring: fledge.evaluate.score (exact and normalized match, validators, purity and adherence,
  targets; loss, ppl and bpb targets are met at or below the target).
- Baseline: another fledge run or checkpoint (a pretraining run, e.g. the base of a fine-tune,
  or a fine-tune), or a file of fixed outputs (one JSON object per data row with the text in
  "generation"). A model baseline runs on the same rows with the SAME template (the run's: a
  base without a template of its own gets it, and the output says so) and the same decoding,
  and gets its own loss. Loss and perplexity per token are compared only when both models scored
  the very same token ids on every row (same tokenizer and rendering: a property checked, not a
  name); otherwise bits per byte is the comparison, and the output says so. Not supported yet as
  a baseline: a bare transformers model folder or a hub id (load_for_inference reads fledge
  checkpoints only); generate its outputs and pass the file, or fine-tune from it.

Written to `runs/<name>/eval/<label>/` (label: the data file's stem), or `out_dir`:
summary.json and rows.jsonl as fledge.evaluate.score describes them, with per-row loss.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fledge.data.records import FieldMap, Record
from fledge.data.sources import ROW_SUFFIXES, refuse_overwrite
from fledge.errors import CheckpointError, DataError, RecipeError
from fledge.evaluate.loss import row_losses
from fledge.evaluate.metrics import NamedValidator, parse_validator_flag, plan_validators
from fledge.evaluate.score import (EvalResult, SystemOutput, as_validators, assemble_result, check_targets,
                                   metric_names, read_data, read_outputs)
from fledge.train.batches import IGNORE

EVAL_DIR = "eval"                 # runs/<name>/eval/<label>/
PROGRESS_EVERY_S = 5.0            # seconds between progress lines
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def evaluate_run(run: str | Path, data_file: str | Path | None = None, *,
                 validators: Sequence[str | NamedValidator] | None = None,
                 targets: Mapping[str, float] | None = None, baseline: str | Path | None = None,
                 max_new_tokens: int | None = None, batch_size: int = 16, temperature: float = 0.0, seed: int = 0,
                 label: str | None = None, allow_code: bool = False, progress: bool = True, generate: bool = True,
                 fields: FieldMap = FieldMap(), names: tuple[str | None, str | None] = (None, None),
                 out_dir: str | Path | None = None, device: str = "cpu", baseline_field: str = "generation",
                 resamples: int = 10_000, level: float = 0.95,
                 say: Callable[[str], None] | None = None) -> EvalResult:
    """Evaluate `run` on the rows of `data_file` (module docstring), write the result and return it.

    validators, targets: as `fledge.evaluate.score.score_outputs`, plus loss, ppl and bpb targets.
    data_file, validators, targets or max_new_tokens None: the run's recipe's (module docstring);
    give [] or {} for none. generate=False computes the loss only. names: what the table calls the run and the baseline
    (default: their folder names, or the outputs file's stem). say: where progress lines go
    (default: stderr when `progress`). Raises RecipeError for a bad option, CheckpointError for a
    run without a usable checkpoint, DataError for bad rows or nothing to score."""
    say = say or (_stderr if progress else _silent)
    named = as_validators(validators) if validators is not None else None
    _check_options(named or [], generate, max_new_tokens, batch_size, temperature, seed, label)
    defaults = None
    if data_file is None or validators is None or targets is None or max_new_tokens is None:
        defaults = recipe_defaults(run, data_file, validators, targets, max_new_tokens, generate=generate,
                                   allow_code=allow_code)
        data_file, validators, targets, max_new_tokens = (defaults.data_file, defaults.validators, defaults.targets,
                                                          defaults.max_new_tokens)
        for line in defaults.notes:
            say(line)
    named = named if named is not None else as_validators(validators)
    checked = check_targets(targets or {}, metric_names(named, generations=generate, losses=True))
    baseline_kind = _baseline_kind(baseline) if baseline is not None else None
    if baseline_kind == "outputs" and not generate:
        raise RecipeError(f"--baseline {baseline} is a file of outputs, which has no loss to compare, and "
                          f"--no-generate makes no outputs; drop one of them.")
    from fledge.sample import inference_device, load_for_inference
    if data_file is not None:
        records, data_name, inputs = read_data(data_file, fields), str(data_file), [data_file]
        data_label = Path(data_file).stem
    else:
        records, data_name, inputs = defaults.records(), defaults.data_name, defaults.inputs
        data_label = "val"
    device = inference_device(device)
    loaded = load_for_inference(run, device, allow_code=allow_code)
    subject = Subject.of(loaded, names[0] or run_name(loaded.checkpoint))
    folder = Path(out_dir) if out_dir is not None else (
        run_folder(Path(run), loaded.checkpoint) / EVAL_DIR / (label or data_label))
    _refuse_overwrite(folder, inputs + ([baseline] if baseline_kind == "outputs" else []))
    encoded = encode_rows(subject, records)
    # Everything about the baseline that can fail is checked before either model runs (both stay loaded).
    base, base_encoded, base_texts = None, None, None
    if baseline_kind == "outputs":
        base_texts = read_outputs(baseline, records, baseline_field)
    elif baseline_kind == "run":
        other = load_for_inference(baseline, device, allow_code=allow_code)
        base = Subject.of(other, names[1] or _unique(run_name(other.checkpoint), subject.label), like=subject)
        base_encoded = encode_rows(base, records)

    decoding = Decoding(max_new_tokens or default_max_new_tokens(subject, records), temperature, seed, batch_size)
    tuned = run_subject(subject, records, encoded, decoding, generate=generate, device=device, say=say)
    about = [describe_loss(subject, records, tuned)] + ([decoding.describe(subject.template)] if generate else [])
    base_output, compare_losses, reason = None, True, ""
    if base_texts is not None:
        base_output = SystemOutput(names[1] or _unique(Path(baseline).stem, subject.label), str(baseline),
                                   [t if g is not None else None for t, g in zip(base_texts, tuned.generations)])
        about.append(f"{base_output.label}: fixed outputs from {baseline} (no loss)")
    elif base is not None:
        base_output = run_subject(base, records, base_encoded, decoding, generate=generate, device=device, say=say)
        about += base.notes
        compare_losses = same_tokens(encoded, base_encoded)
        if not compare_losses:
            reason = (f"{subject.label} and {base.label} score different token ids (another tokenizer, or another "
                      f"rendering of the same text), so a loss per token means different things")
            about.append(f"{reason}: bits per byte is the comparison")
    result = assemble_result(data_name, records, named, tuned, base_output, targets=checked,
                             compare_losses=compare_losses, loss_reason=reason, resamples=resamples, seed=seed,
                             level=level)
    result.about = about
    result.notes = _loss_notes(tuned) + (_loss_notes(base_output) if base_output else []) + result.notes
    result.settings = {"run": str(run), "checkpoint": str(loaded.checkpoint), "baseline": baseline_kind,
                       "template": subject.template.name if subject.template else None,
                       "loss_scope": "answer tokens" if subject.template else "text",
                       "generate": generate, **decoding.settings(),
                       "from_recipe": defaults.notes if defaults is not None else []}
    result.write(folder)
    return result


# --- options and paths ---------------------------------------------------------------------------

# --- defaults from the run's recipe ----------------------------------------------------------------

@dataclass
class RecipeDefaults:
    """What a run's recipe (its `eval:` section and validation rows) gives an evaluation."""

    data_file: str | None            # None: the run's validation rows (`records`)
    validators: list
    targets: dict
    max_new_tokens: int | None
    notes: list[str]                 # each default taken, in words
    data_name: str = ""              # the validation rows, in words
    inputs: list = ()                # the files they come from
    records: Callable[[], list] = list      # reads them (after the options are checked)


def recipe_defaults(run: str | Path, data_file, validators, targets, max_new_tokens, *, generate: bool = True,
                    allow_code: bool = False) -> RecipeDefaults:
    """The values left out (None) taken from the run's recipe (module docstring); given ones are kept."""
    from fledge.model.bases import load_checkpoint_recipe
    from fledge.sample import resolve_checkpoint
    checkpoint = resolve_checkpoint(run)
    recipe = load_checkpoint_recipe(checkpoint, allow_code)
    e, where = recipe.eval, checkpoint / "recipe.yaml"
    taken: list[str] = []
    out = RecipeDefaults(data_file, list(validators) if validators is not None else [], dict(targets or {}),
                         max_new_tokens, [])
    if validators is None and e.validate and generate:
        code = [spec for spec in e.validate if ":" in parse_validator_flag(spec)[0]]
        if code and not allow_code:
            raise RecipeError(f"{where}: eval.validate names code to import and run ({', '.join(code)}); pass "
                              f"--allow-code (allow_code=True) if you trust this run, or give --validate instead.")
        out.validators = list(e.validate)
        taken.append(f"--validate {' '.join(e.validate)} (eval.validate)")
    if targets is None and e.targets:
        computed = metric_names(plan_validators(out.validators), generations=generate, losses=True)
        kept = {name: value for name, value in e.targets.items() if name in computed}
        out.targets = kept
        if kept:
            taken.append("targets " + ", ".join(f"{n}={v:g}" for n, v in kept.items()) + " (eval.targets)")
        dropped = [name for name in e.targets if name not in kept]
        if dropped:
            taken.append(f"not {', '.join(dropped)} of eval.targets: this evaluation does not compute "
                         f"{'them' if len(dropped) > 1 else 'it'}")
    if max_new_tokens is None and e.max_new_tokens and generate:
        out.max_new_tokens = e.max_new_tokens
        taken.append(f"--max-new-tokens {e.max_new_tokens} (eval.max_new_tokens)")
    if data_file is None and e.data:
        out.data_file = e.data
        taken.insert(0, f"--data {e.data} (eval.data)")
    elif data_file is None:
        out.data_name, out.inputs, out.records = _validation_rows(checkpoint, recipe, run)
        taken.insert(0, f"{out.data_name} (eval.data is empty)")
    if taken:
        out.notes = [f"from {where}: " + "; ".join(taken) + ". Flags override these."]
    return out


def _validation_rows(checkpoint: Path, recipe, run) -> tuple[str, list, Callable[[], list]]:
    """(the validation rows in words, their files, a function reading them): data.val_rows, or the
    data.val_fraction split of data.rows as training made it (fledge.train.rows, with the
    checkpoint's tokenizer and template)."""
    d = recipe.data
    if not d.rows or not (d.val_rows or d.val_fraction > 0):
        why = ("it trained on a text corpus, whose validation part is token shards" if not d.rows else
               "it held no rows out (data.val_fraction 0, no data.val_rows)")
        raise RecipeError(f"fledge eval {run}: no --data, and the run's recipe has no eval.data and no validation "
                          f"rows to use instead ({why}). Give --data FILE.")
    if d.val_rows:
        inputs = [src.path for src in d.val_rows]
        name = f"the run's validation rows (data.val_rows: {', '.join(inputs)})"
    else:
        inputs = [src.path for src in d.rows]
        name = (f"the run's validation rows (data.val_fraction {d.val_fraction:g} of data.rows, split by "
                f"data.split_seed {d.split_seed})")

    def read() -> list:
        from fledge.model.bases import checkpoint_tokenizer
        from fledge.sample import checkpoint_template
        from fledge.train.rows import build_row_batches
        tokenizer = checkpoint_tokenizer(checkpoint)
        template = checkpoint_template(checkpoint, tokenizer)
        records = build_row_batches(recipe, tokenizer, template, say=_silent).val_records
        if not records:
            raise DataError("no validation rows are left (every one was dropped as too long); give --data FILE.",
                            path=inputs[0])
        return records

    return name, inputs, read


def _check_options(named, generate, max_new_tokens, batch_size, temperature, seed, label) -> None:
    problems = []
    if not generate and named:
        problems.append("--validate judges generations and --no-generate makes none; drop one of them")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        problems.append(f"--max-new-tokens {max_new_tokens}: give at least 1")
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"--batch-size {batch_size}: give at least 1")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        problems.append(f"--temperature {temperature}: give 0 (greedy) or a positive number")
    if not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        problems.append(f"--seed {seed}: give a whole number from 0")
    if label is not None and not _LABEL.fullmatch(label):
        problems.append(f"--label {label!r}: a label names a folder under runs/<name>/eval/; use letters, digits, "
                        ". _ and - (e.g. val or dot-val)")
    if problems:
        raise RecipeError("; ".join(problems))


def _baseline_kind(baseline: str | Path) -> str:
    """"outputs" (a file of fixed outputs) or "run" (a fledge run or checkpoint folder)."""
    path = Path(baseline)
    if path.is_file() or (not path.exists() and path.suffix.lower() in ROW_SUFFIXES):
        if not path.exists():
            raise DataError("no such outputs file; --baseline takes a run or checkpoint folder, or a file of "
                            "outputs (one JSON object per data row, text in \"generation\")", path=str(path))
        return "outputs"
    fledge_marks = ("integrity.json", "recipe.yaml", "checkpoints")
    if path.is_dir() and (path / "config.json").is_file() and not any((path / m).exists() for m in fledge_marks):
        raise CheckpointError(f"--baseline {path} is a transformers model folder; eval loads fledge runs and "
                              f"checkpoints only (a transformers base is not supported here yet). Generate its "
                              f"outputs and pass the file as --baseline, or compare with a run fine-tuned from it.")
    return "run"


def run_name(checkpoint: Path) -> str:
    """runs/<name>/checkpoints/step-N -> <name>; any other checkpoint folder -> its own name."""
    return checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else checkpoint.name


def run_folder(given: Path, checkpoint: Path) -> Path:
    """The run folder results go under: the folder given, unless it is a checkpoint of runs/<name>/checkpoints."""
    if given.resolve() == checkpoint.resolve() and checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    return given


def _unique(name: str, other: str) -> str:
    return name if name != other else f"{name} (baseline)"


def _refuse_overwrite(folder: Path, inputs: list) -> None:
    if folder.exists() and not folder.is_dir():
        raise RecipeError(f"{folder} is a file; results go into a folder (summary.json and rows.jsonl). Give "
                          f"another --label or -o.")
    refuse_overwrite([("the summary file", folder / "summary.json"), ("the per-row file", folder / "rows.jsonl")],
                     inputs)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _silent(line: str) -> None:
    pass


# --- a model to evaluate ---------------------------------------------------------------------------

@dataclass
class Subject:
    """A loaded model with what it is prompted and scored with (the run's template for a baseline too)."""

    label: str
    loaded: object                 # fledge.sample.Loaded
    tokenizer: object              # transformers' whenever a template renders; else fledge's or transformers'
    template: object | None        # fledge.templates.Template
    system: str | None             # the template's system prompt, for rows without their own
    window: int | None             # the longest sequence the model takes
    notes: tuple[str, ...] = ()

    @classmethod
    def of(cls, loaded, label: str, like: "Subject | None" = None) -> "Subject":
        """`loaded` with its own template, or (`like`) with the template of the run it is compared with."""
        model_config = getattr(loaded.model, "config", None)
        window = loaded.recipe.model.max_seq_len or getattr(model_config, "max_seq_len", None)
        if like is None:
            return cls(label, loaded, loaded.tokenizer, loaded.template, loaded.recipe.template.system or None,
                       window)
        template, notes = like.template, []
        own = loaded.template
        if template is None and own is not None:
            notes.append(f"{label} has the template '{own.name}', and {like.label} none: both get plain-text "
                         f"prompts (BOS + prompt), as {like.label} was trained")
        elif template is not None and own is None:
            notes.append(f"{label} has no template of its own (a pretraining run): it is prompted with "
                         f"{like.label}'s template '{template.name}', so both see the same prompts")
        elif template is not None and own.source != template.source:
            notes.append(f"{label} was trained with the template '{own.name}'; it is prompted with {like.label}'s "
                         f"'{template.name}', so both see the same prompts")
        tokenizer = loaded.tokenizer
        if template is not None and not _is_transformers(tokenizer):
            from fledge.templates import hf_tokenizer
            from fledge.tokenizer import find_tokenizer_file
            tokenizer = hf_tokenizer(find_tokenizer_file(loaded.checkpoint))
        if template is not None and _extends(like.tokenizer, tokenizer, template):
            tokenizer = _as_fine_tuning_started(loaded, like, tokenizer, template, notes)
        subject = cls(label, loaded, tokenizer, template, like.system, window, tuple(notes))
        if template is not None:
            subject.check_template(like)
        return subject

    def check_template(self, like: "Subject") -> None:
        from fledge.errors import TemplateError
        from fledge.templates import render
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            render(probe, self.tokenizer, self.template)
        except TemplateError as e:
            raise RecipeError(f"--baseline {self.loaded.checkpoint}: it cannot be prompted with {like.label}'s "
                              f"template '{self.template.name}' ({str(e).split('. ')[0]}), so the two would not see "
                              f"the same prompts. Compare with a file of its outputs instead.") from None


def _is_transformers(tokenizer) -> bool:
    return hasattr(tokenizer, "convert_tokens_to_ids")


def _extends(run_tokenizer, tokenizer, template) -> bool:
    """Whether the run's tokenizer is `tokenizer` plus the tokens `template` needs and `tokenizer`
    lacks (a fine-tune of this base added them): the same token at every id the base has."""
    from fledge.templates import missing_template_tokens
    if not (_is_transformers(run_tokenizer) and missing_template_tokens(tokenizer, template)):
        return False
    if missing_template_tokens(run_tokenizer, template) or len(run_tokenizer) <= len(tokenizer):
        return False
    ours, theirs = tokenizer.get_vocab(), run_tokenizer.get_vocab()
    return all(theirs.get(token) == i for token, i in ours.items())


def _as_fine_tuning_started(loaded, like: "Subject", tokenizer, template, notes: list[str]):
    """The baseline as its fine-tune started: the run's tokenizer, the added tokens' rows at the
    mean embedding (fledge.model.adapters.resize_vocab, as fine-tuning initialises them), no update."""
    from fledge.model.adapters import input_embedding, resize_vocab
    from fledge.templates import missing_template_tokens
    added = missing_template_tokens(tokenizer, template)
    rows = len(like.tokenizer)
    if input_embedding(loaded.model).weight.shape[0] < rows:
        resize_vocab(loaded.model, rows)
    notes.append(f"{loaded.checkpoint} lacks the template's tokens {', '.join(added)}: it is prompted with "
                 f"{like.label}'s tokenizer, the {rows - len(tokenizer)} added token(s) at the mean embedding as "
                 f"fine-tuning initialises them, so it is the base as the fine-tune started")
    return like.tokenizer


# --- rows as token ids -----------------------------------------------------------------------------

@dataclass
class Encoded:
    """One row for one model: ids and shifted labels to score, the scored text's UTF-8 bytes, and the
    prompt ids to generate from (None: a text row, nothing to generate from)."""

    ids: list[int]
    labels: list[int]
    n_bytes: int
    prompt: list[int] | None
    too_long: bool = False

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def encode_rows(subject: Subject, records: Sequence[Record]) -> list[Encoded]:
    """Every row as `subject` scores and prompts it (module docstring); a row that cannot be rendered
    is a DataError at its file:line."""
    from fledge.errors import TemplateError
    out = []
    for record in records:
        try:
            row = _encode_templated(subject, record) if subject.template else _encode_plain(subject, record)
        except (DataError, TemplateError) as e:
            raise DataError(f"{str(e).rstrip('.')}. Fix the row: every row is evaluated.", path=record.source,
                            line=record.line) from None
        row.too_long = bool(subject.window) and len(row.ids) > subject.window
        out.append(row)
    return out


def _encode_templated(subject: Subject, record: Record) -> Encoded:
    from fledge.sample import prompt_ids
    from fledge.train.rows import _Renderer, shifted_labels
    own_system = record.messages[0]["role"] == "system"
    system = None if own_system else subject.system
    # The training rendering (fledge.train.rows): every answer and its end token trained, or for a text
    # row BOS + text + EOS with every token trained.
    ids, trained = _Renderer(subject.tokenizer, subject.template, system)(record)
    labels = shifted_labels(ids, trained).tolist()
    answers = [m["content"] for m in record.messages if m["role"] == "assistant"]
    if not any(answers):
        labels = [IGNORE] * len(labels)          # only end tokens: no answer tokens to score
    prompt = None if record.is_completion else prompt_ids(subject.tokenizer, record.messages[:-1], subject.template,
                                                          system=system)
    return Encoded(list(ids), labels, sum(len(a.encode("utf-8")) for a in answers), prompt)


def _encode_plain(subject: Subject, record: Record) -> Encoded:
    from fledge.sample import encode_prompt, encode_text, eos_id
    tok = subject.tokenizer
    head = encode_prompt(tok, record.prompt)                     # BOS + prompt, as `fledge sample --raw` prompts
    answer = encode_text(tok, record.response)
    eos = eos_id(tok)
    if answer and eos is not None:
        answer = answer + [eos]
    ids = head + answer
    labels = [IGNORE] * len(ids)
    # label[t] = the token after t, for every answer token; without BOS or prompt the first token has
    # no context and is not scored.
    for t in range(max(len(head) - 1, 0), len(ids) - 1):
        labels[t] = ids[t + 1]
    prompt = None if record.is_completion else head
    return Encoded(ids, labels, len(record.response.encode("utf-8")), prompt)


def same_tokens(a: Sequence[Encoded], b: Sequence[Encoded]) -> bool:
    """Whether two models score the very same token ids as targets on every row."""
    return all(x.ids == y.ids and x.labels == y.labels for x, y in zip(a, b))


def default_max_new_tokens(subject: Subject, records: Sequence[Record]) -> int:
    """Twice the longest reference in the run's tokens, plus 16: room for an answer and its end."""
    from fledge.sample import encode_text
    longest = max((len(encode_text(subject.tokenizer, r.response)) for r in records if not r.is_completion),
                  default=0)
    return 2 * longest + 16


# --- running one model -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Decoding:
    """How every model of one evaluation generates."""

    max_new_tokens: int
    temperature: float
    seed: int
    batch_size: int

    def describe(self, template) -> str:
        how = "greedy (temperature 0)" if self.temperature == 0 else (
            f"sampled at temperature {self.temperature:g} with seed {self.seed} (one generator per batch)")
        stop = "the template's end of turn" if template is not None else "EOS"
        return (f"generation: {how}, at most {self.max_new_tokens:,} new tokens, stopping at {stop}; batches of up "
                f"to {self.batch_size} prompts of equal length (grouped by length, no padding)")

    def settings(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "seed": self.seed,
                "batch_size": self.batch_size, "batching": "prompts grouped by length"}


def run_subject(subject: Subject, records: Sequence[Record], encoded: Sequence[Encoded], decoding: Decoding, *,
                generate: bool, device, say: Callable[[str], None]) -> SystemOutput:
    """Losses and (when `generate`) generations of one model on the rows."""
    scored = [i for i, e in enumerate(encoded) if not e.too_long and e.n_targets]
    if not scored:
        raise DataError(_nothing_to_score(subject, encoded), path=str(records[0].source))
    pad = getattr(subject.tokenizer, "pad_token_id", None) or 0
    progress = Progress(f"{subject.label}: loss on", "rows", len(scored), say)
    sums = row_losses(subject.loaded.model, [(encoded[i].ids, encoded[i].labels) for i in scored], device,
                      batch_size=decoding.batch_size, pad_id=pad, on_rows=progress.advance)
    losses: list[tuple[float, int, int] | None] = [None] * len(records)
    for i, (total, count) in zip(scored, sums):
        losses[i] = (total, count, encoded[i].n_bytes)
    generations = None
    if generate:
        generations = generate_answers(subject, [e.prompt for e in encoded], decoding, say=say)
    output = SystemOutput(subject.label, str(subject.loaded.checkpoint), generations, losses)
    output.loss_note = _left_out(subject, encoded)
    return output


def _nothing_to_score(subject: Subject, encoded: Sequence[Encoded]) -> str:
    too_long = sum(e.too_long for e in encoded)
    empty = sum(not e.n_targets for e in encoded)
    what = "answer tokens" if subject.template else "tokens"
    reasons = []
    if empty:
        reasons.append(f"{empty:,} with empty answers")
    if too_long:
        reasons.append(f"{too_long:,} longer than the model's {subject.window:,}-token window")
    return (f"no row has {what} to score for {subject.label} ({', '.join(reasons)}, of {len(encoded):,}); "
            f"evaluate on rows with answers that fit the model.")


def _left_out(subject: Subject, encoded: Sequence[Encoded]) -> str:
    too_long = sum(e.too_long for e in encoded)
    empty = sum(not e.too_long and not e.n_targets for e in encoded)
    parts = []
    if too_long:
        parts.append(f"{too_long:,} longer than the model's {subject.window:,}-token window")
    if empty:
        parts.append(f"{empty:,} with empty answers")
    return " and ".join(parts)


def _loss_notes(output: SystemOutput) -> list[str]:
    if not output.loss_note:
        return []
    rows = sum(x is None for x in output.losses or [])
    return [f"{output.label}: {rows:,} row{'s' if rows != 1 else ''} left out of loss, perplexity and bits per byte "
            f"({output.loss_note})"]


def describe_loss(subject: Subject, records: Sequence[Record], output: SystemOutput) -> str:
    kept = [x for x in output.losses if x is not None]
    counts = f"{sum(x[1] for x in kept):,} tokens, {sum(x[2] for x in kept):,} bytes"
    if subject.template is not None:
        return (f"loss: answer tokens only (every answer and its end token, rendered with the template "
                f"'{subject.template.name}' as in training); {counts}")
    if all(r.is_completion for r in records):
        return f"loss: every token of each text (BOS + text + EOS; no template); {counts}"
    return f"loss: answer tokens only (BOS + prompt + answer + EOS as plain text, no template); {counts}"


# --- generation ------------------------------------------------------------------------------------

def generate_answers(subject: Subject, prompts: Sequence[list[int] | None], decoding: Decoding, *,
                     say: Callable[[str], None] = _silent) -> list[str | None]:
    """The answer to every prompt (None where the prompt is None), in batches of equal prompt length."""
    from fledge.recipe import SampleConfig
    from fledge.sample import generate_batch
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        if p is not None:
            by_length.setdefault(len(p), []).append(i)
    batches = [rows[k:k + decoding.batch_size] for _, rows in sorted(by_length.items())
               for k in range(0, len(rows), decoding.batch_size)]
    out: list[str | None] = [None] * len(prompts)
    progress = Progress(f"{subject.label}: generated", "answers", sum(map(len, batches)), say)
    model = subject.loaded.model
    if batches and not callable(getattr(model, "generate", None)):
        raise RecipeError(f"the model of {subject.label} ({type(model).__name__}) has no generate method, which "
                          f"eval needs for answers; add one to your model.arch (see GPT.generate), or pass "
                          f"--no-generate for the loss only.")
    # As `fledge.sample.generate_from_ids`, batched: greedy unless temperature > 0, no top-k or top-p.
    config = SampleConfig(max_new_tokens=decoding.max_new_tokens, temperature=decoding.temperature, top_k=0,
                          top_p=1.0)
    device = next(model.parameters()).device
    for batch in batches:
        generator = torch.Generator(device=device).manual_seed((decoding.seed * 1_000_003 + batch[0]) % 2 ** 63)
        texts = generate_batch(model, subject.tokenizer, [prompts[i] for i in batch], config, generator=generator,
                               device=device, window=subject.window, template=subject.template)
        for i, text in zip(batch, texts):
            out[i] = text
        progress.advance(len(batch))
    return out


class Progress:
    """A line every PROGRESS_EVERY_S seconds and one at the end: done/total, rate, time left."""

    def __init__(self, what: str, unit: str, total: int, say: Callable[[str], None]):
        self.what, self.unit, self.total, self.say = what, unit, total, say
        self.done, self.start = 0, time.monotonic()
        self.shown = self.start

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.shown < PROGRESS_EVERY_S and self.done < self.total:
            return
        self.shown = now
        rate = self.done / max(now - self.start, 1e-9)
        left = "done" if self.done >= self.total else f"about {(self.total - self.done) / rate:.0f}s left"
        self.say(f"{self.what} {self.done:,}/{self.total:,} {self.unit}, {rate:.1f} {self.unit}/s, {left}")
