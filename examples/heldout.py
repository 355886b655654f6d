r"""Held-out text rows for `fledge eval`: the paragraphs of a prepared run's validation split.

    python -m examples.heldout runs/gutenberg-transformer runs/gutenberg-heldout.jsonl
    python -m fledge eval runs/gutenberg-recurrent --data runs/gutenberg-heldout.jsonl \
        --baseline runs/gutenberg-transformer --no-generate --allow-code

`fledge prepare` writes validation as token shards, and `fledge eval` scores rows of text. This
decodes the val shards of RUN/data (or any prepared folder) back into their documents (each is
BOS ids EOS in the shards) and writes one `{"text": paragraph}` per line, paragraphs being the
blocks between blank lines, so the rows are exactly the text validation measured, whatever
document the split sent there (for the two Gutenberg books, one whole book). Paragraphs shorter
than `min_chars` (chapter headings, stray lines) are left out.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

BLANK_LINE = re.compile(r"\r?\n[ \t]*\r?\n")


def heldout_paragraphs(prepared: str | Path, min_chars: int = 40) -> list[str]:
    """The paragraphs of the val split of a prepared folder (a run folder: its data/ folder)."""
    from fledge.prepare import load_manifest, shard_arrays
    from fledge.tokenizer import load_tokenizer
    prepared = Path(prepared)
    if (prepared / "data" / "manifest.json").is_file():
        prepared = prepared / "data"
    manifest = load_manifest(prepared)
    tokenizer = load_tokenizer(prepared / manifest["tokenizer"]["file"])
    bos, eos = manifest["tokenizer"]["bos_id"], manifest["tokenizer"]["eos_id"]
    paragraphs, document = [], []
    for shard in shard_arrays(prepared, "val", manifest):
        for token in shard.tolist() + [eos]:     # a final eos closes a document cut at the split's end
            if token in (bos, eos):
                text = tokenizer.decode(document)
                paragraphs += [p.strip() for p in BLANK_LINE.split(text) if len(p.strip()) >= min_chars]
                document = []
            else:
                document.append(token)
    return paragraphs


def write_heldout_rows(prepared: str | Path, out: str | Path, min_chars: int = 40) -> int:
    """Write the val paragraphs of `prepared` as JSONL text rows to `out`; returns how many."""
    paragraphs = heldout_paragraphs(prepared, min_chars)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in paragraphs),
                         encoding="utf-8")
    return len(paragraphs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prepared", help="a run folder (its data/) or a prepared data folder")
    parser.add_argument("out", help="JSONL file to write")
    parser.add_argument("--min-chars", type=int, default=40, help="leave out shorter paragraphs")
    args = parser.parse_args()
    n = write_heldout_rows(args.prepared, args.out, args.min_chars)
    print(f"wrote {n:,} held-out paragraphs to {args.out}")


if __name__ == "__main__":
    main()
