"""Export a run: a transformers folder, or GGUF files with an Ollama Modelfile beside each, every one
checked against the model as it was trained.

    fledge export runs/persona --format hf                              # -> runs/persona/export/hf/
    fledge export runs/persona --format gguf --quant f16 --quant q4_k_m  # -> runs/persona/export/gguf/

    from fledge.export import export
    result = export("runs/persona", "gguf", quant=["f16", "q4_k_m"], out="exports/persona")
    result.files, result.verifications

A run folder resolves to its best (else latest) checkpoint (`sample.resolve_checkpoint`).

1. The transformers folder (`export_hf`; for GGUF an intermediate in a temporary folder):
   adapter checkpoints (LoRA, QLoRA) are merged (`fledge.merge.merge`); full weights (a
   pretraining run, a full fine-tune, a merged folder) are loaded as inference loads them and
   written as model.safetensors (tied tensors once) with `export.hf.write_transformers_files`
   (config.json, tokenizer files naming bos/eos/pad, chat template, generation config). A
   SentencePiece tokenizer's tokenizer.model is copied beside (GGUF's vocabulary reads it) and
   the run's recipe.yaml too. Checked (unless `verify=False`): `AutoModelForCausalLM` and
   `AutoTokenizer` load it offline and give the ids and logits (float32) of the checkpoint as
   `sample.load_for_inference` loads it (adapters unmerged; a QLoRA base unquantized, as merging
   uses it) on held-out text, within
   `HF_TOLERANCE` of the logits' scale; else ExportError and the folder is not put in place.
2. GGUF (`export.gguf.write_gguf`) for each quantization asked, as `<name>-<quant>.gguf`;
   checked in llama.cpp (`export.verify.verify_gguf`) while still named
   `<name>-<quant>.unverified.gguf`, renamed when it passes. A file that fails keeps that name
   and the export stops with ExportError naming it. Quantized files are compared with an f16
   file (the one asked for, else one written in the temporary folder).
3. `<name>-<quant>.Modelfile` beside each GGUF (`export.ollama`).

Held-out text: the run's validation data where it can still be read (a pretraining run's
prepared val shards, a fine-tune's validation rows, both relative to the working folder as in
training), else fixed multilingual text; `templates.PROBE` always.

Output folders: `-o DIR`, default `<run>/export/hf` or `<run>/export/gguf`. A folder is written
only when it is new, empty, or marked as an earlier export's (`.fledge-export`); fledge never
writes into a folder it did not make. Beside the files go the run's recipe.yaml and
export.json (what was written and every number measured).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fledge.errors import CheckpointError, DependencyError, ExportError, FledgeError
from fledge.files import refuse_foreign_folder, remove_own_folder, storage_error, swap_in_folder, write_atomic

FORMATS = ("hf", "gguf")
MARKER = ".fledge-export"        # {"fledge": "export", "from": <checkpoint>} in every folder export writes
OURS = (MARKER, ".fledge-merged")  # leftover folders of an export (its hf step merges through fledge.merge)
HF_TOLERANCE = 1e-4              # max |logit difference| / max(1, max |logit|) of the transformers folder
HELD_OUT_WINDOWS = 3             # of a pretraining run's validation tokens, each at most verify.MAX_TOKENS
HELD_OUT_ROWS, HELD_OUT_TOKENS = 32, 1024     # of a fine-tune's validation rows, at most
FALLBACK_TEXTS = (
    "The committee met on 3 March 2021 to review the 17 proposals it had received. After a long discussion, "
    "it approved nine of them, asked for changes to five, and rejected the rest, noting that 'a plan without "
    "a budget is only a wish'.",
    "def mean(values):\n    \"\"\"The arithmetic mean of a non-empty list.\"\"\"\n    return sum(values) / len(values)\n",
)


@dataclass
class HFCheck:
    """The transformers folder against the checkpoint as trained."""

    texts: int
    positions: int
    max_logit_diff: float
    tolerance: float

    def line(self) -> str:
        return (f"hf: AutoModelForCausalLM logits vs the checkpoint on {self.texts} held-out texts ({self.positions} "
                f"positions): max |diff| {self.max_logit_diff:.2e} (tolerance {self.tolerance:.1e}); ids equal")


@dataclass
class ExportResult:
    """What one export wrote and measured."""

    checkpoint: Path
    format: str
    out: Path                                           # the transformers folder, or the GGUF folder
    files: list[Path] = field(default_factory=list)     # GGUF files and Modelfiles (hf: the folder)
    hf_check: HFCheck | None = None
    ggufs: list = field(default_factory=list)           # export.gguf.GGUFResult, one per quant
    verifications: list = field(default_factory=list)   # export.verify.Verification, one per quant
    held_out: str = ""                                  # where the held-out text came from


# --- the one call ------------------------------------------------------------------------------

def export(path: str | Path, format: str = "hf", *, quant: str | list[str] | tuple = "f16", out=None,
           verify: bool = True, allow_code: bool = False, say: Callable[[str], object] = print) -> ExportResult:
    """Export a run (its best, else latest checkpoint) or checkpoint folder; see the module docstring.

    `quant`: one quantization or several (`export.gguf.QUANTS`; --format gguf only). `say` hears
    progress and the numbers. Raises ExportError (an unknown format or quantization, an
    architecture llama.cpp cannot load, an export that does not behave like the run),
    CheckpointError (no checkpoint, a destination fledge did not write), DependencyError
    (llama-cpp-python missing for a K-quant or verification), StorageError.
    """
    from fledge.sample import read_checkpoint, resolve_checkpoint, verify_for_inference
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose hf (a transformers folder) or gguf (llama.cpp).")
    quants = _quants(quant) if format == "gguf" else []
    checkpoint = resolve_checkpoint(path)
    verify_for_inference(checkpoint)
    recipe, _ = read_checkpoint(checkpoint, allow_code)
    target = Path(out) if out is not None else _default_target(checkpoint, format)
    _check_target(target)
    if format == "gguf":
        from fledge.export.gguf import K_QUANTS, require_llama_cpp
        try:
            import gguf  # noqa: F401  (gguf-py writes every file)
        except ImportError:
            raise DependencyError("writing GGUF files needs the gguf package, which is not installed. Install it "
                                  "with pip install 'fledge[gguf]'.") from None
        _refuse_unknown_arch(checkpoint)
        if verify:
            require_llama_cpp("verifying the GGUF files in llama.cpp (--no-verify skips it)")
        if any(q in K_QUANTS for q in quants):
            require_llama_cpp(f"quantizing to {', '.join(q for q in quants if q in K_QUANTS)}")
    data = held_out(checkpoint, recipe) if verify else HeldOut([], None, "")
    if verify:
        say(f"held-out text: {data.source}")
    result = ExportResult(checkpoint, format, target, held_out=data.source)
    if format == "hf":
        result.hf_check = _publish_hf(checkpoint, target, data.texts, verify, allow_code, say)
        result.files = [target]
    else:
        _export_gguf(result, recipe, quants, data, verify, allow_code, say)
    _write_record(result, checkpoint)
    return result


def export_hf(checkpoint: str | Path, out: str | Path, *, verify: bool = True, allow_code: bool = False,
              texts: list[str] | None = None, say: Callable[[str], object] = print) -> Path:
    """The transformers folder of a checkpoint (or run) at `out`, checked against the checkpoint unless
    `verify` is False (on `texts`, default: the run's held-out text); returns `out`."""
    from fledge.sample import read_checkpoint, resolve_checkpoint, verify_for_inference
    checkpoint = resolve_checkpoint(checkpoint)
    verify_for_inference(checkpoint)
    out = Path(out)
    _check_target(out)
    if verify and texts is None:
        data = held_out(checkpoint, read_checkpoint(checkpoint, allow_code)[0])
        texts = data.texts
        say(f"held-out text: {data.source}")
    _publish_hf(checkpoint, out, texts or [], verify, allow_code, say)
    return out


def _refuse_unknown_arch(checkpoint: Path) -> None:
    """ExportError before any work when the checkpoint's config.json names a model llama.cpp cannot load."""
    from fledge.export.names import gguf_arch
    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return                  # no transformers config: build_hf_folder says why
    gguf_arch(config)


def _quants(quant) -> list[str]:
    from fledge.export.gguf import QUANTS
    asked = [quant] if isinstance(quant, str) else list(quant)
    if not asked:
        raise ExportError(f"no quantization given; choose one or more of {', '.join(QUANTS)}.")
    unknown = [q for q in asked if not isinstance(q, str) or q.lower() not in QUANTS]
    if unknown:
        import difflib
        close = difflib.get_close_matches(str(unknown[0]).lower(), QUANTS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ExportError(f"unknown quantization {unknown[0]!r}{hint}; choose from {', '.join(QUANTS)}.")
    return list(dict.fromkeys(q.lower() for q in asked))


def _default_target(checkpoint: Path, format: str) -> Path:
    if checkpoint.parent.name != "checkpoints":
        raise CheckpointError(f"{checkpoint} is not inside a run's checkpoints/ folder, so there is no run folder to "
                              f"put export/ in. Name the output folder with -o DIR.")
    return checkpoint.parent.parent / "export" / format


def _check_target(target: Path) -> None:
    """Refuse a destination that is not new, empty, or an earlier export's."""
    refuse_foreign_folder(target, MARKER, "export into it")


def _mark(folder: Path, checkpoint: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / MARKER, json.dumps({"fledge": "export", "from": str(checkpoint)}) + "\n")
    except OSError as e:
        raise storage_error(e, folder, "create") from None


# --- held-out text -----------------------------------------------------------------------------

@dataclass
class HeldOut:
    """What exports are checked on: texts (tokenization, the transformers folder's ids and logits) and,
    when the run's validation data was read, its token ids with the positions training scored."""

    texts: list[str]
    samples: list[tuple[list[int], list[bool]]] | None    # (ids, scored[t]: predicting ids[t + 1] counts)
    source: str


def held_out(checkpoint: Path, recipe) -> HeldOut:
    """The run's validation data when it can still be read (a pretraining run's val shards: windows,
    every token scored; a fine-tune's validation rows: their answers scored), else FALLBACK_TEXTS;
    `templates.PROBE` is added to the texts and compared but not scored."""
    from fledge.templates import PROBE
    try:
        texts, samples = _fine_tune_rows(checkpoint, recipe) if recipe.model.base else \
            _val_windows(checkpoint, recipe)
        source = (f"{len(samples)} validation rows of the run (answers scored)" if recipe.model.base else
                  f"{len(samples)} windows of the run's validation tokens ({recipe.prepared_path / 'val'})")
    except (FledgeError, OSError, ValueError, KeyError) as e:
        texts, samples, source = [], [], f"the run's validation data could not be read ({str(e).splitlines()[0][:160]})"
    if not samples:
        return HeldOut([*FALLBACK_TEXTS, PROBE], None, (source or "the run has no validation data")
                       + "; fixed multilingual text instead, and templates.PROBE")
    return HeldOut([*texts, PROBE], samples + [_unscored(checkpoint, PROBE)], source + "; templates.PROBE (not scored)")


def _unscored(checkpoint: Path, text: str) -> tuple[list[int], list[bool]]:
    from fledge.model.bases import checkpoint_tokenizer
    from fledge.sample import encode_prompt
    from fledge.tokenizer import find_tokenizer_file, load_tokenizer
    tokenizer = checkpoint_tokenizer(checkpoint) if (checkpoint / "tokenizer_config.json").is_file() else \
        load_tokenizer(find_tokenizer_file(checkpoint))
    ids = encode_prompt(tokenizer, text)
    return ids, [False] * (len(ids) - 1)


def _val_windows(checkpoint: Path, recipe) -> tuple[list[str], list[tuple[list[int], list[bool]]]]:
    """Windows of a pretraining run's validation tokens, as training drew them, and their text."""
    from fledge.export.verify import MAX_TOKENS
    from fledge.prepare import shard_arrays
    from fledge.tokenizer import find_tokenizer_file, load_tokenizer
    tokenizer = load_tokenizer(find_tokenizer_file(checkpoint))
    tokens = next(iter(shard_arrays(recipe.prepared_path, "val")), None)
    if tokens is None:
        return [], []
    window = min(MAX_TOKENS, recipe.model.max_seq_len)
    windows = [tokens[i:i + window].tolist() for i in range(0, len(tokens) - 1, window)][:HELD_OUT_WINDOWS]
    windows = [w for w in windows if len(w) >= 2]
    if max((max(w) for w in windows), default=0) >= tokenizer.vocab_size:
        raise ValueError(f"{recipe.prepared_path} holds token ids this checkpoint's tokenizer does not have")
    return [tokenizer.decode(w) for w in windows], [(w, [True] * (len(w) - 1)) for w in windows]


def _fine_tune_rows(checkpoint: Path, recipe) -> tuple[list[str], list[tuple[list[int], list[bool]]]]:
    """Validation rows as training rendered them: up to HELD_OUT_ROWS rows or HELD_OUT_TOKENS tokens,
    their answers scored; and the text of the first few (special tokens as text, without BOS)."""
    from fledge.model.bases import checkpoint_tokenizer
    from fledge.sample import checkpoint_template
    from fledge.train.batches import IGNORE
    from fledge.train.rows import build_row_batches
    tokenizer = checkpoint_tokenizer(checkpoint)
    template = checkpoint_template(checkpoint, tokenizer)
    rows, total = [], 0
    for row in build_row_batches(recipe, tokenizer, template, say=lambda _: None).val_rows[:HELD_OUT_ROWS]:
        if rows and total + len(row) > HELD_OUT_TOKENS:
            break
        rows.append(row)
        total += len(row)
    texts = []
    for row in rows[:HELD_OUT_WINDOWS]:
        ids = row.ids.tolist()
        if ids and ids[0] == tokenizer.bos_token_id:
            ids = ids[1:]
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return texts, [(row.ids.tolist(), (row.labels[:-1] != IGNORE).tolist()) for row in rows]


# --- the transformers folder ---------------------------------------------------------------------

def _publish_hf(checkpoint: Path, target: Path, texts: list[str], verify: bool, allow_code: bool,
                say: Callable[[str], object]) -> HFCheck | None:
    """Build the folder beside `target`, check it, and rename it into place."""
    staging = target.with_name(f".{target.name}.exporting")
    remove_own_folder(staging, OURS, "export again")
    try:
        build_hf_folder(checkpoint, staging, allow_code=allow_code)
        _mark(staging, checkpoint)
        check = verify_hf(staging, checkpoint, texts, allow_code=allow_code) if verify else None
        if check:
            say(check.line())
        swap_in_folder(staging, target, OURS, "exported", "export again")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return check


def build_hf_folder(checkpoint: Path, folder: Path, *, allow_code: bool = False) -> Path:
    """Write the transformers folder of `checkpoint` into the new folder `folder` (not checked)."""
    from fledge.train.checkpoint import is_adapter_checkpoint
    if is_adapter_checkpoint(checkpoint):
        from fledge.merge import merge
        merge(checkpoint, folder, allow_code=allow_code)
        return folder
    from safetensors.torch import save_file

    from fledge.export.hf import write_transformers_files
    from fledge.model.bases import model_hf_config
    from fledge.sample import load_for_inference
    from fledge.templates import hf_tokenizer
    from fledge.train.checkpoint import weights_to_save
    loaded = load_for_inference(checkpoint, "cpu", allow_code=allow_code)
    config = model_hf_config(loaded.model)
    if config is None:
        raise ExportError(f"{checkpoint}: model.arch {loaded.recipe.model.arch!r} has no transformers config, so "
                          f"neither transformers nor llama.cpp can load it. Export works for fledge's llama "
                          f"architecture and transformers models.")
    tokenizer = loaded.tokenizer if hasattr(loaded.tokenizer, "convert_tokens_to_ids") else hf_tokenizer(checkpoint)
    tensors, _ = weights_to_save(loaded.model)
    try:
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        for name in ("tokenizer.model", "recipe.yaml"):
            if (checkpoint / name).is_file():
                shutil.copyfile(checkpoint / name, folder / name)
    except OSError as e:
        raise storage_error(e, folder) from None
    write_transformers_files(folder, hf_config=config, tokenizer=tokenizer, template=loaded.template)
    return folder


def _reference(checkpoint: Path, allow_code: bool):
    """(model, tokenizer) of the checkpoint as inference loads it, except that a QLoRA run's base is
    loaded unquantized: merging folds its adapters into the full-precision weights, so that is the
    model the folder must equal (the 4-bit base it trained on differs from it by the quantization)."""
    from fledge.sample import load_adapter_run, load_for_inference, read_checkpoint
    from fledge.train.checkpoint import is_adapter_checkpoint
    if is_adapter_checkpoint(checkpoint):
        from fledge.model.bases import checkpoint_tokenizer
        recipe, state = read_checkpoint(checkpoint, allow_code)
        model = load_adapter_run(checkpoint, recipe, state, "cpu", allow_code=allow_code, quantized=False)
        return model, checkpoint_tokenizer(checkpoint)
    loaded = load_for_inference(checkpoint, "cpu", allow_code=allow_code)
    return loaded.model, loaded.tokenizer


def verify_hf(folder: Path, checkpoint: Path, texts: list[str], *, allow_code: bool = False) -> HFCheck:
    """Load `folder` offline with AutoModelForCausalLM and AutoTokenizer and compare ids and float32
    logits with the checkpoint as `load_for_inference` loads it (a QLoRA base unquantized: see
    `_reference`); ExportError when they differ."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fledge.export.verify import MAX_TOKENS
    from fledge.sample import encode_prompt
    model, run_tokenizer = _reference(checkpoint, allow_code)
    ours = model.float().eval()
    theirs = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.model_max_length = 2**62            # the texts are cut to the window below; no length warning
    config = theirs.config
    window = min(MAX_TOKENS, getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                 or MAX_TOKENS)
    for name in ("bos", "eos"):
        want = getattr(run_tokenizer, f"{name}_token_id", None) if hasattr(run_tokenizer, "convert_tokens_to_ids") \
            else getattr(run_tokenizer, f"{name}_id")
        if getattr(tokenizer, f"{name}_token_id") != want:
            raise ExportError(f"{folder}: AutoTokenizer's {name.upper()} is {getattr(tokenizer, f'{name}_token_id')}, "
                              f"the run's is {want}; the folder's tokenizer_config.json is wrong.")
    positions, biggest, tolerance = 0, 0.0, HF_TOLERANCE
    for n, text in enumerate(texts, 1):
        want = encode_prompt(run_tokenizer, text)[:window]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        got = (bos + tokenizer.encode(text, add_special_tokens=False))[:window]
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            raise ExportError(f"{folder}: AutoTokenizer encodes held-out text {n} differently from the run (first at "
                              f"token {at}: {want[at:at + 4]} vs {got[at:at + 4]}); the exported tokenizer is wrong.")
        ids = torch.tensor([want])
        with torch.no_grad():
            a = ours(ids)[0][0].float()
            b = theirs(input_ids=ids).logits[0].float()
        if a.shape != b.shape:
            raise ExportError(f"{folder}: the folder's model gives logits of shape {tuple(b.shape)}, the run's "
                              f"{tuple(a.shape)}.")
        positions += len(want)
        biggest = max(biggest, float((a - b).abs().max()))
        tolerance = max(tolerance, HF_TOLERANCE * float(a.abs().max()))
    if biggest > tolerance:
        raise ExportError(f"{folder}: AutoModelForCausalLM gives logits up to {biggest:.3g} away from the run's "
                          f"(tolerance {tolerance:.2g}) on held-out text: the exported weights or config are not the "
                          f"model that was trained. The folder was not written; report this with the run's recipe.")
    return HFCheck(len(texts), positions, biggest, tolerance)


# --- GGUF ----------------------------------------------------------------------------------------

def _export_gguf(result: ExportResult, recipe, quants: list[str], data: HeldOut, verify: bool, allow_code: bool,
                 say: Callable[[str], object]) -> None:
    from fledge.export.gguf import write_gguf
    from fledge.export.ollama import write_modelfile
    from fledge.export.verify import FLOAT_QUANTS, torch_reference, verify_gguf
    target, checkpoint = result.out, result.checkpoint
    stem = _file_stem(recipe)
    _mark(target, checkpoint)
    for stale in target.glob(f".{target.name}.*"):      # scratch folders of an export that was killed
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    # f16 first: quantized files are compared with it
    quants = sorted(quants, key=lambda q: q != "f16")
    try:
        scratch = tempfile.mkdtemp(prefix=f".{target.name}.", dir=target)
    except OSError as e:
        raise storage_error(e, target, "create a temporary folder in") from None
    try:
        hf = Path(scratch) / "hf"
        build_hf_folder(checkpoint, hf, allow_code=allow_code)
        pytorch = None
        if verify:
            result.hf_check = verify_hf(hf, checkpoint, data.texts, allow_code=allow_code)
            say(result.hf_check.line())
            pytorch = torch_reference(hf, data.texts, samples=data.samples)
        tokenizer, template, context = _chat_parts(hf, pytorch)
        reference = None
        if verify and any(q not in FLOAT_QUANTS for q in quants) and "f16" not in quants:
            say("writing an f16 file to compare the quantized ones with")
            reference = write_gguf(hf, Path(scratch) / f"{stem}-f16.gguf", "f16", say=lambda _: None)
        for q in quants:
            final = target / f"{stem}-{q}.gguf"
            written = write_gguf(hf, target / f"{stem}-{q}.unverified.gguf" if verify else final, q, say=say)
            result.ggufs.append(written)
            if verify:
                check = verify_gguf(written.path, hf, data.texts, reference=reference, quant=q, pytorch=pytorch)
                result.verifications.append(check)
                for line in check.lines():
                    say(line)
                if not check.ok:
                    raise ExportError(f"{written.path}: the {q} file does not behave like the run: {check.problems[0]}"
                                      f"{f' (and {len(check.problems) - 1} more problems)' if len(check.problems) > 1 else ''}"
                                      f". It is kept under that name for inspection; do not ship it. Report this "
                                      f"with the run's recipe and export.json.")
                try:
                    os.replace(written.path, final)
                except OSError as e:
                    raise storage_error(e, final, "rename the verified file to") from None
                written.path = final
                if q == "f16":
                    reference = written
            result.files.append(final)
            result.files.append(write_modelfile(final, template, tokenizer, sample=recipe.sample,
                                                system=recipe.template.system if template is not None else "",
                                                context_length=context, origin=f"{checkpoint}, {q}"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        _write_record(result, checkpoint)


def _chat_parts(hf: Path, pytorch) -> tuple[object, object, int | None]:
    """(tokenizer, template or None, context length) of the transformers folder, for the Modelfiles."""
    from fledge.sample import checkpoint_template
    if pytorch is not None:
        tokenizer, template = pytorch.tokenizer, pytorch.template
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(hf, local_files_only=True)
        template = checkpoint_template(hf, tokenizer)
    config = json.loads((hf / "config.json").read_text(encoding="utf-8"))
    return tokenizer, template, config.get("max_position_embeddings") or config.get("n_positions")


def _file_stem(recipe) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in (recipe.name or "model")).strip(".-")
    return name or "model"


# --- the record ------------------------------------------------------------------------------

def _write_record(result: ExportResult, checkpoint: Path) -> None:
    """export.json (what was written and measured) and the run's recipe.yaml beside the GGUF files, or
    inside the transformers folder."""
    folder = result.out
    if not (folder / MARKER).is_file():
        return
    record = {
        "checkpoint": str(checkpoint), "format": result.format, "held_out": result.held_out,
        "files": [str(p) for p in result.files],
        "hf_check": result.hf_check.__dict__ if result.hf_check else None,
        "gguf": [{"path": str(g.path), "quant": g.quant, "arch": g.arch, "fallbacks": list(g.fallbacks),
                  "tensor_types": _count(g.tensor_types)} for g in result.ggufs],
        "verification": [v.to_json() for v in result.verifications],
    }
    try:
        write_atomic(folder / "export.json", json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        if (checkpoint / "recipe.yaml").is_file() and not (folder / "recipe.yaml").is_file():
            shutil.copyfile(checkpoint / "recipe.yaml", folder / "recipe.yaml")
    except OSError as e:
        raise storage_error(e, folder / "export.json") from None


def _count(types: dict) -> dict:
    counts: dict[str, int] = {}
    for kind in types.values():
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))
