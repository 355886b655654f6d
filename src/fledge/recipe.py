"""One recipe: a YAML file validated into a tree of typed dataclasses.

    recipe = load_recipe("recipes/shakespeare-char.yaml", overrides=["train.lr=3e-4"])

Every field has a default, a type and a one-line help text (`fledge recipe keys` prints
them all). Validation happens once, at load time, and reports every problem together:
unknown keys come with the closest valid name, bad values name the key and the allowed
range. Stages receive the typed sub-configs (`recipe.train`, `recipe.model`, ...).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fledge.errors import RecipeError
from fledge.files import storage_error, write_atomic


def option(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
           max: float | None = None) -> Any:
    """A recipe field: its default, one line of help, and the values it allows."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


ROW_FORMATS = ("auto", "io", "alpaca", "chat", "prompt_completion", "text")


@dataclass
class RowSource:
    path: str = option("", "a .jsonl, .json, .csv or .parquet file of rows; relative to the working directory")
    format: str = option("auto", "how its rows read: detected per row (auto), or one format for every row",
                         choices=ROW_FORMATS)
    input_field: str = option("", "field holding the prompt when it has another name (e.g. input_code)")
    output_field: str = option("", "field holding the answer when it has another name (e.g. output_dot)")
    weight: float = option(1.0, "how often this source's rows are drawn relative to the other sources'", min=0.0)


@dataclass
class DataConfig:
    sources: list = option([], "text files, folders or globs (.txt, .md, .jsonl); relative to the working directory")
    rows: list[RowSource] = option([], "fine-tuning rows (instruction, chat, input/output pairs): files, or "
                                   "{path, format, input_field, output_field, weight}; instead of sources")
    val_rows: list[RowSource] = option([], "held-out rows for validation; empty: val_fraction of data.rows, "
                                       "split by split_seed")
    group_by: str = option("", "metadata field whose equal values stay on one side of the val split of rows")
    text_field: str = option("text", "field holding the text in .jsonl sources")
    strip_gutenberg: bool = option(False, "cut Project Gutenberg headers and footers (*** START/END OF ...)")
    on_decode_error: str = option("error", "what to do with bytes that are not UTF-8", choices=("error", "replace"))
    on_bad_row: str = option("error", "a .jsonl row that is not a valid record: stop (error), or drop it and "
                             "report it (skip)", choices=("error", "skip"))
    val_fraction: float = option(0.1, "share of the corpus held out for validation", min=0.0, max=0.5)
    split_seed: int = option(1234, "seed of the document-level train/val split")
    shard_tokens: int = option(100_000_000, "tokens per shard file", min=1000)
    prepared_dir: str = option("", "where tokenizer, shards and manifest go; empty: <run_dir>/data")


@dataclass
class TokenizerConfig:
    kind: str = option("bpe", "byte-level BPE, SentencePiece, or one token per character",
                       choices=("bpe", "sentencepiece", "char"))
    vocab_size: int = option(4096, "vocabulary size including special tokens (char: an upper bound)", min=8,
                             max=2**32 - 1)
    train_bytes: int = option(200_000_000, "at most this many bytes of the corpus train the tokenizer",
                              min=1000)
    path: str = option("", "use this saved tokenizer file instead of training one")


@dataclass
class ModelConfig:
    arch: str = option("llama", "registered architecture name, or 'package.module:function' for your own")
    base: str = option("", "start from this model (its weights, architecture and tokenizer): a fledge run or "
                       "checkpoint folder, a transformers model folder, or a hub id when online")
    trust_remote_code: bool = option(False, "let a transformers base run Python code of its own (only bases you "
                                     "trust)")
    preset: str = option("", "named size (see `fledge recipe keys`); keys set here override it")
    n_layers: int = option(4, "transformer blocks", min=1)
    n_heads: int = option(4, "attention heads", min=1)
    n_kv_heads: int = option(0, "key/value heads for grouped-query attention; 0: same as n_heads", min=0)
    dim: int = option(128, "hidden width", min=8)
    hidden_dim: int = option(0, "MLP width; 0: 8/3 of dim rounded up to a multiple of 32", min=0)
    max_seq_len: int = option(1024, "longest sequence the model supports", min=8)
    rope_theta: float = option(10000.0, "RoPE base", min=1.0)
    norm_eps: float = option(1e-5, "RMSNorm epsilon", min=0.0)
    tie_embeddings: bool = option(True, "share input embedding and output head weights")
    dropout: float = option(0.0, "dropout after attention and MLP", min=0.0, max=1.0)
    init_std: float = option(0.02, "std of the normal weight init", min=0.0)

    # Not a recipe key: whether `arch` may name code to import (set by load_recipe's allow_code).
    # build_model refuses a module:function arch unless this is true, so a recipe read from a
    # checkpoint without permission can never run code, even after it is edited in Python.
    code_allowed = False


@dataclass
class TrainConfig:
    max_steps: int = option(1000, "optimizer steps", min=1)
    batch_size: int = option(12, "sequences per micro-batch on each process", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1)
    block_size: int = option(64, "tokens per training sequence", min=2)
    lr: float = option(1e-3, "peak learning rate", min=0.0)
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay", min=0.0)
    warmup_steps: int = option(100, "linear warmup steps", min=0)
    schedule: str = option("cosine", "learning-rate shape after warmup", choices=("cosine", "linear", "constant"))
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (not norms or biases)", min=0.0)
    beta1: float = option(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = option(0.99, "AdamW beta2", min=0.0, max=1.0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0: off", min=0.0)
    seed: int = option(1337, "seed of init, batches and dropout", min=0, max=2**32 - 1)
    device: str = option("auto", "where to train; auto: cuda > mps > cpu", choices=("auto", "cpu", "cuda", "mps"))
    precision: str = option("auto", "auto: bf16 autocast on CUDA that supports it, else fp32; fast: also bf16 "
                            "on CPUs with native bf16 (AVX-512 BF16, AMX)",
                            choices=("auto", "fast", "fp32", "bf16", "fp16"))
    compile: bool = option(False, "torch.compile the model (slow start, faster steps)")
    threads: int = option(0, "CPU threads for torch; 0: one per physical core", min=0)
    log_every: int = option(10, "steps between progress lines and metrics rows", min=1)
    eval_every: int = option(250, "steps between validation passes; 0: only at the end", min=0)
    eval_batches: int = option(20, "fixed validation batches per pass", min=1)
    checkpoint_every: int = option(500, "steps between checkpoints; 0: only at the end", min=0)
    keep_last: int = option(2, "checkpoints kept besides the best one", min=1)
    tensorboard: bool = option(False, "also write TensorBoard logs (needs the tensorboard package)")
    epochs: float = option(0.0, "passes over the fine-tuning rows; when above 0 it sets max_steps", min=0.0)
    early_stop_patience: int = option(0, "stop after this many evaluations of train.select_by without "
                                      "improvement; 0: off", min=0)
    early_stop_min_delta: float = option(0.0, "an evaluation improves when train.select_by gets better by more "
                                         "than this (val loss falls, a share such as dot rises)", min=0.0)
    select_by: str = option("val_loss", "what picks the best checkpoint and drives early stopping: val_loss "
                            "(lower is better), or a metric of the generation evaluations (eval.every): "
                            "exact_match, normalized_match, a validator of eval.validate (dot, json, ...), purity, "
                            "adherence (higher is better)")


@dataclass
class TemplateConfig:
    name: str = option("", "chat template of fine-tuning and inference: chatml, llama-3, gemma, alpaca, qa, "
                       "plain, or base (the base's own); empty: the base's own, else an error")
    jinja: str = option("", "your own Jinja chat template, answers inside {% generation %} blocks; "
                        "overrides name")
    system: str = option("", "system prompt rendered before every conversation")


@dataclass
class FinetuneConfig:
    method: str = option("full", "which weights train: all of them (full), low-rank adapters (lora), or "
                         "adapters on a 4- or 8-bit frozen base (qlora)", choices=("full", "lora", "qlora"))
    lora_r: int = option(8, "adapter rank", min=1)
    lora_alpha: float = option(16.0, "adapter scale numerator (the update is scaled by alpha / r)", min=0.0)
    lora_dropout: float = option(0.0, "dropout on the adapters' input", min=0.0, max=1.0)
    lora_targets: list = option([], "module names to adapt; empty: every attention and MLP projection")
    quant_bits: int = option(4, "qlora: bits of the frozen base (4: nf4, 8: int8)", choices=(4, 8))
    train_on_prompt: bool = option(False, "train on prompt tokens too (default: answers and their end token)")
    packing: bool = option(True, "pack several rows into each train.block_size sequence (attention stays "
                           "within a row); false: one row per sequence, padded")
    max_length: int = option(0, "longest row in tokens; 0: train.block_size", min=0)
    on_too_long: str = option("error", "rows longer than max_length: stop and name them (error), cut the prompt "
                              "from the left (truncate), or drop them (drop)", choices=("error", "truncate", "drop"))


@dataclass
class SampleConfig:
    prompts: list = option(["\n"], "fixed prompts sampled at each evaluation")
    max_new_tokens: int = option(100, "tokens generated per sample", min=1)
    temperature: float = option(0.8, "softmax temperature; 0: greedy", min=0.0)
    top_k: int = option(0, "keep only the k most likely tokens; 0: off", min=0)
    top_p: float = option(1.0, "nucleus sampling mass; 1: off", min=0.0, max=1.0)


@dataclass
class EvalConfig:
    data: str = option("", "held-out rows `fledge eval RUN` and the evaluations during training answer (any row "
                       "format); empty: the run's validation rows (data.val_rows, or the val_fraction split)")
    validate: list = option([], "validators whose pass rates are measured, as --validate takes them: dot, cypher, "
                            "sql, json, python, regex:pattern=..., vocabulary:path=WORDS (purity and adherence), "
                            "or pkg.module:function")
    targets: dict = option({}, "thresholds reported as met or missed, e.g. {purity: 0.85, ppl: 20}; shares are met "
                           "at or above, loss, ppl and bpb at or below")
    every: int = option(0, "steps between generation evaluations during training: greedy answers to eval.rows "
                        "held-out rows, scored by eval.validate and exact match; 0: off", min=0)
    rows: int = option(32, "held-out rows answered at each evaluation during training: a fixed subset drawn with "
                       "train.seed, the same rows every time", min=1)
    max_new_tokens: int = option(0, "longest generated answer in tokens; 0: twice the longest reference plus 16",
                                 min=0)


@dataclass
class Recipe:
    name: str = option("run", "run name; the run folder defaults to runs/<name>")
    run_dir: str = option("", "run folder; empty: runs/<name>")
    data: DataConfig = section(DataConfig, "corpus sources and how they are split")
    tokenizer: TokenizerConfig = section(TokenizerConfig, "tokenizer kind and size")
    model: ModelConfig = section(ModelConfig, "architecture and size")
    train: TrainConfig = section(TrainConfig, "optimizer, schedule, evaluation and checkpoints")
    finetune: FinetuneConfig = section(FinetuneConfig, "fine-tuning method, adapters, masking and packing")
    template: TemplateConfig = section(TemplateConfig, "how conversations become text, at training and inference")
    sample: SampleConfig = section(SampleConfig, "sampling defaults and the prompts sampled during training")
    eval: EvalConfig = section(EvalConfig, "held-out evaluation: rows, validators and targets for `fledge eval`, "
                                           "and generation evaluations during training")

    # Not a recipe key: the dotted keys the YAML and overrides set (the others hold defaults).
    # A base model fills the unset model keys and refuses set ones that contradict it.
    given = frozenset()

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    @property
    def prepared_path(self) -> Path:
        return Path(self.data.prepared_dir) if self.data.prepared_dir else self.run_path / "data"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def fingerprint(self, *sections: str) -> str:
        """A short hash of the named sections, to tell whether saved work still matches."""
        d = self.to_dict()
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def save(self, path: Path) -> None:
        write_atomic(path, self.to_yaml())


# --- loading and validation -------------------------------------------------------------

def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None, allow_code: bool = True, check_machine: bool = True) -> Recipe:
    """Read a YAML recipe (or start from `base`), apply `key.path=value` overrides, validate.

    `allow_code=False` refuses a `model.arch: module:function` instead of importing it: use it
    for recipes saved inside runs and checkpoints, which the user did not write for this command.
    `check_machine=False` skips the checks that matter only for running the recipe here (the
    tensorboard package, a GPU for fp16, `name` as a folder under runs/): a saved recipe may
    come from another machine or an older fledge.
    """
    source = str(path) if path else "recipe"
    raw: dict = {} if base is None else json.loads(json.dumps(base))
    if path is not None:
        loaded = read_yaml_mapping(Path(path), "recipe",
                                   "a recipe is a mapping of sections (data:, model:, train:, ...)")
        raw = _deep_merge(raw, loaded)
    for item in overrides or []:
        _apply_override(raw, item, source)
    _apply_model_preset(raw)
    problems: list[str] = []
    recipe = _build(Recipe, raw, "", problems)
    if not problems:
        problems.extend(check_consistency(recipe, allow_code))
    if check_machine:
        problems.extend(check_machine_support(recipe))
    if check_machine and allow_code and not problems:
        problems.extend(eval_validator_problems(recipe))
    raise_problems(source, problems)
    recipe.model.code_allowed = allow_code
    recipe.given = frozenset(_dotted_keys(raw))
    return recipe


def _dotted_keys(raw: dict, prefix: str = "") -> list[str]:
    """Every key a recipe sets itself, dotted (`model.dim`): a base's values may fill the others."""
    out = []
    for key, value in raw.items():
        out.append(prefix + str(key))
        if isinstance(value, dict):
            out.extend(_dotted_keys(value, f"{prefix}{key}."))
    return out


def raise_problems(source: str, problems: list[str]) -> None:
    """One RecipeError listing every problem found, or nothing."""
    if len(problems) == 1:
        raise RecipeError(f"{source}: {problems[0]}")
    if problems:
        raise RecipeError(f"{source}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def read_yaml_mapping(path: Path, what: str, shape: str) -> dict:
    """A YAML file that must hold a mapping; errors name the file (and line) and the fix."""
    if not path.is_file():
        raise RecipeError(f"{path}: no such {what} file. Check the path"
                          + (", for example one under recipes/." if what == "recipe" else "."))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path} (byte {e.start}): not UTF-8 text ({e.reason}). Save the {what} file as "
                          f"UTF-8.") from None
    except OSError as e:
        raise storage_error(e, path, "read") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML ({_yaml_problem(e)}). Fix the syntax.") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to read. Fix the syntax.") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise RecipeError(f"{path}: {shape}, not a {type(loaded).__name__}.")
    return loaded


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's short description of a syntax error, on one line."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return " ".join(str(problem).split())


def _apply_override(raw: dict, item: str, source: str) -> None:
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: write overrides as key.path=value, e.g. --set train.lr=3e-4")
    key, _, text = item.partition("=")
    parts = [part.strip() for part in key.split(".")]
    if not all(parts):
        raise RecipeError(f"--set {item!r}: the key has an empty part; write key.path=value with a full dotted "
                          f"key, e.g. --set train.lr=3e-4 (`fledge recipe keys` lists them)")
    text = text.strip()     # surrounding spaces and tabs are never part of a value; YAML rejects tabs
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {item!r}: the value is not valid YAML ({_yaml_problem(e)}). Quote it, e.g. "
                          f"--set '{'.'.join(parts)}=\"...\"'") from None
    except RecursionError:
        raise RecipeError(f"--set {item!r}: the value is nested too deeply") from None
    node = raw
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise RecipeError(f"--set {item}: {part} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _apply_model_preset(raw: dict) -> None:
    model = raw.get("model")
    if not isinstance(model, dict) or not model.get("preset"):
        return
    from fledge.model.registry import PRESETS
    name = model["preset"]
    if name not in PRESETS:
        return  # reported by check_consistency with the list of names
    preset = dict(PRESETS[name])
    if "dim" in model and "hidden_dim" not in model:
        preset.pop("hidden_dim")        # the MLP follows the width you set (8/3 of it), not the preset's
    model.update({k: v for k, v in preset.items() if k not in model})


# A run name becomes a folder under runs/: one path component that cannot climb out of it.
RUN_NAME = re.compile(r"\w[\w.-]*")

# Names other trainers use (nanoGPT, transformers, llama2.c), so a user's habit gets a useful hint.
SYNONYMS = {"learning_rate": "lr", "max_iters": "max_steps", "n_layer": "n_layers", "n_head": "n_heads",
            "n_embd": "dim", "hidden_size": "dim", "num_hidden_layers": "n_layers",
            "num_attention_heads": "n_heads", "intermediate_size": "hidden_dim",
            "gradient_accumulation_steps": "grad_accum", "warmup_iters": "warmup_steps",
            "eval_interval": "eval_every", "log_interval": "log_every", "vocab": "vocab_size"}


def _build(cls: type, raw: Any, prefix: str, problems: list[str],
           names: typing.Mapping[str, str] | None = None) -> Any:
    """`cls` from the mapping `raw`, appending every problem; `names` relabels keys in messages."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping of keys, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = [SYNONYMS[key]] if SYNONYMS.get(key) in fields else \
                difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(fields)}"
            problems.append(f"unknown key {prefix}{key}{hint}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            values[name] = _build(typ, raw[name], f"{prefix}{name}.", problems, names)
        elif _item_class(typ):
            values[name] = _build_list(_item_class(typ), raw[name], f"{prefix}{name}", problems, names)
        else:
            ok, value = _coerce(raw[name], typ)
            key = (names or {}).get(prefix + name, prefix + name)
            if not ok:
                problems.append(f"{key} must be {_type_name(typ)}, got {raw[name]!r}")
                continue
            if typ is float and not math.isfinite(value):   # NaN passes every range check
                problems.append(f"{key} is {value}; it must be a finite number")
                continue
            problem = _check_range(key, value, f.metadata)
            if problem:
                problems.append(problem)
                continue
            values[name] = value
    return cls(**values)


def _item_class(typ: Any) -> type | None:
    """The dataclass of a `list[SomeConfig]` field, else None."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _build_list(cls: type, raw: Any, key: str, problems: list[str], names) -> list:
    """A list of `cls` from a list of mappings; a bare string (or a list of them) names `cls`'s first
    field, so `rows: [a.jsonl, {path: b.csv, weight: 2}]` and `rows: a.jsonl` both work."""
    items = raw if isinstance(raw, list) else [raw]
    first = dataclasses.fields(cls)[0].name
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {first: item}
        out.append(_build(cls, item, f"{key}[{i}].", problems, names))
    return out


def _coerce(value: Any, typ: Any) -> tuple[bool, Any]:
    if typ is bool:
        return isinstance(value, bool), value
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if typ is float:
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False, value
        try:
            return True, float(value)
        except OverflowError:       # an integer too large for a float
            return False, value
    if typ is str:
        return isinstance(value, str), value
    if typ is list:
        if isinstance(value, str):
            value = [value]
        return isinstance(value, list), value
    if typ is dict:
        return isinstance(value, dict), value
    return True, value


def _type_name(typ: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(typ, str(typ))


def _check_range(key: str, value: Any, meta: typing.Mapping) -> str | None:
    choices = meta.get("choices")
    if choices and value not in choices:
        return f"{key} is {value!r}; choose one of {', '.join(map(str, choices))}"
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"from {lo} to {hi}" if lo is not None and hi is not None else (
                f"at least {lo}" if lo is not None else f"at most {hi}")
            return f"{key} is {value}; it must be {rng}"
    return None


def check_consistency(r: Recipe, allow_code: bool = True) -> list[str]:
    """Rules that tie several keys together (`allow_code`: may a module:function arch be imported)."""
    from fledge.model.registry import PRESETS, arch_syntax_problem
    out = []
    m, t = r.model, r.train
    if m.preset and m.preset not in PRESETS:
        close = difflib.get_close_matches(m.preset, list(PRESETS), n=1)
        out.append(f"model.preset {m.preset!r} is not known" + (f"; did you mean {close[0]}?" if close else "")
                   + f" Presets: {', '.join(PRESETS)}")
    arch_problem = arch_syntax_problem(m.arch)
    if arch_problem:
        out.append(arch_problem)
    elif ":" in m.arch and not allow_code:
        out.append(f"model.arch {m.arch!r} names code to import and run; fledge runs code named by a saved "
                   f"recipe only when you allow it: add --allow-code (allow_code=True in Python) if you "
                   f"trust where this checkpoint came from")
    elif ":" in m.arch:
        from fledge.model.registry import resolve_arch
        try:
            resolve_arch(m.arch)     # import the user's module now, not after data preparation
        except RecipeError as e:
            out.append(str(e))
    if m.dim % m.n_heads:
        out.append(f"model.dim ({m.dim}) must be a multiple of model.n_heads ({m.n_heads})")
    elif (m.dim // m.n_heads) % 2:
        out.append(f"model.dim / model.n_heads ({m.dim // m.n_heads}) must be even for RoPE")
    if m.n_kv_heads and m.n_heads % m.n_kv_heads:
        out.append(f"model.n_heads ({m.n_heads}) must be a multiple of model.n_kv_heads ({m.n_kv_heads})")
    if t.block_size > m.max_seq_len and not (m.base and "model.max_seq_len" not in r.given):
        # with a base, an unset max_seq_len is the base's: checked again once the base fills it in
        out.append(f"train.block_size ({t.block_size}) exceeds model.max_seq_len ({m.max_seq_len}), the longest "
                   f"sequence the model supports. Lower train.block_size or raise model.max_seq_len.")
    if t.warmup_steps > t.max_steps:
        out.append(f"train.warmup_steps ({t.warmup_steps}) exceeds train.max_steps ({t.max_steps}). "
                   f"Lower warmup_steps or raise max_steps.")
    if t.min_lr > t.lr:
        out.append(f"train.min_lr ({t.min_lr}) exceeds train.lr ({t.lr})")
    if r.tokenizer.kind != "char" and r.tokenizer.vocab_size < 260:
        out.append(f"tokenizer.vocab_size ({r.tokenizer.vocab_size}) is below the 256 bytes plus special tokens "
                   f"a {r.tokenizer.kind} tokenizer needs; use at least 260 or tokenizer.kind: char")
    return out + _finetune_problems(r) + _eval_problems(r)


def _finetune_problems(r: Recipe) -> list[str]:
    """Rules for starting from a base and training on rows."""
    out = []
    d, f, m = r.data, r.finetune, r.model
    if d.rows and d.sources:
        out.append("data.sources and data.rows are both set: a run trains on a text corpus (sources) or on "
                   "rows (instruction, chat, pairs), not both. Keep one")
    if d.val_rows and not d.rows:
        out.append("data.val_rows is set without data.rows; validation rows need training rows")
    if d.rows and not m.base:
        out.append("data.rows needs model.base: fine-tuning starts from a trained model (a fledge run, a "
                   "transformers folder). Pretrain one first with data.sources")
    if f.method != "full" and not m.base:
        out.append(f"finetune.method {f.method} needs model.base: adapters train on top of a trained model")
    for i, src in enumerate(d.rows + d.val_rows):
        key = f"data.rows[{i}]" if i < len(d.rows) else f"data.val_rows[{i - len(d.rows)}]"
        if not src.path:
            out.append(f"{key}.path is empty; name a .jsonl, .json, .csv or .parquet file")
    if d.rows and not any(src.weight > 0 for src in d.rows):
        out.append("every data.rows weight is 0; give at least one source a weight above 0")
    if f.max_length > r.train.block_size:
        out.append(f"finetune.max_length ({f.max_length}) exceeds train.block_size ({r.train.block_size}), the "
                   f"length of a training sequence. Lower max_length or raise block_size")
    if r.train.epochs and not d.rows:
        out.append("train.epochs counts passes over data.rows; a corpus run counts train.max_steps. Remove "
                   "train.epochs or set data.rows")
    return out  # keys that contradict the base (model.*, tokenizer.*) are checked by model.bases.load_base


def _eval_problems(r: Recipe) -> list[str]:
    """eval.validate's syntax, eval.targets and train.select_by against the metrics the validators give,
    and what generation evaluations during training need. Nothing is imported or read (see
    `eval_validator_problems`); eval.targets' "85%" strings become 0.85."""
    e, t, d = r.eval, r.train, r.data
    out: list[str] = []
    plan = _eval_plan(e.validate, out)
    if e.targets or t.select_by != "val_loss":
        from fledge.evaluate.score import metric_names
        if plan is not None:
            out += _target_problems(r, metric_names(plan, generations=True, losses=True))
            out += _select_by_problems(r, metric_names(plan))
    if e.every and not e.data and not (d.rows and (d.val_rows or d.val_fraction > 0)):
        out.append(f"eval.every ({e.every}) generates answers to held-out rows during training, and this run has "
                   f"none: give eval.data (a rows file), or data.rows with data.val_rows or data.val_fraction above 0")
    return out


def _eval_plan(specs: list, out: list[str]) -> list | None:
    """eval.validate as `plan_validators` gives it (metric names, nothing built), or None with problems."""
    bad = [f"eval.validate[{i}] is {spec!r}; write each validator as NAME[:key=value,...], e.g. dot, "
           f"sql:dialect=postgres or vocabulary:path=words.txt" for i, spec in enumerate(specs)
           if not isinstance(spec, str) or not spec.strip()]
    if bad:
        out += bad
        return None
    if not specs:
        return []
    from fledge.evaluate.metrics import parse_validator_flag, plan_validators
    from fledge.validators import VALIDATORS
    try:
        plan = plan_validators(specs)
    except RecipeError as e:
        out.append("eval.validate" + str(e).removeprefix("--validate"))
        return None
    for i, spec in enumerate(specs):
        name = parse_validator_flag(spec)[0]
        if ":" not in name and name not in VALIDATORS:
            close = difflib.get_close_matches(name, list(VALIDATORS), n=1, cutoff=0.5)
            out.append(f"eval.validate[{i}] {spec!r}: no validator {name!r}"
                       + (f"; did you mean {close[0]!r}?" if close else ";")
                       + f" Known: {', '.join(sorted(VALIDATORS))}, or pkg.module:function for your own")
    return plan


def _target_problems(r: Recipe, names: list[str]) -> list[str]:
    from fledge.evaluate.score import target_problems
    out, targets = [], {}
    for name, value in r.eval.targets.items():
        if isinstance(value, str) and value.strip().endswith("%"):
            try:
                value = float(value.strip()[:-1]) / 100
            except ValueError:
                pass
        targets[str(name)] = value
    for name, value, shows_value, text in target_problems(targets, names, add="add {} to eval.validate"):
        out.append(f"eval.targets.{name}{f' ({value!r})' if shows_value else ''}: {text}")
    if not out:
        r.eval.targets = {name: float(value) for name, value in targets.items()}
    return out


def _select_by_problems(r: Recipe, names: list[str]) -> list[str]:
    """train.select_by: val_loss, or a generation metric measured during training (eval.every)."""
    from fledge.evaluate.metrics import LOSS_METRICS, VOCABULARY_METRICS
    from fledge.validators import VALIDATORS
    key = r.train.select_by
    if key == "val_loss":
        return []
    choices = f"Choose val_loss or one of {', '.join(names)}"
    if key in LOSS_METRICS or key in ("val_ppl", "val_bpb"):
        return [f"train.select_by {key!r}: the loss measured during training is the validation loss; write "
                f"val_loss (a lower val_loss is a lower {key})"]
    if key not in names:
        if key in VOCABULARY_METRICS:
            hint = " It comes from the vocabulary validator: add vocabulary:path=WORDS_FILE to eval.validate."
        elif key in VALIDATORS or ":" in key:
            hint = f" Add {key} to eval.validate to measure it."
        else:
            close = difflib.get_close_matches(key, ["val_loss", *names], n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
        return [f"train.select_by {key!r} is not a metric the evaluations compute.{hint} {choices}"]
    if not r.eval.every:
        return [f"train.select_by {key!r} is measured on generated answers, and eval.every is 0 (no generation "
                f"evaluations during training). Set eval.every (e.g. to train.eval_every), or select by val_loss"]
    return []


def eval_validator_problems(r: Recipe) -> list[str]:
    """eval.validate's validators built here: user code imported, word lists read (a recipe about to run)."""
    if not r.eval.validate:
        return []
    from fledge.errors import FledgeError
    from fledge.evaluate.metrics import build_validators
    try:
        build_validators(r.eval.validate)
    except FledgeError as e:
        return [f"eval.validate: {e}"]
    return []


def check_machine_support(r: Recipe) -> list[str]:
    """Rules for a recipe about to run here: where the run goes, the packages and devices it needs."""
    out = []
    t = r.train
    if not RUN_NAME.fullmatch(r.name):
        out.append(f"name {r.name!r} must be a plain folder name (letters, digits, '_', '-' and '.', starting "
                   f"with a letter, digit or '_'): the run goes to runs/<name>. To put it elsewhere, set run_dir")
    if t.tensorboard and importlib.util.find_spec("tensorboard") is None:
        out.append("train.tensorboard is true but the tensorboard package is not installed. Install it with "
                   "pip install 'fledge[tensorboard]', or set train.tensorboard: false")
    if t.precision == "fp16" and _resolved_device(t.device) == "cpu":
        where = "a CPU" if t.device == "cpu" else "this machine, which has no CUDA or MPS device (train.device: auto)"
        out.append(f"train.precision fp16 does not run on {where}. Use train.precision: auto (fp32 here), or "
                   f"bf16 on a CPU with native bf16 (see `fledge env`)")
    return out


def _resolved_device(name: str) -> str:
    """The device type train.device picks on this machine (imports torch only for auto)."""
    if name != "auto":
        return name
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def describe_keys(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every recipe key, for `fledge recipe keys` and docs."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            rows.append((prefix + f.name, "", f.metadata.get("help", "")))
            rows.extend(describe_keys(typ, prefix + f.name + "."))
            continue
        if _item_class(typ):
            rows.append((prefix + f.name, "[]", f.metadata.get("help", "")))
            rows.extend(describe_keys(_item_class(typ), prefix + f.name + "[]."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        helptext = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            helptext += f" [{'|'.join(map(str, f.metadata['choices']))}]"
        rows.append((prefix + f.name, json.dumps(default), helptext))
    return rows


# --- other YAML specs ----------------------------------------------------------------------

def load_config(cls: type, source: str | Path | dict, what: str,
                finish: typing.Callable[[Any, list[str]], None] | None = None,
                names: typing.Mapping[str, str] | None = None) -> Any:
    """Validate a YAML file (or an already-read mapping) into the dataclass `cls`, as recipes are.

    Used by specs that are not part of a recipe (`fledge data synth spec.yaml`, ...). `what`
    names the file in messages when `source` is a mapping. `finish(config, problems)` may build
    nested parts (lists of sub-specs) and add cross-key problems; every problem is reported
    together, unknown keys with the closest valid name. `names` maps keys to how the user wrote
    them (`{"top_p": "--top-p"}`) for the messages.
    """
    if isinstance(source, dict):
        raw, name = source, what
    else:
        name = str(source)
        raw = read_yaml_mapping(Path(source), what, f"a {what} is a mapping of keys")
    problems: list[str] = []
    config = _build(cls, raw, "", problems, names)
    if finish is not None and isinstance(raw, dict):
        finish(config, problems)
    raise_problems(name, problems)
    return config
