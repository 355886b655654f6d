"""Corpus -> tokenizer -> token shards with a manifest (`fledge prepare RECIPE`).

    manifest = prepare(load_recipe("recipes/shakespeare-char.yaml"))   # or load_manifest(dir)

Reads `data.sources` (files; folders, walked for .txt/.md/.jsonl; globs. A file named
explicitly or by a glob is plain text unless it ends in .jsonl) and writes into
`recipe.prepared_path`: tokenizer.json or tokenizer.model; tokenizer-provenance.json (what
it was trained on); train/ and val/shard-NNNNN.bin (raw little-endian uint16 token ids,
uint32 past 65,536 tokens, at most data.shard_tokens each); manifest.json; recipe.yaml.

A document (a whole .txt/.md file, or one .jsonl line) is written as [bos] + ids + [eos].
It goes to val when a hash of (data.split_seed, path, line) falls below data.val_fraction
("document-hash"; if none does, the one with the smallest hash goes). A corpus of ONE
document is cut instead: its last val_fraction of bytes, from a line end on, is val and
opens with its own bos ("contiguous-tail"; train's part has no eos).

Memory stays flat: files are read in 1 MB blocks and encoded with `encode_batch` in pieces
of ~64K characters, cut just before a newline followed by a non-space character. That is
always a GPT-2 pre-token boundary, so the ids equal those of encoding each document whole.

Re-running reuses what is still valid. Sources are read again only when their size or
mtime changed (per-file hashes and document counts are cached in source-scan.json). Shards: when the fingerprint (data and tokenizer
sections, resolved source files and their sha256) equals the manifest's and every shard is
there at its size. Tokenizer: it is retrained only when the tokenizer section or the exact
text it trains on changes; that text is a deterministic sample of at most
tokenizer.train_bytes spread evenly over the corpus (char: all of it, so no character is
unknown). Changing split or shard settings, or a source outside the sample, keeps it.
Shards are written under a temporary folder and renamed; the old manifest is deleted first
and the new one written last, so a crash never leaves a manifest over half-written shards.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import ctypes.util
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from fledge.errors import DataError, FledgeError
from fledge.tokenizer import Tokenizer, find_tokenizer_file, load_tokenizer, train_tokenizer

VERSION = 1
READ_BYTES = 1 << 20     # bytes read from a file at a time
PIECE_CHARS = 1 << 16    # characters per encoded piece (cut before a newline, see _SAFE_CUT)
BATCH_CHARS = 1 << 20    # characters per encode_batch call
FOLDER_SUFFIXES = (".txt", ".md", ".jsonl")
PROVENANCE = "tokenizer-provenance.json"
SCAN_CACHE = "source-scan.json"
TRIM_EVERY = 8 << 20     # bytes of text between returns of freed heap memory to the OS

# Cutting just before a newline that is followed by a non-space character never changes
# GPT-2 pre-tokens: whole or cut, any whitespace before it ends one token and "\n" is the next.
_SAFE_CUT = re.compile(r"(?=\n\S)")
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, after surrogateescape
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK[^\n]*\n", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK", re.M | re.I)


@dataclass
class SourceFile:
    path: Path   # where to read it
    name: str    # as found from the recipe's source entry (shown in messages and the manifest)
    jsonl: bool
    key: str = ""  # the document key of the split: the path below the source entry (a named file: its
                   # file name), so moving or re-rooting the corpus never changes the split


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
        sources, plan = _scan(files, recipe.data, bars, out)
        fingerprint = _fingerprint(recipe, sources)
        manifest = _reusable_manifest(out, fingerprint)
        if manifest is not None:
            _say(bars, f"{out}: inputs unchanged (fingerprint {fingerprint}); reused tokenizer and shards")
            return manifest
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").unlink(missing_ok=True)
        for stale in out.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        total = sum(s["bytes"] for s in sources)
        if plan.method == "contiguous-tail":  # a pass over the one document to find where val starts
            text_bytes = sum(len(p.text.encode()) for p in iter_pieces(files, recipe.data))
            plan.cut_bytes = int(text_bytes * (1 - plan.val_fraction))
        tok = _obtain_tokenizer(recipe, files, total, out, bars)
        manifest = _write_all(recipe, files, plan, tok, out, bars, sources, fingerprint)
        _say(bars, f"{out}: {manifest['splits']['train']['tokens']:,} train and "
                   f"{manifest['splits']['val']['tokens']:,} val tokens ({plan.method} split)")
        return manifest


def load_manifest(prepared_dir: str | Path) -> dict:
    """The manifest of a prepared folder; raises if it was never prepared or shards are gone."""
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        have = sorted(p.name for p in Path(prepared_dir).iterdir()) if Path(prepared_dir).is_dir() else []
        raise FledgeError(f"{prepared_dir}: not prepared (no manifest.json; found: "
                          f"{', '.join(have[:10]) or 'nothing'}). Run `fledge prepare RECIPE` first.")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("version") != VERSION:
        raise FledgeError(f"{path}: manifest version {manifest.get('version')}, this fledge reads {VERSION}. "
                          f"Rerun `fledge prepare RECIPE`.")
    missing = [s["file"] for split in manifest["splits"].values() for s in split["shards"]
               if not (Path(prepared_dir) / s["file"]).is_file()]
    if missing:
        raise FledgeError(f"{prepared_dir}: shard files missing: {', '.join(missing[:5])}. "
                          f"Rerun `fledge prepare RECIPE` to rebuild them.")
    return manifest


def shard_arrays(prepared_dir: str | Path, split: str, manifest: dict | None = None) -> list[np.ndarray]:
    """The shards of one split as read-only memory maps, in order."""
    manifest = manifest or load_manifest(prepared_dir)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    return [np.memmap(Path(prepared_dir) / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
            for s in manifest["splits"][split]["shards"] if s["tokens"]]


# --- sources ------------------------------------------------------------------------------

def resolve_sources(data) -> list[SourceFile]:
    """The files named by `data.sources`, in order, each once."""
    if not data.sources:
        raise DataError("data.sources is empty: list the text files, folders or globs to read, "
                        "e.g. data.sources: [corpus/].")
    files, seen = [], set()
    for entry in data.sources:
        for path, name, explicit in _expand(str(entry)):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            if explicit and path.suffix == ".json":
                raise DataError("a JSON file; prepare reads .txt, .md and .jsonl (one JSON object per line). "
                                "Convert it to .jsonl.", name)
            files.append(SourceFile(path, name, path.suffix == ".jsonl", _split_key(entry, path)))
    return files


def _expand(entry: str) -> list[tuple[Path, str, bool]]:
    """(path, name, named explicitly) for each file a source entry matches."""
    if glob.has_magic(entry):
        matches = sorted(glob.glob(entry, recursive=True))
        found = [(Path(m), Path(m).as_posix(), True) for m in matches if Path(m).is_file()]
        for m in matches:
            if Path(m).is_dir():
                found += _walk(Path(m))
        if not found:
            raise DataError(f"the glob matches no files. {_nearby(Path(entry).parent)} Fix data.sources.",
                            entry)
        return found
    path = Path(entry)
    if path.is_file():
        return [(path, path.as_posix(), True)]
    if path.is_dir():
        found = _walk(path)
        if not found:
            raise DataError(f"the folder holds no {', '.join(FOLDER_SUFFIXES)} files. {_nearby(path)} "
                            f"Name other files explicitly or with a glob (e.g. {entry.rstrip('/')}/*.limn).",
                            entry)
        return found
    raise DataError(f"no such file or folder. {_nearby(path.parent)} Fix data.sources.", entry)


def _split_key(entry: str, path: Path) -> str:
    """`path` relative to the fixed (non-glob) folder of its source entry; a file named directly: its name."""
    parts = Path(entry).parts
    fixed = Path(*parts[:next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))] or ".")
    if fixed == path or not fixed.is_dir():
        return path.name
    try:
        return path.relative_to(fixed).as_posix()
    except ValueError:
        return path.name


def _walk(folder: Path) -> list[tuple[Path, str, bool]]:
    return [(p, p.as_posix(), False) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in FOLDER_SUFFIXES]


def _nearby(folder: Path) -> str:
    """What the nearest existing folder holds, for error messages."""
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return ""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f" and {len(names) - 12} more" if len(names) > 12 else ""
    return f"{folder.as_posix() or '.'}/ holds: {', '.join(names[:12]) or 'nothing'}{more}."


def _scan(files: list[SourceFile], data, bars, out: Path) -> tuple[list[dict], SplitPlan]:
    """Hash every file and count its documents; choose the split method.

    Results per file are cached in `<prepared>/source-scan.json` under (path, size, mtime,
    split settings): a second `prepare` or `fledge train` over a 36 GB corpus does not read
    it all again just to find that nothing changed."""
    cache_path = out / SCAN_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    fresh: dict = {}
    sources, count, smallest, any_val = [], 0, (2.0, ""), False
    task = bars.add_task("hashing sources", total=sum(f.path.stat().st_size for f in files))
    for src in files:
        stat = src.path.stat()
        ident = json.dumps([str(src.path.resolve()), src.key, stat.st_size, stat.st_mtime_ns, data.split_seed,
                            data.val_fraction])
        entry = cache.get(ident) or _scan_file(src, stat.st_size, data)
        fresh[ident] = entry
        sources.append({"path": src.name, "bytes": stat.st_size, "sha256": entry["sha256"]})
        bars.advance(task, stat.st_size)
        count += entry["documents"]
        if entry["documents"]:
            smallest = min(smallest, tuple(entry["smallest"]))
        any_val = any_val or entry["any_val"]
    if count == 0:
        raise DataError(f"the corpus is empty: {len(files)} source file(s), all empty. Check data.sources.",
                        files[0].name if len(files) == 1 else None)
    if fresh != cache:
        out.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(cache_path.name + ".tmp")
        tmp.write_text(json.dumps(fresh), encoding="utf-8")
        tmp.replace(cache_path)
    plan = SplitPlan("contiguous-tail" if count == 1 else "document-hash", data.val_fraction, data.split_seed)
    if count > 1 and data.val_fraction > 0 and not any_val:
        plan.forced = smallest[1]
    return sources, plan


def _scan_file(src: SourceFile, size: int, data) -> dict:
    """sha256, document count, the smallest split hash and whether any document hashes into val."""
    count, smallest, any_val = 0, (2.0, ""), False
    for doc in _doc_keys(src, size):
        count, h = count + 1, _doc_hash(data.split_seed, doc)
        smallest, any_val = min(smallest, (h, doc)), any_val or h < data.val_fraction
    return {"sha256": _file_sha256(src.path), "documents": count, "smallest": list(smallest), "any_val": any_val}


def _doc_keys(src: SourceFile, size: int) -> Iterator[str]:
    """Split keys of the file's documents: its name, or name:line for each non-blank .jsonl line."""
    if not src.jsonl:
        yield from [src.key] if size else []
        return
    with open(src.path, "rb") as f:
        for number, line in enumerate(f, 1):
            if (line.removeprefix(codecs.BOM_UTF8) if number == 1 else line).strip():
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

def iter_pieces(files: list[SourceFile], data, replaced: collections.Counter | None = None) -> Iterator[Piece]:
    """Every document of the corpus as pieces of cleaned text, in order.

    `replaced` counts, per file, the bytes that were not UTF-8 (on_decode_error: replace).
    """
    replaced = collections.Counter() if replaced is None else replaced
    for src in files:
        yield from (_jsonl_pieces(src, data, replaced) if src.jsonl else _text_pieces(src, data, replaced))


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
                text, count = _ESCAPED.subn("\ufffd", text)
                replaced[src.name] += count
            if offset == 0:
                text = text.removeprefix("\ufeff")
            offset += len(block)
            if text:
                yield text
            if not block:
                return


def _bad_utf8(name: str, offset: int, byte: int, line: int | None = None) -> DataError:
    where = f" at byte offset {offset}" if line is not None else ""
    return DataError(f"byte 0x{byte:02x}{where} is not UTF-8. Convert the file to UTF-8 (e.g. "
                     f"iconv -f latin1 -t utf-8) or set data.on_decode_error: replace.", name, line=line,
                     offset=offset)


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


def _jsonl_pieces(src: SourceFile, data, replaced: collections.Counter) -> Iterator[Piece]:
    offset = 0
    with open(src.path, "rb") as f:
        for number, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[3:], start + 3
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if data.on_decode_error != "replace":
                    raise _bad_utf8(src.name, start + e.start, raw[e.start], line=number) from None
                line, count = _ESCAPED.subn("\ufffd", raw.decode("utf-8", "surrogateescape"))
                replaced[src.name] += count
            text = _record_text(line, src.name, number, data.text_field)
            if text:
                yield Piece(f"{src.key}:{number}", text, True, True)


def _record_text(line: str, name: str, number: int, field: str) -> str:
    try:
        record = json.loads(line.rstrip("\r\n"))  # so colno counts within this line
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg} at column {e.colno}). Fix or remove the line.",
                        name, line=number) from None
    if not isinstance(record, dict):
        raise DataError(f"a JSON {_json_type(record)}, not an object with a {field!r} field. Convert the "
                        f"file to one object per line.", name, line=number)
    if field not in record:
        raise DataError(f"{field!r} is missing; this record has {', '.join(map(repr, record)) or 'no fields'}. "
                        f"Set data.text_field to the field that holds the text, or fix the record.",
                        name, line=number)
    if not isinstance(record[field], str):
        raise DataError(f"{field!r} is a JSON {_json_type(record[field])}, not a string. Point "
                        f"data.text_field at a text field.", name, line=number)
    return record[field]


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


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
    for name in set(Tokenizer.file_names.values()) - {tok.file_name}:
        (out / name).unlink(missing_ok=True)  # a tokenizer of another kind from an earlier run
    record = {**record, "file": tok.file_name, "sha256": tok.sha256}
    tmp = out / (PROVENANCE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    tok.save(out)
    tmp.replace(out / PROVENANCE)


# --- shards and manifest ------------------------------------------------------------------

class ShardWriter:
    """Appends token ids to shard-00000.bin, shard-00001.bin, ... of at most `shard_tokens` each."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
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
        (self.root / self.split).mkdir(parents=True, exist_ok=True)
        self._file = open(self.root / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _write_all(recipe, files, plan: SplitPlan, tok: Tokenizer, out: Path, bars, sources: list[dict],
               fingerprint: str) -> dict:
    dtype = np.dtype("<u2") if tok.vocab_size <= 65536 else np.dtype("<u4")
    tmp = out / f".tmp-{os.getpid()}"
    writers = {s: ShardWriter(tmp, s, dtype, recipe.data.shard_tokens) for s in ("train", "val")}
    counts = {s: {"documents": 0, "bytes": 0} for s in writers}
    replaced: collections.Counter = collections.Counter()
    task = bars.add_task("encoding", total=sum(s["bytes"] for s in sources))
    for batch in _batches(assign_splits(iter_pieces(files, recipe.data, replaced), plan)):
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
    bars.update(task, completed=sum(s["bytes"] for s in sources))
    for writer in writers.values():
        writer.close()
    if not counts["train"]["bytes"] + counts["val"]["bytes"]:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError("the corpus is empty: no text left after removing BOMs and Gutenberg headers. "
                        "Check data.sources and data.strip_gutenberg.")
    manifest = _manifest(tok, writers, counts, replaced, plan, sources, fingerprint, dtype)
    _publish(tmp, out, manifest, recipe)
    return manifest


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


def _manifest(tok, writers, counts, replaced, plan, sources, fingerprint, dtype) -> dict:
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
        "stats": {"source_bytes": sum(s["bytes"] for s in sources), "text_bytes": text_bytes,
                  "documents": documents, "tokens": tokens,
                  "tokens_per_byte": round(tokens / max(text_bytes, 1), 4),
                  "replaced_bytes": sum(replaced.values()),
                  "replaced_bytes_by_file": {name: n for name, n in replaced.items() if n}},
    }


def _publish(tmp: Path, out: Path, manifest: dict, recipe) -> None:
    """Move the finished shards into place, then write the manifest last."""
    for split in ("train", "val"):
        shutil.rmtree(out / split, ignore_errors=True)
        if (tmp / split).is_dir():
            (tmp / split).rename(out / split)
    shutil.rmtree(tmp, ignore_errors=True)
    recipe.save(out / "recipe.yaml")
    path = out / "manifest.json"
    path.with_name("manifest.json.tmp").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    path.with_name("manifest.json.tmp").replace(path)


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
    if not bars.disable:
        bars.console.print(message)
