"""`fledge quickstart`: a whole run on text every Python installation carries.

Builds a corpus from the standard library's own source (code, comments and docstrings),
trains a byte-level BPE tokenizer and a small model for a few minutes on a CPU, shows the
loss falling and samples, and says where the run is and what to try next. No network, no
data from the user. The recipe is embedded below; the resolved copy is written into the run.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

from fledge.files import atomic_open
from fledge.recipe import Recipe, load_recipe

QUICKSTART = {
    "name": "quickstart",
    "tokenizer": {"kind": "bpe", "vocab_size": 2048},
    "model": {"n_layers": 4, "n_heads": 6, "dim": 192, "max_seq_len": 256},
    "data": {"val_fraction": 0.05},
    "train": {"max_steps": 600, "batch_size": 16, "block_size": 128, "lr": 2e-3, "min_lr": 2e-4,
              "warmup_steps": 50, "log_every": 25, "eval_every": 150, "eval_batches": 8,
              "checkpoint_every": 300, "precision": "fast"},
    "sample": {"prompts": ["def ", "class Parser:\n    \"\"\""], "max_new_tokens": 60, "temperature": 0.7,
               "top_k": 40},
}
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "idlelib", "__pycache__", "lib2to3", "ensurepip",
             "encodings", "pydoc_data", "turtledemo", "msilib", "__phello__"}  # tests and data tables


def stdlib_sources(max_bytes: int) -> list[Path]:
    """Standard-library .py files up to about max_bytes in total, in a fixed order that mixes
    packages (sorted by a hash of the path), so a small corpus still spans many styles."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = [p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts)]
    candidates.sort(key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).hexdigest())
    files, total = [], 0
    for path in candidates:
        size = path.stat().st_size
        if size < 500 or size > 60_000:
            continue
        files.append(path)
        total += size
        if total >= max_bytes:
            break
    return files


def write_corpus(path: Path, max_bytes: int) -> int:
    """One JSON line per source file: {"text", "file"}. Returns the number of documents."""
    sources = stdlib_sources(max_bytes)
    with atomic_open(path) as out:
        for source in sources:
            text = source.read_text(encoding="utf-8", errors="replace")
            out.write(json.dumps({"text": text, "file": source.name}) + "\n")
    return len(sources)


def quickstart_recipe(run_dir: Path, steps: int | None = None) -> Recipe:
    base = json.loads(json.dumps(QUICKSTART))
    base["run_dir"] = str(run_dir)
    base["data"]["sources"] = [str(run_dir / "corpus.jsonl")]
    if steps:
        t = base["train"]
        t["max_steps"] = steps
        t["warmup_steps"] = min(t["warmup_steps"], max(1, steps // 10))
        t["eval_every"] = max(1, steps // 4)
        t["checkpoint_every"] = max(1, steps // 2)
        t["log_every"] = max(1, min(t["log_every"], steps // 10))
    return load_recipe(None, base=base)


def new_run_dir(root: Path = Path("runs"), name: str = "quickstart") -> Path:
    candidate, n = root / name, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{name}-{n}"
    return candidate


def quickstart(steps: int | None = None, corpus_mb: float | None = None, run_dir: str | Path | None = None,
               progress: bool = True):
    from fledge.prepare import prepare
    from fledge.train import train
    run = Path(run_dir) if run_dir else new_run_dir()
    docs = write_corpus(run / "corpus.jsonl", int((corpus_mb or 3.0) * 1_000_000))
    recipe = quickstart_recipe(run, steps)
    print(f"fledge quickstart: {docs} files of Python's standard library -> {run}/corpus.jsonl")
    print(f"training a {recipe.model.n_layers}-layer, {recipe.model.dim}-wide model for {recipe.train.max_steps} "
          f"steps; Ctrl-C stops and saves a checkpoint.")
    prepare(recipe, progress=progress)
    result = train(recipe, progress=progress)
    from fledge.report import write_report
    report = write_report(result.run_dir)
    print(f"\ndone. The run is in {run}/ (recipe.yaml, metrics.jsonl, checkpoints/); its report: {report}\nNext:\n"
          f"  fledge sample {run} --prompt 'def parse(' --num-samples 2\n"
          f"  fledge train {run}/recipe.yaml --resume --set train.max_steps={recipe.train.max_steps * 2}"
          f"   # train longer\n"
          f"  fledge train recipes/shakespeare-char.yaml   # the classic character-level run on your own text")
    return result
