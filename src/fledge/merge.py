"""Fold a run's adapters into full weights: a folder that loads like a full fine-tune.

    fledge merge runs/persona                      # its best (else latest) checkpoint -> runs/persona/merged/
    fledge merge runs/persona -o exports/persona   # anywhere else

    from fledge.merge import merge
    folder = merge("runs/persona")
    AutoModelForCausalLM.from_pretrained(folder)   # or fledge sample/chat, or model.base of another fine-tune

The base is loaded in full precision (a QLoRA run's too: its adapters are merged into the
unquantized weights), the adapters loaded onto it and merged (`adapters.merge_adapter`), and
the result written as a checkpoint folder of its own:

    model.safetensors   full weights in the base's naming (fledge's GPT names, which are
                        LlamaForCausalLM's, or the transformers model's own)
    config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json
                        `export.hf.write_transformers_files`, as in the run's checkpoints
    recipe.yaml         the run's, unchanged (model.base still names the base it came from)
    state.json          the checkpoint's, without base_sha256 (the weights are whole now)
    optimizer.pt, rng.pt  empty optimizer state and the RNG state: a complete checkpoint folder,
                        not one to resume
    .fledge-merged      the marker that lets a later merge replace the folder
    integrity.json      sizes and sha256 of every file, written last

The folder is written beside its destination and renamed into place. An existing destination
is replaced only when it is empty or holds the marker: fledge never overwrites a folder it did
not write. A checkpoint with full weights has nothing to merge and is refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fledge.errors import CheckpointError, StorageError
from fledge.files import refuse_foreign_folder, remove_own_folder, storage_error, swap_in_folder, write_atomic
from fledge.sample import (checkpoint_template, load_adapter_run, read_checkpoint, resolve_checkpoint,
                           verify_for_inference)
from fledge.train.checkpoint import is_adapter_checkpoint

MARKER = ".fledge-merged"       # {"fledge": "merged", "from": <checkpoint>} in every folder merge writes


class _NoOptimizer:
    """Stands in for the optimizer of a merged folder, which has nothing to resume."""

    def state_dict(self) -> dict:
        return {"state": {}, "param_groups": []}


def merge(path: str | Path, out: str | Path | None = None, *, allow_code: bool = False) -> Path:
    """Merge the adapters of a run (its best, else latest checkpoint) or adapter checkpoint into full
    weights, written to `out` (default: the run's `merged/` folder). Returns the folder written.

    Raises CheckpointError (no adapters to merge, a missing or changed base, a destination fledge
    did not write), StorageError. `allow_code`: see `fledge.sample.load_for_inference`.
    """
    from fledge.model.adapters import merge_adapter
    from fledge.model.bases import checkpoint_tokenizer
    checkpoint = resolve_checkpoint(path)
    verify_for_inference(checkpoint)
    recipe, state = read_checkpoint(checkpoint, allow_code)
    if not is_adapter_checkpoint(checkpoint):
        what = f"finetune.method {recipe.finetune.method}" if recipe.model.base else "a pretraining run"
        raise CheckpointError(f"{checkpoint} holds full weights ({what}): there are no adapters to merge. Sample, "
                              f"chat or export it as it is.")
    target = Path(out) if out is not None else _default_target(checkpoint)
    _check_target(target)
    model = load_adapter_run(checkpoint, recipe, state, "cpu", allow_code=allow_code, quantized=False)
    merged = merge_adapter(model).eval()
    tokenizer = checkpoint_tokenizer(checkpoint)
    template = checkpoint_template(checkpoint, tokenizer)
    _write(target, checkpoint, merged, tokenizer, template, state)
    return target


def _default_target(checkpoint: Path) -> Path:
    if checkpoint.parent.name != "checkpoints":
        raise CheckpointError(f"{checkpoint} is not inside a run's checkpoints/ folder, so there is no run folder to "
                              f"put merged/ in. Name the output folder with -o DIR.")
    return checkpoint.parent.parent / "merged"


def _check_target(target: Path) -> None:
    """Refuse a destination that is not new, empty, or an earlier merge's."""
    refuse_foreign_folder(target, MARKER)


def _write(target: Path, checkpoint: Path, merged, tokenizer, template, state: dict) -> None:
    """Write the merged checkpoint beside `target` (save_checkpoint into a marked staging folder), then
    rename it into place, replacing an earlier merge."""
    from fledge.export.hf import write_transformers_files
    from fledge.model.adapters import input_embedding
    from fledge.model.bases import model_hf_config
    from fledge.train.checkpoint import save_checkpoint
    staging = target.with_name(f".{target.name}.merging")
    remove_own_folder(staging, (MARKER,), "merge again")
    marker = json.dumps({"fledge": "merged", "from": str(checkpoint)}) + "\n"
    try:
        staging.mkdir(parents=True)
        write_atomic(staging / MARKER, marker)
    except OSError as e:
        raise storage_error(e, staging, "create") from None

    def files(folder: Path) -> None:
        write_transformers_files(folder, hf_config=model_hf_config(merged), tokenizer=tokenizer, template=template)
        write_atomic(folder / MARKER, marker)

    saved = {k: v for k, v in state.items() if k != "base_sha256"}
    saved["vocab_size"] = input_embedding(merged).weight.shape[0]
    fledge_tokenizer = checkpoint / "tokenizer.model"       # a SentencePiece base's own file stays beside
    try:
        written = save_checkpoint(staging, int(state.get("step", 0)), merged, _NoOptimizer(), saved,
                                  (checkpoint / "recipe.yaml").read_text(encoding="utf-8"),
                                  fledge_tokenizer if fledge_tokenizer.is_file() else None, None, 1,
                                  extra_files=files)
        swap_in_folder(written, target, (MARKER,), "merged", "merge again")
    except StorageError as e:
        raise StorageError(f"{e} (while writing the merged folder {target}, which is unchanged)") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
