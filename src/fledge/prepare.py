"""Corpus -> tokenizer -> token shards with a manifest (`fledge prepare RECIPE`).

    manifest = prepare(load_recipe("recipes/shakespeare-char.yaml"))   # or load_manifest(dir)

Reads `data.sources` (files; folders, walked for .txt/.md/.jsonl; globs: see fledge.sources)
and writes into `recipe.prepared_path`: tokenizer.json or tokenizer.model;
tokenizer-provenance.json (what it was trained on); train/ and val/shard-NNNNN.bin (raw
little-endian uint16 token ids, uint32 past 65,536 tokens, at most data.shard_tokens each);
manifest.json; recipe.yaml.

A document (a whole .txt/.md file, or one .jsonl line) is written as [bos] + ids + [eos].
It goes to val when a hash of (data.split_seed, path, line) falls below data.val_fraction
("document-hash"; if none does, the one with the smallest hash goes). A corpus of ONE
document is cut instead: its last val_fraction of bytes, from a line end on, is val and
opens with its own bos ("contiguous-tail"; train's part has no eos).

A .jsonl row that is not a valid record (not JSON, NaN, too deep, a number too long, not an
object, text missing or not a string, an unpaired surrogate, bytes not UTF-8) stops prepare
with file:line, or under data.on_bad_row: skip is dropped, counted and listed in the
manifest (stats.rows): rows read = rows written + bad + empty.

Memory stays flat: files are read in 1 MB blocks and encoded with `encode_batch` in pieces
of ~64K characters, cut just before a newline followed by a non-space character. That is
always a GPT-2 pre-token boundary, so the ids equal those of encoding each document whole.

Re-running reuses what is still valid. Sources are read again only when their size or
mtime changed (per-file hashes and document counts are cached in source-scan.json). Shards:
when the fingerprint (data and tokenizer sections, resolved source files and their sha256)
equals the manifest's and every shard is there at its size. Tokenizer: it is retrained only
when the tokenizer section or the exact text it trains on changes; that text is a
deterministic sample of at most tokenizer.train_bytes spread evenly over the corpus (char:
all of it, so no character is unknown). Changing split or shard settings, or a source
outside the sample, keeps it.

Prepare deletes only what it can prove it created. Every folder it creates (the prepared
folder, train/, val/, .tmp-*) holds a marker, `.fledge-prepared`, with the prepared folder's
random id (also in the manifest as prepared_id); a folder without it is never deleted, and a
prepared folder that overlaps the sources is refused before anything is written. Shards are
written under a marked temporary folder and renamed; the old manifest is deleted first and
the new one written last (all small files atomically), so a crash or a full disk never leaves
a manifest over half-written shards.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import ctypes
import ctypes.util
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from fledge.errors import DataError, FledgeError, StorageError
from fledge.files import remove_stale_temps, storage_error, write_atomic
from fledge.sources import ESCAPED, RowReport, SourceFile, jsonl_rows, refuse_overlap, resolve_sources
from fledge.tokenizer import BOS, EOS, Tokenizer, find_tokenizer_file, load_tokenizer, train_tokenizer

VERSION = 1
READ_BYTES = 1 << 20     # bytes read from a file at a time
PIECE_CHARS = 1 << 16    # characters per encoded piece (cut before a newline, see _SAFE_CUT)
BATCH_CHARS = 1 << 20    # characters per encode_batch call
PROVENANCE = "tokenizer-provenance.json"
SCAN_CACHE = "source-scan.json"
MARKER = ".fledge-prepared"  # {"fledge": "prepared", "id": <hex>} in every folder prepare creates
TRIM_EVERY = 8 << 20     # bytes of text between returns of freed heap memory to the OS
SHOWN_BAD_ROWS = 10      # bad rows named in the printed report

# Cutting just before a newline that is followed by a non-space character never changes
# GPT-2 pre-tokens: whole or cut, any whitespace before it ends one token and "\n" is the next.
_SAFE_CUT = re.compile(r"(?=\n\S)")
_SHARD = re.compile(r"shard-\d{5,}\.bin\Z")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK[^\n]*\n", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK", re.M | re.I)


@dataclass
class Piece:
    doc: str            # document key: the file's name, or "name:line" for .jsonl
    text: str
    first: bool         # starts its document (gets bos)
    last: bool          # ends its document (gets eos)
    split: str = "train"


@dataclass
class SplitPlan:
    method: str             # "document-hash" or "contiguous-tail"
    val_fraction: float
    seed: int
    forced: str | None = None   # document-hash: sent to val because no document hashed below val_fraction
    cut_bytes: int = 0          # contiguous-tail: text bytes before the cut

    def in_val(self, doc: str) -> bool:
        return doc == self.forced or _doc_hash(self.seed, doc) < self.val_fraction


def _doc_hash(seed: int, doc: str) -> float:
    digest = hashlib.blake2b(f"{seed}\0{doc}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# --- the stage --------------------------------------------------------------------------

def prepare(recipe, progress: bool = True) -> dict:
    """Build (or reuse) tokenizer, shards and manifest for `recipe`; return the manifest."""
    out = recipe.prepared_path
    with _progress_bars(progress) as bars:
        files = resolve_sources(recipe.data)
        origin = "data.prepared_dir" if recipe.data.prepared_dir else "<run_dir>/data, as data.prepared_dir is empty"
        refuse_overlap(files, out, origin)
        folder_id = _claim_folder(out)
        sources, plan = _scan(files, recipe.data, bars, out)
        fingerprint = _fingerprint(recipe, sources)
        manifest = _reusable_manifest(out, fingerprint)
        if manifest is not None:
            bad = manifest["stats"].get("rows", {}).get("bad", 0)
            _say(bars, f"{out}: inputs unchanged (fingerprint {fingerprint}); reused tokenizer and shards"
                       + (f" ({bad} bad rows were dropped: manifest.json stats.rows)" if bad else ""))
            return manifest
        for split in ("train", "val"):  # before any work: refuse now what publishing would have to delete
            _check_own(out / split, folder_id)
        _unlink(out / "manifest.json")
        _remove_stale(out, folder_id, bars)
        total = sum(s["bytes"] for s in sources)
        if plan.method == "contiguous-tail":  # a pass over the one document to find where val starts
            text_bytes = sum(len(p.text.encode()) for p in iter_pieces(files, recipe.data))
            plan.cut_bytes = int(text_bytes * (1 - plan.val_fraction))
        tok = _obtain_tokenizer(recipe, files, total, out, bars)
        manifest = _write_all(recipe, files, plan, tok, out, bars, sources, fingerprint, folder_id)
        _report(bars, out, manifest)
        _say(bars, f"{out}: {manifest['splits']['train']['tokens']:,} train and "
                   f"{manifest['splits']['val']['tokens']:,} val tokens ({plan.method} split)")
        return manifest


def load_manifest(prepared_dir: str | Path) -> dict:
    """The manifest of a prepared folder; raises if it was never prepared or shards are gone."""
    path = Path(prepared_dir) / "manifest.json"
    rerun = "Rerun `fledge prepare RECIPE` to rebuild it."
    if not path.is_file():
        have = sorted(p.name for p in Path(prepared_dir).iterdir()) if Path(prepared_dir).is_dir() else []
        raise DataError(f"not prepared (no manifest.json; found: {', '.join(have[:10]) or 'nothing'}). "
                        f"Run `fledge prepare RECIPE` first.", str(prepared_dir))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise storage_error(e, path, "read") from None
    except ValueError as e:
        raise DataError(f"not a readable manifest ({e}). {rerun}", str(path)) from None
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise DataError(f"manifest version {version}, this fledge reads {VERSION}. {rerun}", str(path))
    try:
        missing = [s["file"] for split in manifest["splits"].values() for s in split["shards"]
                   if not (Path(prepared_dir) / s["file"]).is_file()]
    except (KeyError, TypeError, AttributeError):
        raise DataError(f"the manifest has no valid splits section. {rerun}", str(path)) from None
    if missing:
        raise DataError(f"shard files missing: {', '.join(missing[:5])}. Rerun `fledge prepare RECIPE` to rebuild "
                        f"them.", str(prepared_dir))
    return manifest


def shard_arrays(prepared_dir: str | Path, split: str, manifest: dict | None = None) -> list[np.ndarray]:
    """The shards of one split as read-only memory maps, in order."""
    manifest = manifest or load_manifest(prepared_dir)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    return [np.memmap(Path(prepared_dir) / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
            for s in manifest["splits"][split]["shards"] if s["tokens"]]


# --- scanning ----------------------------------------------------------------------------

def _scan(files: list[SourceFile], data, bars, out: Path) -> tuple[list[dict], SplitPlan]:
    """Hash every file and count its documents (checking every .jsonl row); choose the split method.

    Results per file are cached in `<prepared>/source-scan.json` under (path, size, mtime,
    split and row settings): a second `prepare` or `fledge train` over a 36 GB corpus does not
    read it all again just to find that nothing changed. A bad row stops the scan here, before
    the tokenizer trains, unless data.on_bad_row is skip."""
    cache_path = out / SCAN_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    fresh: dict = {}
    sources, count, bad, smallest, any_val = [], 0, 0, (2.0, ""), False
    task = bars.add_task("hashing sources", total=sum(f.path.stat().st_size for f in files))
    for src in files:
        stat = src.path.stat()
        ident = json.dumps([os.path.realpath(src.path), src.key, stat.st_size, stat.st_mtime_ns, data.split_seed,
                            data.val_fraction, data.text_field, data.on_bad_row, data.on_decode_error])
        entry = cache.get(ident) if isinstance(cache, dict) else None
        entry = entry or _scan_file(src, stat.st_size, data)
        fresh[ident] = entry
        sources.append({"path": src.name, "bytes": stat.st_size, "sha256": entry["sha256"]})
        bars.advance(task, stat.st_size)
        count, bad = count + entry["documents"], bad + entry.get("bad_rows", 0)
        if entry["documents"]:
            smallest = min(smallest, tuple(entry["smallest"]))
        any_val = any_val or entry["any_val"]
    if count == 0:
        what = f"all {bad} rows are bad (data.on_bad_row: skip)" if bad else "all empty"
        raise DataError(f"the corpus is empty: {len(files)} source file(s), {what}. Check data.sources.",
                        files[0].name if len(files) == 1 else None)
    if fresh != cache:
        write_atomic(cache_path, json.dumps(fresh))
    plan = SplitPlan("contiguous-tail" if count == 1 else "document-hash", data.val_fraction, data.split_seed)
    if count > 1 and data.val_fraction > 0 and not any_val:
        plan.forced = smallest[1]
    return sources, plan


def _scan_file(src: SourceFile, size: int, data) -> dict:
    """sha256, document count, the smallest split hash and whether any document hashes into val."""
    count, smallest, any_val, rows = 0, (2.0, ""), False, RowReport()
    for doc in _doc_keys(src, size, data, rows):
        count, h = count + 1, _doc_hash(data.split_seed, doc)
        smallest, any_val = min(smallest, (h, doc)), any_val or h < data.val_fraction
    return {"sha256": _file_sha256(src.path), "documents": count, "smallest": list(smallest), "any_val": any_val,
            "bad_rows": rows.bad}


def _doc_keys(src: SourceFile, size: int, data, rows: RowReport) -> Iterator[str]:
    """Split keys of the file's documents: its name, or name:line for each valid .jsonl row with text."""
    if not src.jsonl:
        yield from [src.key] if size else []
        return
    for number, _ in jsonl_rows(src, data, collections.Counter(), rows):
        yield f"{src.key}:{number}"


def _fingerprint(recipe, sources: list[dict]) -> str:
    data = dataclasses.asdict(recipe.data)
    for key in ("sources", "prepared_dir"):  # the resolved files below stand for sources
        data.pop(key)
    tokenizer = dataclasses.asdict(recipe.tokenizer)
    if recipe.tokenizer.path:
        tokenizer["file_sha256"] = _file_sha256(Path(recipe.tokenizer.path))
    blob = json.dumps({"version": VERSION, "data": data, "tokenizer": tokenizer,
                       "sources": [(s["path"], s["sha256"]) for s in sources]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    if not path.is_file():
        return ""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_BYTES):
            sha.update(block)
    return sha.hexdigest()


# --- reading text -------------------------------------------------------------------------

def iter_pieces(files: list[SourceFile], data, replaced: collections.Counter | None = None,
                rows: RowReport | None = None) -> Iterator[Piece]:
    """Every document of the corpus as pieces of cleaned text, in order.

    `replaced` counts, per file, the bytes that were not UTF-8 (on_decode_error: replace);
    `rows` counts the .jsonl rows read, written and dropped.
    """
    replaced = collections.Counter() if replaced is None else replaced
    rows = RowReport() if rows is None else rows
    for src in files:
        if src.jsonl:
            yield from (Piece(f"{src.key}:{number}", text, True, True)
                        for number, text in jsonl_rows(src, data, replaced, rows))
        else:
            yield from _text_pieces(src, data, replaced)


def _text_pieces(src: SourceFile, data, replaced: collections.Counter) -> Iterator[Piece]:
    buffer, first = "", True
    for index, block in enumerate(_decoded_blocks(src, data, replaced)):
        text, end = buffer + block, None
        if data.strip_gutenberg:
            if index == 0 and (start := _GUTENBERG_START.search(text)):
                text = text[start.end():]
            if end := _GUTENBERG_END.search(text):  # searched with the rest of the last block: a
                text = text[:end.start()]           # marker may straddle two blocks
        pieces, buffer = _cut_pieces(text)
        for text in pieces:
            yield Piece(src.key, text, first, False)
            first = False
        if end:
            break
    if buffer or not first:
        yield Piece(src.key, buffer, first, True)


def _decoded_blocks(src: SourceFile, data, replaced: collections.Counter) -> Iterator[str]:
    """The file's text in ~1 MB blocks: UTF-8 decoded, leading BOM removed."""
    replace = data.on_decode_error == "replace"
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape" if replace else "strict")
    offset = 0
    with open(src.path, "rb") as f:
        while True:
            block = f.read(READ_BYTES)
            pending = len(decoder.getstate()[0])  # bytes of a character split across blocks
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise _bad_utf8(src.name, offset - pending + e.start, e.object[e.start]) from None
            if replace:
                text, count = ESCAPED.subn("\ufffd", text)
                replaced[src.name] += count
            if offset == 0:
                text = text.removeprefix("\ufeff")
            offset += len(block)
            if text:
                yield text
            if not block:
                return


def _bad_utf8(name: str, offset: int, byte: int) -> DataError:
    return DataError(f"byte 0x{byte:02x} is not UTF-8. Convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8) "
                     f"or set data.on_decode_error: replace.", name, offset=offset)


def _cut_pieces(text: str) -> tuple[list[str], str]:
    """Cut ~PIECE_CHARS pieces off `text` before safe newlines; return them and the rest."""
    pieces, start = [], 0
    while len(text) - start > PIECE_CHARS:
        safe = _SAFE_CUT.search(text, start + PIECE_CHARS)
        if safe:
            end = safe.start()
        elif len(text) - start > 8 * PIECE_CHARS:  # no safe cut for long: any newline, or anywhere
            newline = text.find("\n", start + PIECE_CHARS)
            end = newline + 1 if newline >= 0 else start + PIECE_CHARS
        else:
            break
        pieces.append(text[start:end])
        start = end
    return pieces, text[start:]


# --- splitting ----------------------------------------------------------------------------

def assign_splits(pieces: Iterator[Piece], plan: SplitPlan) -> Iterator[Piece]:
    """Set each piece's split; contiguous-tail cuts the one document's crossing piece in two."""
    if plan.method == "document-hash":
        split = "train"
        for piece in pieces:
            if piece.first:
                split = "val" if plan.in_val(piece.doc) else "train"
            piece.split = split
            yield piece
        return
    seen, split = 0, "train"
    for piece in pieces:
        size = len(piece.text.encode()) if split == "train" else 0
        if split == "train" and seen + size > plan.cut_bytes:
            cut = _line_cut(piece.text, plan.cut_bytes - seen)
            yield Piece(piece.doc, piece.text[:cut], piece.first, False, "train")
            piece = Piece(piece.doc, piece.text[cut:], True, piece.last)  # val opens with its own bos
            split = "val"
        seen += size
        piece.split = split
        yield piece


def _line_cut(text: str, nbytes: int) -> int:
    """Character index just after the first newline at or past byte `nbytes` of `text`."""
    index = len(text.encode()[:nbytes].decode("utf-8", "ignore"))
    newline = text.find("\n", index)
    return newline + 1 if newline >= 0 else index


# --- tokenizer ----------------------------------------------------------------------------

def _obtain_tokenizer(recipe, files: list[SourceFile], total: int, out: Path, bars) -> Tokenizer:
    """Copy tokenizer.path, reuse the saved tokenizer when its inputs are unchanged, or train."""
    cfg = recipe.tokenizer
    if cfg.path:
        tok = load_tokenizer(cfg.path)
        if tok.kind != cfg.kind:
            _say(bars, f"tokenizer.path {cfg.path} is a {tok.kind} tokenizer; it wins over tokenizer.kind "
                       f"{cfg.kind}")
        if (tok.bos_token, tok.eos_token) != (BOS, EOS):  # a tokenizer from elsewhere: say what marks documents
            _say(bars, f"tokenizer.path {cfg.path}: documents open with {tok.bos_token} (id {tok.bos_id}) and "
                       f"end with {tok.eos_token} (id {tok.eos_id})")
        _save_tokenizer(tok, out, {"copied_from": str(cfg.path)})
        return tok
    config_json = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    saved = _saved_tokenizer(out)
    if saved is not None:
        sha = hashlib.sha256(config_json.encode())
        for _ in _tokenizer_texts(files, recipe.data, cfg, total, sha, bars, "checking tokenizer sample"):
            pass
        if sha.hexdigest() == saved[1].get("key"):
            _say(bars, f"reused {saved[0].file_name}: same settings and training text")
            return saved[0]
    sha = hashlib.sha256(config_json.encode())
    texts = _tokenizer_texts(files, recipe.data, cfg, total, sha, bars, f"training {cfg.kind} tokenizer")
    tok = train_tokenizer(cfg, texts)
    _save_tokenizer(tok, out, {"key": sha.hexdigest(), "tokenizer": dataclasses.asdict(cfg)})
    _say(bars, f"trained a {tok.kind} tokenizer of {tok.vocab_size:,} tokens")
    return tok


def _tokenizer_texts(files, data, cfg, total: int, sha, bars, label: str) -> Iterator[str]:
    """The training sample: pieces spread evenly over the corpus, at most cfg.train_bytes
    (char: everything). Each text also goes into `sha`."""
    budget = total if cfg.kind == "char" else min(total, cfg.train_bytes)
    task = bars.add_task(label, total=budget)
    taken = seen = 0
    for piece in iter_pieces(files, data):
        size = len(piece.text.encode())
        seen += size
        _trim_heap_every(seen, size)
        if piece.text and (cfg.kind == "char" or taken < budget * seen / max(total, 1)):
            sha.update(piece.text.encode())
            taken += size
            bars.advance(task, size)
            yield piece.text
        if taken >= budget and cfg.kind != "char":
            break
    bars.update(task, completed=budget)
    if taken == 0:
        names = ", ".join(f.name for f in files[:5])
        raise DataError(f"the corpus is empty: no text left in {names} after removing BOMs and Gutenberg "
                        f"headers. Check data.sources and data.strip_gutenberg.")


def _saved_tokenizer(out: Path) -> tuple[Tokenizer, dict] | None:
    provenance = out / PROVENANCE
    try:
        record = json.loads(provenance.read_text(encoding="utf-8"))
        tok = load_tokenizer(find_tokenizer_file(out))
    except (OSError, ValueError, FledgeError):
        return None
    return (tok, record) if record.get("sha256") == tok.sha256 else None


def _save_tokenizer(tok: Tokenizer, out: Path, record: dict) -> None:
    """The tokenizer file, then its provenance: a crash between leaves a provenance that does
    not match the file, so the next run trains again rather than trusting it."""
    for name in set(Tokenizer.file_names.values()) - {tok.file_name}:
        _unlink(out / name)  # a tokenizer of another kind from an earlier run
    tok.save(out)
    record = {**record, "file": tok.file_name, "sha256": tok.sha256}
    write_atomic(out / PROVENANCE, json.dumps(record, indent=1) + "\n")


# --- shards and manifest ------------------------------------------------------------------

class ShardWriter:
    """Appends token ids to shard-00000.bin, shard-00001.bin, ... of at most `shard_tokens` each,
    in `root/split/`, a folder it creates with the prepared folder's marker."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int, folder_id: str):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.folder_id = folder_id
        self.shards: list[dict] = []
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            ids[:room].astype(self.dtype, copy=False).tofile(self._file)
            self.shards[-1]["tokens"] += min(room, len(ids))
            ids = ids[room:]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}/shard-{len(self.shards):05d}.bin"
        if not self.shards:
            _make_own_folder(self.root / self.split, self.folder_id)
        self._file = open(self.root / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()


def _write_all(recipe, files, plan: SplitPlan, tok: Tokenizer, out: Path, bars, sources: list[dict],
               fingerprint: str, folder_id: str) -> dict:
    """Encode into a marked temporary folder, then publish; on any failure the folder goes and a
    file-system error becomes one StorageError line."""
    dtype = np.dtype("<u2") if tok.vocab_size <= 65536 else np.dtype("<u4")
    tmp = out / f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    writers = {s: ShardWriter(tmp, s, dtype, recipe.data.shard_tokens, folder_id) for s in ("train", "val")}
    try:
        _make_own_folder(tmp, folder_id)
        counts, replaced, rows = _encode(recipe.data, files, plan, tok, writers, bars, sum(s["bytes"] for s in sources))
        if not counts["train"]["bytes"] + counts["val"]["bytes"]:
            raise DataError("the corpus is empty: no text left after removing BOMs and Gutenberg headers. "
                            "Check data.sources and data.strip_gutenberg.")
        manifest = _manifest(tok, writers, counts, replaced, rows, plan, sources, fingerprint, dtype, folder_id)
        _publish(tmp, out, manifest, recipe, folder_id)
    except BaseException as e:
        for writer in writers.values():
            with contextlib.suppress(OSError):
                writer.close()
        if _exists(tmp) and _foreign(tmp, folder_id) is None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise storage_error(e, out, "write shards into") from None
        raise
    return manifest


def _encode(data, files, plan: SplitPlan, tok: Tokenizer, writers: dict, bars, total: int):
    """Write every document's ids through `writers`; return byte and document counts per split,
    replaced bytes per file, and the row report."""
    dtype = next(iter(writers.values())).dtype
    counts = {s: {"documents": 0, "bytes": 0} for s in writers}
    replaced: collections.Counter = collections.Counter()
    rows = RowReport()
    task = bars.add_task("encoding", total=total)
    for batch in _batches(assign_splits(iter_pieces(files, data, replaced, rows), plan)):
        ids = tok.encode_batch([p.text for p in batch])
        streams: dict[str, list[int]] = {"train": [], "val": []}
        for piece, piece_ids in zip(batch, ids):
            stream = streams[piece.split]
            if piece.first:
                stream.append(tok.bos_id)
                counts[piece.split]["documents"] += 1
            stream.extend(piece_ids)
            if piece.last:
                stream.append(tok.eos_id)
            size = len(piece.text.encode())
            counts[piece.split]["bytes"] += size
            bars.advance(task, size)
            _trim_heap_every(counts["train"]["bytes"] + counts["val"]["bytes"], size)
        for split, stream in streams.items():
            if stream:
                writers[split].write(np.asarray(stream, dtype=dtype))
    bars.update(task, completed=total)
    for writer in writers.values():
        writer.close()
    return counts, replaced, rows


def _batches(pieces: Iterator[Piece]) -> Iterator[list[Piece]]:
    batch, chars = [], 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece.text)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _manifest(tok, writers, counts, replaced, rows, plan, sources, fingerprint, dtype, folder_id) -> dict:
    splits = {s: {"tokens": sum(x["tokens"] for x in w.shards), "documents": counts[s]["documents"],
                  "shards": w.shards} for s, w in writers.items()}
    text_bytes = sum(c["bytes"] for c in counts.values())
    tokens = sum(s["tokens"] for s in splits.values())
    documents = sum(c["documents"] for c in counts.values())
    if plan.method == "contiguous-tail" and counts["val"]["documents"]:
        documents -= 1  # one document, opened again by val's bos
    return {
        "version": VERSION, "dtype": dtype.name,
        "tokenizer": {"file": tok.file_name, "kind": tok.kind, "sha256": tok.sha256,
                      "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id},
        "splits": splits,
        "split": {"method": plan.method, "val_fraction": plan.val_fraction, "seed": plan.seed},
        "sources": sources,
        "fingerprint": fingerprint,
        "prepared_id": folder_id,
        "stats": {"source_bytes": sum(s["bytes"] for s in sources), "text_bytes": text_bytes,
                  "documents": documents, "tokens": tokens,
                  "tokens_per_byte": round(tokens / max(text_bytes, 1), 4),
                  "replaced_bytes": sum(replaced.values()),
                  "replaced_bytes_by_file": {name: n for name, n in replaced.items() if n},
                  "rows": rows.as_dict()},
    }


def _publish(tmp: Path, out: Path, manifest: dict, recipe, folder_id: str) -> None:
    """Move the finished shards into place, then write the manifest last."""
    for split in ("train", "val"):
        if _exists(out / split):
            _remove_own(out / split, folder_id)
        if (tmp / split).is_dir():
            (tmp / split).rename(out / split)
    _remove_own(tmp, folder_id)
    recipe.save(out / "recipe.yaml")
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")


def _reusable_manifest(out: Path, fingerprint: str) -> dict | None:
    try:
        manifest = load_manifest(out)
        tokenizer_sha = _file_sha256(out / manifest["tokenizer"]["file"])
    except (FledgeError, OSError, ValueError, KeyError):
        return None
    if manifest.get("fingerprint") != fingerprint or tokenizer_sha != manifest["tokenizer"]["sha256"]:
        return None
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if (out / shard["file"]).stat().st_size != shard["tokens"] * itemsize:
                return None
    return manifest


# --- folders prepare owns -------------------------------------------------------------------

def _claim_folder(out: Path) -> str:
    """The id in the prepared folder's marker. A new or empty folder, or one an earlier fledge
    prepared (its manifest says so), gets a marker now; any other folder is refused."""
    folder_id = _marker_id(out)
    if folder_id:
        return folder_id
    folder_id = secrets.token_hex(8)
    if not _exists(out):
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, out.parent, "create") from None
        _make_own_folder(out, folder_id)
        return folder_id
    if not out.is_dir():
        raise StorageError(f"{out}: the prepared folder (data.prepared_dir) is a file. Set data.prepared_dir to "
                           f"a folder path.")
    have = sorted(os.listdir(out))
    if have and not _earlier_manifest(out):
        more = f" and {len(have) - 8} more" if len(have) > 8 else ""
        raise StorageError(f"{out}: the prepared folder already holds files prepare did not write "
                           f"({', '.join(have[:8])}{more}) and no {MARKER}; prepare writes only into a new or "
                           f"empty folder, or one it prepared before. Set data.prepared_dir to a new folder.")
    write_atomic(out / MARKER, json.dumps({"fledge": "prepared", "id": folder_id}) + "\n")
    return folder_id


def _earlier_manifest(out: Path) -> bool:
    """Whether `out` holds a manifest of a fledge from before markers."""
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"version", "fingerprint", "splits", "tokenizer"} <= set(manifest)


def _make_own_folder(folder: Path, folder_id: str) -> None:
    """Create `folder` (it must not exist) with the marker; an empty folder is removed again on failure."""
    try:
        folder.mkdir()
    except OSError as e:
        raise storage_error(e, folder, "create") from None
    try:
        write_atomic(folder / MARKER, json.dumps({"fledge": "prepared", "id": folder_id}) + "\n")
    except BaseException:
        with contextlib.suppress(OSError):
            folder.rmdir()
        raise


def _marker_id(folder: Path) -> str | None:
    path = folder / MARKER
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1024:
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and record.get("fledge") == "prepared" and isinstance(record.get("id"), str)
    return record["id"] or None if ok else None


def _foreign(folder: Path, folder_id: str) -> str | None:
    """Why prepare cannot prove it created `folder`, or None: the folder must carry this prepared
    folder's marker and hold nothing but the marker, shards and such folders (train/, val/)."""
    if folder.is_symlink() or not folder.is_dir():
        return "it is a link or a file"
    if _marker_id(folder) != folder_id:
        return f"it has no {MARKER} of this prepared folder"
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        return f"it cannot be listed: {e.strerror}"
    for entry in entries:
        if entry.name == MARKER or (_SHARD.match(entry.name) and entry.is_file(follow_symlinks=False)):
            continue
        if entry.name in ("train", "val") and entry.is_dir(follow_symlinks=False):
            reason = _foreign(Path(entry.path), folder_id)
            if reason:
                return f"{entry.name}/: {reason}"
            continue
        return f"it holds {entry.name}, which prepare did not write"
    return None


def _check_own(folder: Path, folder_id: str) -> None:
    """Raise unless `folder` is absent or provably prepare's own (so it may be replaced)."""
    reason = _foreign(folder, folder_id) if _exists(folder) else None
    if reason:
        raise StorageError(f"{folder}: prepare did not create this folder ({reason}), so it will not delete it. "
                           f"If it holds only shards of an earlier prepare, delete it yourself; otherwise move it "
                           f"away or set data.prepared_dir to a new folder.")


def _remove_own(folder: Path, folder_id: str) -> None:
    _check_own(folder, folder_id)
    shutil.rmtree(folder)


def _remove_stale(out: Path, folder_id: str, bars) -> None:
    """Remove what a killed run left: temporary files, and .tmp-* folders that carry our marker."""
    remove_stale_temps(out)
    for stale in sorted(out.glob(".tmp-*")):
        reason = _foreign(stale, folder_id)
        if reason is None:
            shutil.rmtree(stale, ignore_errors=True)
        else:
            _say(bars, f"left {stale} in place: prepare cannot prove it created it ({reason})")


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise storage_error(e, path, "delete") from None


# --- memory -------------------------------------------------------------------------------

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def _trim_heap_every(done: int, size: int) -> None:
    """Give freed heap pages back to the OS each time `done` passes a multiple of TRIM_EVERY.

    Reading and decoding 1 MB blocks makes glibc's heap creep up by ~1.3 MB per 16 MB read
    (measured: 95 MB of RSS after 1 GB, 13 MB with malloc_trim), so without this the peak
    memory of prepare would grow with the corpus.
    """
    if done // TRIM_EVERY != (done - size) // TRIM_EVERY and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


# --- progress -----------------------------------------------------------------------------

def _progress_bars(enabled: bool):
    """Rich progress bars on stderr (bytes done, MB/s, time left); silent when not enabled."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


def _say(bars, message: str) -> None:
    """A progress note, shown only with the progress bars."""
    if not bars.disable:
        bars.console.print(message, markup=False, highlight=False, soft_wrap=True)


def _warn(bars, message: str) -> None:
    """A line the user must see even without progress bars (on stderr)."""
    if bars.disable:
        print(message, file=sys.stderr)
    else:
        bars.console.print(message, markup=False, highlight=False, soft_wrap=True)


def _report(bars, out: Path, manifest: dict) -> None:
    """Say once what was dropped or replaced; the manifest keeps the details."""
    stats = manifest["stats"]
    rows = stats["rows"]
    if rows["bad"]:
        shown = [r["row"] for r in rows["bad_rows"][:SHOWN_BAD_ROWS]]
        more = f" and {rows['bad'] - len(shown)} more" if rows["bad"] > len(shown) else ""
        _warn(bars, f"{out}: dropped {rows['bad']} bad .jsonl row(s) of {rows['read']} (data.on_bad_row: skip): "
                    f"{', '.join(shown)}{more}. Each with its problem: {out / 'manifest.json'}, stats.rows.bad_rows.")
    if stats["replaced_bytes"]:
        _warn(bars, f"{out}: replaced {stats['replaced_bytes']} byte(s) that were not UTF-8 with U+FFFD in "
                    f"{len(stats['replaced_bytes_by_file'])} file(s) (data.on_decode_error: replace); per file: "
                    f"manifest.json stats.replaced_bytes_by_file.")
