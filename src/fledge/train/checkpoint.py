"""Self-contained checkpoint folders, written atomically.

    runs/<name>/checkpoints/step-000400/
        model.safetensors   weights (tied head omitted: transformers re-ties it)
        config.json         a transformers LlamaConfig (llama arch): LlamaForCausalLM loads the folder
        optimizer.pt        optimizer state (tensors and numbers only: loads with weights_only=True)
        rng.pt              torch RNG states (dropout) of the saving process
        state.json          step, losses, best-so-far, token ids of the tokenizer
        recipe.yaml         the resolved recipe of the run
        tokenizer.json | tokenizer.model

A checkpoint is written to a hidden `.step-000400.tmp` folder and renamed when complete, so
a kill at any moment leaves the previous checkpoints valid; stale temp folders are removed
at the next save. `best.json` names the checkpoint with the lowest validation loss, which
is never deleted; besides it the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fledge.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def best_checkpoint(run_dir: Path) -> Path | None:
    marker = Path(run_dir) / "checkpoints" / "best.json"
    if marker.is_file():
        path = Path(run_dir) / "checkpoints" / json.loads(marker.read_text())["checkpoint"]
        if path.is_dir():
            return path
    return None


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the tied output head (safetensors stores no shared tensors)."""
    state = model.state_dict()
    head = state.get("lm_head.weight")
    embed = state.get("model.embed_tokens.weight")
    if head is not None and embed is not None and head.data_ptr() == embed.data_ptr():
        del state["lm_head.weight"]
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, recipe_yaml: str, tokenizer_file: Path, hf_config: dict | None,
                    keep_last: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"
    tmp.mkdir()
    write_weights(model_state(model), tmp / "model.safetensors")
    if hf_config is not None:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    (tmp / "recipe.yaml").write_text(recipe_yaml)
    shutil.copy2(tokenizer_file, tmp / Path(tokenizer_file).name)
    _fsync_dir(tmp)
    if final.exists():  # a save of the same step (e.g. Ctrl-C right after a scheduled save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if state.get("best_step") == step:
        _write_json_atomic(root / "best.json", {"checkpoint": final.name, "val_loss": state.get("best_val_loss")})
    prune_checkpoints(run_dir, keep_last)
    return final


def write_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    best = best_checkpoint(run_dir)
    found = list_checkpoints(run_dir)
    for path in found[:-keep_last] if keep_last else found:
        if best is None or path.resolve() != best.resolve():
            shutil.rmtree(path)


def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    file = Path(checkpoint) / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{checkpoint}: no model.safetensors; the folder is not a fledge checkpoint.")
    tensors = load_file(str(file))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or "model.embed_tokens.weight" not in tensors]
    if missing or unexpected:
        raise CheckpointError(f"{file}: weights do not fit this model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}). The checkpoint comes from another model.* recipe.")


def load_training_state(checkpoint: Path, optimizer: torch.optim.Optimizer) -> dict:
    optimizer.load_state_dict(torch.load(Path(checkpoint) / "optimizer.pt", weights_only=True))
    rng = torch.load(Path(checkpoint) / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((Path(checkpoint) / "state.json").read_text())


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        for child in Path(path).iterdir():
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
