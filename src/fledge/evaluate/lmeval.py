"""Score a fledge run with lm-evaluation-harness on local YAML tasks, offline.

    pip install 'fledge[lm-eval]'                        # lm-eval[hf] 0.4.13
    from fledge.evaluate.lmeval import run_lm_eval
    run_lm_eval("runs/tiny", "examples/lm-eval")           # every task in the folder
    run_lm_eval("runs/tiny", "examples/lm-eval", ["fledge_cloze"], limit=4)
    # -> {"fledge_cloze": {"acc": 0.5, "acc_stderr": 0.22, ..., "samples": 4}}

The run resolves to its best (else latest) checkpoint, which `fledge.export.run.export_hf`
writes to a temporary transformers folder (adapters merged; tokenizer_config.json naming bos/eos,
which lm-eval needs and a pretraining checkpoint lacks) and checks against the run's logits on
held-out text; lm-eval's `hf` model loads that folder. Only the tasks of TASK_DIR are indexed
(none of lm-eval's built-in tasks, which need the hub), the hub and datasets are switched offline
for the call, and a relative `dataset_kwargs.data_files` is read from TASK_DIR (the call runs
there). BOS is put before every request when the tokenizer has one, as fledge trains
(`add_bos_token=True`), and only once in rolling log-likelihoods (see `_hf_model_class`).

Written to `RUN/eval/lm-eval/` (or `out`), replacing an earlier call's files:

    results.json    lm-eval's result dict without the samples, plus "fledge": {checkpoint, task_dir, tasks}
    samples.jsonl   one line per request document: {"task", "doc_id", "doc", "arguments", "resps", metrics...}

Global RNG state (random, numpy, torch), which lm-eval seeds and transformers' model loading
draws from, is restored afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from fledge.errors import DataError, DependencyError, RecipeError
from fledge.files import write_atomic

LM_EVAL_DIR = "lm-eval"                 # runs/<name>/eval/lm-eval/
INSTALL = "pip install 'fledge[lm-eval]'"
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def run_lm_eval(run: str | Path, task_dir: str | Path, tasks: list[str] | None = None, *,
                out: str | Path | None = None, limit: int | float | None = None, batch_size: int = 16,
                device: str = "cpu", chat: bool = False, allow_code: bool = False,
                say: Callable[[str], None] | None = print) -> dict[str, dict[str, float]]:
    """Run the lm-eval tasks `tasks` (default: every task, not group, in `task_dir`) on `run`, a run
    or checkpoint folder; write the results (module docstring) and return {task: {metric: value}}.

    Metric names are lm-eval's without the default filter (`acc`, `acc_stderr`, `acc_norm`,
    `bits_per_byte`; a filtered one keeps it: `exact_match,strict-match`), plus `samples`, the
    documents scored. limit: the first N documents of each task (a float below 1: that share).
    chat: render each request with the checkpoint's chat template (lm-eval's apply_chat_template).
    say: where the summary lines go (None: nowhere). Raises DependencyError (lm-eval missing),
    RecipeError (a bad option, no tasks, an unknown task name), CheckpointError, ExportError (a
    model transformers cannot load), DataError (lm-eval stopped on a task).
    """
    lm_eval = _import_lm_eval()
    task_dir = Path(task_dir).resolve()
    manager, names = _find_tasks(task_dir, tasks)
    _check_options(limit, batch_size)
    from fledge.evaluate.run import EVAL_DIR, run_folder
    from fledge.export.run import export_hf
    from fledge.sample import inference_device, resolve_checkpoint
    device = str(inference_device(device))
    checkpoint = resolve_checkpoint(run)
    folder = Path(out) if out is not None else run_folder(Path(run), checkpoint) / EVAL_DIR / LM_EVAL_DIR
    folder = folder.resolve()
    with tempfile.TemporaryDirectory(prefix="fledge-lm-eval-") as tmp, _rng_kept():
        model_dir = export_hf(checkpoint, Path(tmp) / "model", allow_code=allow_code, say=say or _silent)
        with _offline(Path(tmp) / "datasets"), _working_dir(task_dir):
            model = _hf_model_class()(pretrained=str(model_dir), add_bos_token=_has_bos(model_dir),
                                      trust_remote_code=allow_code, batch_size=batch_size, device=device)
            try:
                results = lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager, limit=limit,
                                                  apply_chat_template=chat, log_samples=True)
            except Exception as e:          # a task's template, data file or metric: lm-eval's own exceptions
                first = (str(e).strip().splitlines() or [""])[0]
                raise DataError(f"lm-eval stopped on task {', '.join(names)}: {type(e).__name__}: {first}. Check "
                                f"the task's YAML and its data file; --debug shows lm-eval's traceback.",
                                str(task_dir)) from e
    metrics = _metrics(results)
    _write(folder, results, checkpoint, task_dir, names)
    if say is not None:
        for name, values in metrics.items():
            say(_summary_line(name, values))
        say(f"wrote {folder / 'results.json'} and {folder / 'samples.jsonl'}")
    return metrics


# --- before any model loads ------------------------------------------------------------------

def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401  (a broken install fails here, not mid-run)
    except ImportError as e:
        raise DependencyError(f"scoring with lm-evaluation-harness needs the lm-eval package, which is not installed "
                              f"({e}). Install it with `{INSTALL}`.") from None
    return lm_eval


def _find_tasks(task_dir: Path, tasks: list[str] | None):
    """(TaskManager over `task_dir` alone, the task names to run), or RecipeError."""
    if not task_dir.is_dir():
        raise RecipeError(f"{task_dir}: no such folder of lm-eval tasks. Name a folder holding task YAML files "
                          f"(see examples/lm-eval/).")
    from lm_eval.tasks import TaskManager
    with _offline():
        manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    found = sorted(manager.all_tasks)
    if not found:
        yamls = sorted(str(p.relative_to(task_dir)) for p in task_dir.rglob("*.yaml"))
        held = f"its YAML files ({', '.join(yamls[:5])}{' ...' if len(yamls) > 5 else ''}) define none" \
            if yamls else "it holds no .yaml file"
        raise RecipeError(f"{task_dir}: no lm-eval task found; {held}. A task YAML needs `task: NAME`, "
                          f"`dataset_path: json` and `dataset_kwargs.data_files`; see examples/lm-eval/.")
    if tasks is None:
        return manager, sorted(manager.all_subtasks)
    if isinstance(tasks, str) or not tasks:
        raise RecipeError(f"tasks must be a non-empty list of task names, got {tasks!r}; found in {task_dir}: "
                          f"{', '.join(found)}.")
    unknown = [t for t in tasks if t not in found]
    if unknown:
        raise RecipeError(f"{task_dir}: no lm-eval task named {', '.join(map(repr, unknown))}; it has "
                          f"{', '.join(found)}. Use one of those with --task, or none for every task.")
    return manager, list(dict.fromkeys(tasks))


def _check_options(limit, batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise RecipeError(f"batch size must be a positive integer, got {batch_size!r}.")
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0 \
            or (isinstance(limit, float) and limit >= 1 and not limit.is_integer()):
        raise RecipeError(f"limit must be a number of documents (a positive integer) or a share below 1, "
                          f"got {limit!r}.")


# --- the model lm-eval runs --------------------------------------------------------------------

def _hf_model_class():
    """lm-eval's `hf` model, with BOS counted once in loglikelihood_rolling.

    lm-eval 0.4.13 with add_bos_token=True encodes the text with BOS and then puts the BOS prefix
    before it again, so bits_per_byte and perplexity also score BOS after BOS (measured: +2.9 nats
    a row on the test's tiny run). The rolling requests are encoded without BOS; the prefix is the one.
    Every other request keeps add_bos_token (BOS before each context, as fledge trains)."""
    from lm_eval.models.huggingface import HFLM

    class FledgeHFLM(HFLM):
        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            saved, self.add_bos_token = self.add_bos_token, False
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
            finally:
                self.add_bos_token = saved

    return FledgeHFLM


def _silent(line: str) -> None:
    pass


def _has_bos(model_dir: Path) -> bool:
    settings = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    return bool(settings.get("bos_token"))


# --- state lm-eval would change --------------------------------------------------------------

@contextlib.contextmanager
def _offline(datasets_cache: Path | None = None) -> Iterator[None]:
    """HF_HUB_OFFLINE and HF_DATASETS_OFFLINE for the block: the environment, and the flags
    huggingface_hub and datasets read from it when they were imported (fledge imports them first).
    `datasets_cache`: where datasets keeps its Arrow copy of the task files for the block, instead of
    ~/.cache/huggingface/datasets (a temporary folder: local files are cheap to read again)."""
    import datasets.config
    from huggingface_hub import constants
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
             datasets.config.HF_DATASETS_CACHE)
    os.environ.update({k: "1" for k in _OFFLINE_ENV})
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    if datasets_cache is not None:
        datasets.config.HF_DATASETS_CACHE = datasets_cache
    try:
        yield
    finally:
        (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
         datasets.config.HF_DATASETS_CACHE) = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _working_dir(folder: Path) -> Iterator[None]:
    """Run the block in `folder`, where datasets reads a task's relative data_files (contextlib.chdir is 3.11+)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """simple_evaluate seeds random, numpy and torch (its own reproducibility), and from_pretrained draws
    from torch's to initialise weights it then overwrites; the caller's state comes back."""
    import numpy as np
    import torch
    py, nps = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(nps)


# --- results ---------------------------------------------------------------------------------

def _metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task or group: {metric: number}} from lm-eval's "results", the default filter's suffix dropped."""
    out = {}
    for name, values in results["results"].items():
        metrics = {}
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue                       # alias, name, sample_len; "N/A" stderr
            metric, _, flt = key.partition(",")
            metrics[metric if flt == "none" else key] = value
        counts = results.get("n-samples", {}).get(name)
        if counts:
            metrics["samples"] = counts["effective"]
        out[name] = metrics
    return out


def _write(folder: Path, results: dict, checkpoint: Path, task_dir: Path, names: list[str]) -> None:
    from lm_eval.utils import handle_non_serializable
    from fledge.files import storage_error
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(e, folder, "create") from None
    kept = {k: v for k, v in results.items() if k != "samples"}
    kept["fledge"] = {"checkpoint": str(checkpoint), "task_dir": str(task_dir), "tasks": names}
    write_atomic(folder / "results.json",
                 json.dumps(kept, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    lines = []
    for task, samples in results.get("samples", {}).items():
        for sample in samples:
            lines.append(json.dumps({"task": task, **sample}, default=handle_non_serializable, ensure_ascii=False))
    write_atomic(folder / "samples.jsonl", "".join(line + "\n" for line in lines))


def _summary_line(name: str, values: dict) -> str:
    shown = []
    for metric, value in values.items():
        if metric.endswith("_stderr") or "_stderr," in metric or metric == "samples":
            continue
        err = values.get(f"{metric}_stderr") if "," not in metric else \
            values.get(metric.replace(",", "_stderr,", 1))
        shown.append(f"{metric} {value:.4g}" + (f" ± {err:.2g}" if isinstance(err, (int, float)) else ""))
    n = values.get("samples")
    return f"{name}: {', '.join(shown) or 'no metrics'}" + (f" ({n} documents)" if n is not None else "")
