"""Self-contained checkpoint folders, written atomically and checked when read.

    runs/<name>/checkpoints/step-000400/
        model.safetensors   weights; of tensors that share memory (tied weights, whatever their
                            names) only the first is stored, and the metadata key "fledge.aliases"
                            maps each omitted name to it (transformers re-ties the llama head itself)
        config.json         a transformers config (fledge's llama arch: LlamaForCausalLM loads the folder),
                            written by `fledge.export.hf.write_transformers_files` when the model has one
        optimizer.pt        optimizer state (tensors and numbers only: loads with weights_only=True)
        rng.pt              torch RNG states (dropout) of the saving process
        state.json          a `TrainingState`: step, losses, best-so-far, the tokenizer's sha256, format
        recipe.yaml         the resolved recipe of the run
        tokenizer.json | tokenizer.model
        integrity.json      size and sha256 of every other file; written last

A fine-tune's checkpoint (fledge.train.finetune decides what goes in) also holds the
transformers files of the fine-tune's tokenizer and chat template (tokenizer.json with any
added tokens, tokenizer_config.json, chat_template.jinja, generation_config.json); a LoRA or
QLoRA one holds adapter_model.safetensors and adapter_config.json INSTEAD of model.safetensors,
and state.json's base_sha256 names the base the adapters belong to.

The caller decides what the weights are (`save_checkpoint(weights=...)`: a whole model's
tensors, or None when `extra_files(folder)` writes an adapter instead) and may add files
through `extra_files`; they are written after the fledge tokenizer file, so a tokenizer.json
they write (the fine-tune's, with added tokens) is the one kept. Every file in the folder is
listed in integrity.json.

A checkpoint is written to a hidden `.step-000400.tmp` folder, marked as fledge's by a
`.fledge-partial` file, and renamed when complete, so a kill at any moment leaves the
previous checkpoints valid. A full disk removes the temp folder and raises one StorageError
line; temp folders left by a kill are removed when a run starts or resumes
(`remove_partial_saves`). `best.json` names the best checkpoint, which is never deleted: the one
with the lowest validation loss, or with `train.select_by` a generation metric the one where it
was highest ({"checkpoint", "select_by", "value", "val_loss"}); besides it the newest `keep_last`
are kept. A checkpoint never holds
NaN or infinite weights or validation losses: saving one is refused.

Reading checks each file against integrity.json (sha256 at about 2 GB/s here: a 300 MB model
with its 600 MB optimizer state costs about half a second per full check). `load_weights`
checks the files inference reads, `load_training_state` the rest; `latest_checkpoint` returns
the newest intact checkpoint and `best_checkpoint` ignores a best.json that is unreadable,
names a folder that is not a checkpoint of the run, or points at a damaged one, each with one
note on stderr. Checkpoints saved before integrity records existed load with a note; what
can still be checked is (files present, the tokenizer against state.json's sha256, decoding,
finite weights).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable

import safetensors.torch
import torch

from fledge.errors import CheckpointError, StorageError
from fledge.files import fsync_dir, remove_stale_temps, replace_folder, storage_error, write_atomic

STEP_DIR = re.compile(r"step-(\d+)")
WEIGHTS = "model.safetensors"
INTEGRITY = "integrity.json"
PARTIAL = ".fledge-partial"        # first file of a temp folder: fledge made it and may delete it
FORMAT = 2                         # state.json "format"; 2 and later always carry integrity.json
ALIASES_KEY = "fledge.aliases"     # safetensors metadata: {omitted name: stored name it shares memory with}
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"   # peft's names
TRAINING_FILES = ("optimizer.pt", "rng.pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
REQUIRED = (*TRAINING_FILES, "state.json", "recipe.yaml")      # and the weights: WEIGHTS or ADAPTER_WEIGHTS
TRANSFORMERS_FILES = ("config.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
KNOWN_FILES = {*REQUIRED, WEIGHTS, ADAPTER_WEIGHTS, ADAPTER_CONFIG, *TOKENIZER_FILES, *TRANSFORMERS_FILES,
               INTEGRITY, PARTIAL}
WRITE_TEMP = re.compile(r"^\.(?P<name>.+)\.\d+-[0-9a-f]+\.tmp$")   # fledge.files.temp_path names

_noted: set[str] = set()


@dataclass
class TrainingState:
    """What a run knows besides its weights, optimizer and RNG: state.json of every checkpoint.

    Every field has a default, so the state.json of an older checkpoint (format 1 or 2, a plain
    dict without the newer fields) loads; keys this fledge does not know are ignored."""
    step: int = 0                               # optimizer steps done
    val_loss: float | None = None               # of the latest evaluation
    best_val_loss: float | None = None          # the lowest so far; its checkpoint is never pruned
    best_step: int | None = None
    first_val_loss: float | None = None         # before the first step of the run (step 0)
    first_train_loss: float | None = None       # of step 1
    train_loss: float | None = None             # of the latest step whose loss was logged
    evals_without_improvement: int = 0          # in a row, for train.early_stop_patience
    elapsed_s: float = 0.0                      # training time of the run so far, in seconds
    vocab_size: int | None = None
    tokenizer_sha256: str | None = None
    base_sha256: str | None = None              # adapters: the base they belong to (fledge.model.bases.base_sha256)
    format: int = FORMAT                        # of the checkpoint that holds it (1: before "format" existed)
    select_by: str = "val_loss"                 # train.select_by: what chose the best checkpoint
    best_metric: dict | None = None             # select_by a generation metric: {"value", "step", "val_loss"} of
                                                # its best evaluation (higher is better); evals_without_improvement
                                                # then counts generation evaluations
    eval_metrics: dict | None = None            # the latest generation evaluation (eval.every): {metric: share}

    def to_json(self) -> dict:
        return asdict(self)

    def chosen(self) -> tuple[int | None, float | None, float | None]:
        """(step, value of select_by, val loss) of the best evaluation so far."""
        if self.select_by == "val_loss":
            return self.best_step, self.best_val_loss, self.best_val_loss
        best = self.best_metric or {}
        return best.get("step"), best.get("value"), best.get("val_loss")

    @classmethod
    def from_json(cls, data: dict) -> TrainingState:
        """The state a state.json holds; ValueError naming the first field of the wrong type."""
        if not isinstance(data, dict):
            raise ValueError("state.json is not a JSON object")
        known = {f.name: f for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("format", 1)
        for name, value in values.items():
            kinds = _STATE_TYPES[name]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise ValueError(f"state.json {name} is {value!r}")
        if "step" not in values:
            raise ValueError("state.json has no step")
        best = values.get("best_metric")
        if best is not None and not (isinstance(best.get("step"), int) and isinstance(best.get("value"), _NUMBER)):
            raise ValueError(f"state.json best_metric is {best!r}")
        return cls(**values)


_NUMBER = (int, float)
_STATE_TYPES = {"step": (int,), "val_loss": (*_NUMBER, type(None)), "best_val_loss": (*_NUMBER, type(None)),
                "best_step": (int, type(None)), "first_val_loss": (*_NUMBER, type(None)),
                "first_train_loss": (*_NUMBER, type(None)), "train_loss": (*_NUMBER, type(None)),
                "evals_without_improvement": (int,), "elapsed_s": _NUMBER, "vocab_size": (int, type(None)),
                "tokenizer_sha256": (str, type(None)), "base_sha256": (str, type(None)),
                "format": (int,), "select_by": (str,), "best_metric": (dict, type(None)),
                "eval_metrics": (dict, type(None))}


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def note(message: str) -> None:
    """One `note:` line on stderr, once per process for the same message."""
    if message not in _noted:
        _noted.add(message)
        print(f"note: {message}", file=sys.stderr, flush=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run by name, oldest first (not checked: see `latest_checkpoint`)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def latest_checkpoint(run_dir: Path, verify: bool = True) -> Path | None:
    """The newest intact checkpoint; a damaged newer one is skipped with a note naming it and why."""
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path) if verify else None
        if problem is None:
            for broken, why in skipped:
                note(f"skipping {broken}: it is damaged ({why}); the newest intact checkpoint is {path.name}")
            return path
        skipped.append((path, problem))
    for broken, why in skipped:
        note(f"skipping {broken}: it is damaged ({why}); no intact checkpoint is left")
    return None


def best_checkpoint(run_dir: Path, verify: bool = True) -> Path | None:
    """The checkpoint best.json names, if it is a checkpoint folder of this run and (verify) intact."""
    root = Path(run_dir) / "checkpoints"
    marker = root / "best.json"
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        name, by = record["checkpoint"], str(record.get("select_by", "val_loss"))
        val = float(record["value" if "value" in record else "val_loss"])     # older ones: val_loss only
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        note(f"ignoring {marker}: it is unreadable ({type(e).__name__}); the best checkpoint is unknown")
        return None
    if not isinstance(name, str) or not STEP_DIR.fullmatch(name):
        note(f"ignoring {marker}: it names {name!r}, which is not a checkpoint folder of this run")
        return None
    if not math.isfinite(val):
        note(f"ignoring {marker}: its {'validation loss' if by == 'val_loss' else by} is {val}")
        return None
    path = root / name
    if not path.is_dir():
        return None
    problem = checkpoint_problem(path) if verify else None
    if problem:
        note(f"ignoring {marker}: {name} is damaged ({problem})")
        return None
    return path


# --- checking ------------------------------------------------------------------------------

def checkpoint_problem(checkpoint: Path, names: Iterable[str] | None = None) -> str | None:
    """Why the checkpoint is damaged, or None when its files (or only `names`) are intact."""
    checkpoint = Path(checkpoint)
    files, problem = _read_integrity(checkpoint)
    if problem:
        return problem
    if files is None:
        return _legacy_problem(checkpoint, names)
    listed = [n for n in REQUIRED if n not in files]
    if WEIGHTS not in files and ADAPTER_WEIGHTS not in files:
        listed.append(f"the weights ({WEIGHTS} or {ADAPTER_WEIGHTS})")
    elif ADAPTER_WEIGHTS in files and ADAPTER_CONFIG not in files:
        listed.append(ADAPTER_CONFIG)
    if not any(n in files for n in TOKENIZER_FILES):
        listed.append("a tokenizer file")
    if listed:
        return f"{INTEGRITY} does not list {', '.join(listed)}"
    for name in files if names is None else [n for n in names if n in files]:
        problem = _file_problem(checkpoint, name, files[name])
        if problem:
            return problem
    return None


def verify_checkpoint(checkpoint: Path, names: Iterable[str] | None = None) -> dict | None:
    """Raise CheckpointError unless the checkpoint (or its files `names`) is intact. Returns the
    integrity record's files, or None for a checkpoint saved before integrity records."""
    checkpoint = Path(checkpoint)
    problem = checkpoint_problem(checkpoint, names)
    if problem:
        raise _damaged(checkpoint, problem)
    return _read_integrity(checkpoint)[0]


def _damaged(checkpoint: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{checkpoint} is damaged: {why}. Use another checkpoint of the run "
                           f"(`fledge train RECIPE --resume` picks the newest intact one).")


def _read_integrity(checkpoint: Path) -> tuple[dict | None, str | None]:
    """(files, None), (None, None) for an older checkpoint without a record, or (None, problem)."""
    path = checkpoint / INTEGRITY
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not checkpoint.is_dir():
            return None, "the folder does not exist"
        if _saved_format(checkpoint) >= FORMAT:
            return None, f"{INTEGRITY} is missing"
        note(f"{checkpoint} has no {INTEGRITY} (saved by an older fledge): its files are read without checksums")
        return None, None
    except (OSError, ValueError, RecursionError) as e:
        return None, f"{INTEGRITY} is unreadable ({type(e).__name__})"
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()):
        return None, f"{INTEGRITY} does not hold a size and sha256 per file"
    if any(Path(n).name != n or n in ("", ".", "..") for n in files):
        return None, f"{INTEGRITY} names a path outside the checkpoint folder"
    return files, None


def _saved_format(checkpoint: Path) -> int:
    try:
        state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
        return int(state.get("format", 1))
    except FileNotFoundError:
        return 1
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):
        return FORMAT        # unreadable: treat as current, so the missing record counts as damage


def _file_problem(checkpoint: Path, name: str, entry: dict, data: bytes | None = None) -> str | None:
    path = checkpoint / name
    if data is None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror})"
    else:
        size = len(data)
    if size != entry["bytes"]:
        return f"{name} is {size} bytes but was saved with {entry['bytes']} (truncated or overwritten)"
    try:
        digest = hashlib.sha256(data).hexdigest() if data is not None else _sha256_file(path)
    except OSError as e:
        return f"{name} cannot be read ({e.strerror})"
    if digest != entry["sha256"]:
        return f"{name} does not match its sha256 in {INTEGRITY} (its bytes changed after saving)"
    return None


def _legacy_problem(checkpoint: Path, names: Iterable[str] | None) -> str | None:
    """What can be checked without an integrity record: files present, tokenizer against state.json."""
    wanted = set((WEIGHTS, *REQUIRED) if names is None else names)
    for name in (WEIGHTS, *REQUIRED):       # older checkpoints always hold whole weights
        if name in wanted and not (checkpoint / name).is_file():
            return f"{name} is missing"
    tokenizers = [checkpoint / n for n in TOKENIZER_FILES if (checkpoint / n).is_file()]
    if not tokenizers:
        return "the tokenizer file is missing"
    try:
        state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
        expected = state.get("tokenizer_sha256")
        if expected and _sha256_file(tokenizers[0]) != expected:
            return f"{tokenizers[0].name} is not the tokenizer the model was trained with (sha256 differs " \
                   f"from state.json's)"
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        return f"state.json is unreadable ({type(e).__name__})"
    return None


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
    return sha.hexdigest()


# --- saving --------------------------------------------------------------------------------

def weights_to_save(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, aliases): the state dict with each tensor that is the same memory as an earlier
    one (tied weights, whatever their names) left out, and {left-out name: the kept name}."""
    kept, aliases, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = tensor
    out, storages = {}, set()
    for name, tensor in kept.items():
        tensor = tensor.detach().contiguous().cpu()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in storages:   # overlapping views of one buffer: store a copy
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out, aliases


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors stores no shared tensors)."""
    return weights_to_save(model)[0]


def write_weights(tensors: dict[str, torch.Tensor], path: Path, aliases: dict[str, str] | None = None) -> None:
    metadata = {"format": "pt"}
    if aliases:
        metadata[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    write_atomic(path, safetensors.torch.save(tensors, metadata=metadata))


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor] | torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer, state: TrainingState | dict, recipe_yaml: str,
                    tokenizer_file: Path | None, hf_config: dict | None = None, keep_last: int = 2, *,
                    aliases: dict[str, str] | None = None,
                    extra_files: Callable[[Path], object] | None = None) -> Path:
    """Write checkpoint `step`; on a full disk raise StorageError with the earlier ones untouched.

    weights: the tensors model.safetensors holds, as the caller chose them (a whole model's
    `weights_to_save`), with `aliases` {left-out name: stored name} for tensors that share
    memory; a module stands for its `weights_to_save`; None writes no model.safetensors (an
    adapter run: `extra_files` writes adapter_model.safetensors). tokenizer_file: fledge's
    tokenizer file, copied first (None: `extra_files` writes the tokenizer). hf_config: the
    transformers config.json of the model, or None. extra_files(folder) writes further files
    into the unfinished checkpoint folder (transformers tokenizer files and chat template, an
    adapter); written after the tokenizer file, so theirs win, and listed in integrity.json
    like the rest. state: a TrainingState (a dict is read as one)."""
    root = Path(run_dir) / "checkpoints"
    final = root / checkpoint_name(step)
    state = TrainingState.from_json({"format": FORMAT, **state}) if isinstance(state, dict) else state
    state = TrainingState(**{**state.to_json(), "format": FORMAT})
    if isinstance(weights, torch.nn.Module):
        tensors, aliases = weights_to_save(weights)
    else:
        tensors, aliases = weights or {}, aliases or {}
    _refuse_non_finite(final, state, tensors)
    tmp = root / f".{final.name}.tmp"
    created = False
    try:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_partial(tmp)
            tmp.mkdir()
            created = True
            (tmp / PARTIAL).touch()      # an empty marker, no content to lose: a plain create is atomic
        except OSError as e:
            raise storage_error(e, tmp) from None
        if weights is not None:
            write_weights(tensors, tmp / WEIGHTS, aliases)
        if tokenizer_file is not None:
            _copy_tokenizer(Path(tokenizer_file), tmp)
        if hf_config is not None:
            from fledge.export.hf import write_transformers_files
            write_transformers_files(tmp, hf_config=hf_config, tokenizer=None, template=None)
        if extra_files is not None:
            extra_files(tmp)
        assert any((tmp / n).is_file() for n in (WEIGHTS, ADAPTER_WEIGHTS)), "a checkpoint without weights"
        assert any((tmp / n).is_file() for n in TOKENIZER_FILES), "a checkpoint without a tokenizer file"
        _write_rest(tmp, optimizer, state, recipe_yaml)
        _swap_in(tmp, final)
    except (StorageError, OSError) as e:
        if created:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):   # from a serialiser rather than from fledge.files
            e = storage_error(e, e.filename or tmp)
        earlier = [p.name for p in list_checkpoints(run_dir)]
        kept = f"{earlier[-1]} and older are intact: `fledge train RECIPE --resume` continues from there" \
            if earlier else "there is no earlier one"
        raise StorageError(f"{e}. Checkpoint {final.name} was not saved; {kept}.") from None
    except BaseException:
        if created:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _update_best_marker(root, state)
    prune_checkpoints(run_dir, keep_last)
    return final


def _refuse_non_finite(final: Path, state: TrainingState, tensors: dict[str, torch.Tensor]) -> None:
    for key in ("val_loss", "best_val_loss"):
        value = getattr(state, key)
        if value is not None and not math.isfinite(value):
            raise CheckpointError(f"refusing to save {final}: state {key} is {value}. The run diverged; lower "
                                  f"train.lr and resume from an earlier checkpoint.")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"refusing to save {final}: weight {name} holds NaN or infinite values. The "
                                  f"run diverged; lower train.lr and resume from an earlier checkpoint.")


def _copy_tokenizer(tokenizer_file: Path, tmp: Path) -> None:
    try:
        tokenizer = tokenizer_file.read_bytes()
    except OSError as e:
        raise storage_error(e, tokenizer_file, "read") from None
    write_atomic(tmp / tokenizer_file.name, tokenizer)


def _write_rest(tmp: Path, optimizer, state: TrainingState, recipe_yaml: str) -> None:
    """The training files, then the integrity record of it all, then drop the marker."""
    write_atomic(tmp / "optimizer.pt", _torch_bytes(optimizer.state_dict()))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    write_atomic(tmp / "rng.pt", _torch_bytes(rng))
    write_atomic(tmp / "state.json", json.dumps(state.to_json(), indent=2))
    write_atomic(tmp / "recipe.yaml", recipe_yaml)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256_file(p)} for p in sorted(tmp.iterdir())
             if p.is_file() and p.name not in (PARTIAL, INTEGRITY) and not WRITE_TEMP.match(p.name)}
    write_atomic(tmp / INTEGRITY, json.dumps({"format": FORMAT, "files": files}, indent=1))
    try:
        os.unlink(tmp / PARTIAL)
    except OSError as e:
        raise storage_error(e, tmp / PARTIAL, "remove") from None


def _torch_bytes(obj) -> bytes:
    """torch.save into memory: its C++ writer reports a full disk as a RuntimeError, ours as OSError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder to its name; an older save of the same step goes first."""
    old = final.with_name(f".{final.name}.old.tmp")
    if final.exists():
        if not _made_by_fledge(final):
            raise CheckpointError(f"{final} exists and fledge did not write it; move it away and resume.")
        _remove_partial(old)
    try:
        replace_folder(tmp, final, old)     # an earlier save of this step is put back if the rename fails
    except OSError as e:
        raise storage_error(e, final, "rename a finished checkpoint to") from None
    fsync_dir(final.parent)


def _made_by_fledge(folder: Path) -> bool:
    """A folder holding fledge's marker or record, or nothing but checkpoint files and write temps."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    names = {p.name for p in folder.iterdir()}
    if names & {PARTIAL, INTEGRITY, "state.json"}:
        return True
    return all(n in KNOWN_FILES or (WRITE_TEMP.match(n) and WRITE_TEMP.match(n)["name"] in KNOWN_FILES)
               for n in names)


def _remove_partial(folder: Path) -> bool:
    """Remove a temp folder fledge left behind; refuse one it cannot prove it made."""
    if not folder.exists() and not folder.is_symlink():
        return False
    if not _made_by_fledge(folder):
        raise CheckpointError(f"{folder} is in the way and fledge did not make it; move it away and run again.")
    shutil.rmtree(folder)
    return True


def remove_partial_saves(run_dir: Path) -> list[Path]:
    """Remove what killed saves left in a run: temp checkpoint folders fledge marked, write temps."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    removed = []
    if root.is_dir():
        for folder in sorted(root.glob(".step-*.tmp")):
            try:
                if _made_by_fledge(folder) and _remove_partial(folder):
                    removed.append(folder)
            except OSError as e:
                raise storage_error(e, folder, "remove") from None
        removed += remove_stale_temps(root)
    if run_dir.is_dir():
        removed += remove_stale_temps(run_dir)
    return removed


def _update_best_marker(root: Path, state: TrainingState) -> None:
    """Point best.json at the state's best step when that checkpoint exists and it points elsewhere."""
    step, value, val = state.chosen()
    if step is None or value is None or not math.isfinite(value) or not (root / checkpoint_name(step)).is_dir():
        return
    marker = root / "best.json"
    record = {"checkpoint": checkpoint_name(step), "select_by": state.select_by, "value": value, "val_loss": val}
    try:
        if json.loads(marker.read_text(encoding="utf-8")) == record:
            return
    except (OSError, ValueError, RecursionError):
        pass
    write_atomic(marker, json.dumps(record, indent=2))


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete checkpoints fledge wrote beyond the newest `keep_last`, never the best one."""
    best = best_checkpoint(run_dir, verify=False)
    found = list_checkpoints(run_dir)
    for path in found[:-keep_last] if keep_last else found:
        if (best is None or path.resolve() != best.resolve()) and _made_by_fledge(path):
            try:
                shutil.rmtree(path)
            except OSError as e:
                raise storage_error(e, path, "remove") from None


# --- loading -------------------------------------------------------------------------------

def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load the weights into `model` after checking them and the other files inference reads
    (state.json, recipe.yaml, the tokenizer, config.json); tied names are filled from their alias."""
    checkpoint = Path(checkpoint)
    if is_adapter_checkpoint(checkpoint):
        raise CheckpointError(f"{checkpoint} holds adapters ({ADAPTER_WEIGHTS}), not a whole model: load them onto "
                              f"their base (fledge.model.adapters.load_adapter), or merge them with `fledge merge`.")
    if not (checkpoint / WEIGHTS).is_file() and not (checkpoint / INTEGRITY).is_file():
        raise CheckpointError(f"{checkpoint}: no {WEIGHTS}; the folder is not a fledge checkpoint.")
    files, problem = _read_integrity(checkpoint)
    inference = [WEIGHTS, "state.json", "recipe.yaml"] if files is None else \
        [n for n in files if n not in (WEIGHTS, *TRAINING_FILES)]      # the weights are checked as read
    problem = problem or checkpoint_problem(checkpoint, inference)
    if problem:
        raise _damaged(checkpoint, problem)
    tensors, aliases = _decode_weights(checkpoint, _read_checked(checkpoint, WEIGHTS, files))
    for alias, source in aliases.items():
        if isinstance(alias, str) and source in tensors:
            tensors[alias] = tensors[source]
    own = model.state_dict()
    file = checkpoint / WEIGHTS
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:          # shapes differ
        raise CheckpointError(f"{file}: weights do not fit this model ({str(e).splitlines()[-1].strip()}). The "
                              f"checkpoint comes from another model.* recipe.") from None
    missing = [k for k in missing if not _tied_to_loaded(own, k, tensors)]
    if missing or unexpected:
        raise CheckpointError(f"{file}: weights do not fit this model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}). The checkpoint comes from another model.* recipe.")


def is_adapter_checkpoint(checkpoint: Path) -> bool:
    """Whether a checkpoint holds adapters (LoRA, QLoRA) rather than whole weights."""
    checkpoint = Path(checkpoint)
    return (checkpoint / ADAPTER_WEIGHTS).is_file() and not (checkpoint / WEIGHTS).is_file()


def _tied_to_loaded(own: dict, name: str, loaded: dict) -> bool:
    """Whether the model's tensor `name` is the same memory as one that was loaded (a tied head
    saved before aliases were recorded)."""
    tensor = own[name]
    return tensor.numel() > 0 and any(
        other in loaded and own[other].data_ptr() == tensor.data_ptr() and own[other].shape == tensor.shape
        for other in own if other != name)


def _decode_weights(checkpoint: Path, data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        tensors = safetensors.torch.load(data)
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        aliases = json.loads((header.get("__metadata__") or {}).get(ALIASES_KEY, "{}"))
        if not isinstance(aliases, dict):
            raise ValueError("aliases are not a mapping")
    except Exception as e:           # any decoding failure of these bytes means the file is damaged
        raise _damaged(checkpoint, f"{WEIGHTS} cannot be decoded ({type(e).__name__})") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise _damaged(checkpoint, f"{WEIGHTS} holds NaN or infinite values in {name}")
    return tensors, aliases


def load_training_state(checkpoint: Path, optimizer: torch.optim.Optimizer) -> TrainingState:
    """Restore the optimizer and torch's RNG states and return state.json, all checked first:
    nothing is restored unless every file read is intact."""
    checkpoint = Path(checkpoint)
    files, problem = _read_integrity(checkpoint)
    if problem:
        raise _damaged(checkpoint, problem)
    saved = _torch_load(checkpoint, "optimizer.pt", files)
    rng = _torch_load(checkpoint, "rng.pt", files)
    data = _read_checked(checkpoint, "state.json", files)
    try:
        state = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise _damaged(checkpoint, f"state.json is not valid JSON ({type(e).__name__})") from None
    try:
        state = TrainingState.from_json(state)
    except ValueError as e:
        raise _damaged(checkpoint, str(e)) from None
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor):
        raise _damaged(checkpoint, "rng.pt holds no CPU RNG state")
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{checkpoint / 'optimizer.pt'}: does not fit this model's optimizer ({e}). The "
                              f"checkpoint comes from another model.* recipe.") from None
    try:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    except (RuntimeError, TypeError) as e:
        raise _damaged(checkpoint, f"rng.pt holds an invalid RNG state ({e})") from None
    return state


def _read_checked(checkpoint: Path, name: str, files: dict | None) -> bytes:
    """The bytes of one file, checked against the integrity record (None: an older checkpoint)."""
    path = checkpoint / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _damaged(checkpoint, f"{name} is missing") from None
    except OSError as e:
        raise storage_error(e, path, "read") from None
    if files is not None:
        if name not in files:
            raise _damaged(checkpoint, f"{INTEGRITY} does not list {name}")
        problem = _file_problem(checkpoint, name, files[name], data)
        if problem:
            raise _damaged(checkpoint, problem)
    return data


def _torch_load(checkpoint: Path, name: str, files: dict | None):
    data = _read_checked(checkpoint, name, files)
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:           # any decoding failure of these bytes means the file is damaged
        raise _damaged(checkpoint, f"{name} cannot be decoded ({type(e).__name__})") from None
