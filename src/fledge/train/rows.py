"""Fine-tuning rows as training batches: read, check, split, render with the chat template, cut, pack.

    batches = build_row_batches(recipe, tokenizer, template)   # DataError at file:line for a bad row
    print(batches.stats.format())                              # rows per source, lengths, packing
    batch = batches.train_batch(step, micro, rank, world)      # a pure function of train.seed and these
    for batch in batches.val_batches(rank, world): ...         # fixed: the same at every evaluation
    batches.val_records                                        # those rows as read: prompts and references

What happens to the rows, in order:

- Read: every `data.rows` source with its format (detected per row, or forced) and field map.
  A bad row (unreadable, fitting no format, a conversation the template refuses) stops with a
  DataError naming file:line; with `data.on_bad_row: skip` the bad rows are dropped and reported.
- Render: `templates.render(record.messages, ...)` gives the ids and the trained mask (every
  answer and its end-of-turn token or EOS). A text row (`{"text"}`, one assistant message and no
  prompt) is a plain completion without a template: BOS + text + EOS, every token trained, the way
  fledge pretrains documents.
- Split: `data.val_rows` when given; else `data.val_fraction` of the rows (at least one), drawn
  with `data.split_seed` by `fledge.data.split.assign_split`: rows with identical text, and rows
  sharing a `data.group_by` value, stay on one side. The split is made on rows before cutting or
  weighting, so changing max_length, weights or the tokenizer never moves a row across. Rows of a
  weight-0 source take part in the split too. Exact copies between train and validation (possible
  with `data.val_rows`) are reported as a warning with counts, never dropped silently.
- Length: rows longer than `finetune.max_length` (0: `train.block_size`) stop the run
  (`on_too_long: error`), are cut (`truncate`: prompt tokens removed from the left, after BOS,
  keeping the whole last answer and its end token; a row whose last answer alone is too long is
  an error even then), or are dropped (`drop`) and reported.
- Labels are shifted: `labels[t] = ids[t + 1]` where token t + 1 is trained (every token with
  `finetune.train_on_prompt`), -100 elsewhere and at each row's last position. On a cut row the
  step from BOS to the first kept token is not trained (that pair never occurs in real text).
- Weights: a source of weight w contributes its rows floor(w) times per epoch plus a seeded subset
  of frac(w) of them (stochastic rounding of the count), drawn anew every epoch.
- Epochs and order: each epoch draws its rows, shuffles them with (train.seed, epoch) and packs
  them (`finetune.packing`): best fit in that order, never splitting a row, into sequences of
  `train.block_size` tokens, which are shuffled again. Packing is redone per epoch because each
  epoch holds its own weighted subset, and rows meet new neighbours. Without packing a sequence is
  one row, right-padded to the longest row of its micro-batch. The sequences of epoch 0, 1, ...
  form one stream; sequence g = step * (batch_size * grad_accum * world) + (micro * world + rank)
  * batch_size + j, so N processes with batch b read what one process with batch N * b reads.
- Packed batches carry `position_ids` restarting at 0 for each row and `document_ids` (0, 1, ...
  per row of a sequence; -1 for padding, which is its own segment with positions from 0). Padding
  uses the tokenizer's pad id, never EOS, and is never a target. Unpacked batches pass neither:
  causal attention keeps real tokens from seeing the right padding after them.
- Validation: all validation rows, packed (or one per sequence) in a fixed order, sequence i on
  rank i % world; every rank gets the same number of batches (a rank with nothing left gets a
  padding-only batch without targets) so collective operations stay in step.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fledge.data.dedupe import DuplicateIndex, exact_keys, leakage_between
from fledge.data.records import FieldMap, Record, RowProblem, format_problem, scan_file
from fledge.data.sources import ROW_SUFFIXES, expand_sources
from fledge.errors import DataError, RecipeError, TemplateError, TokenizerError
from fledge.train.batches import IGNORE, Batch

LISTED = 10   # rows named in a message before "and N more"


def listing(items: Sequence[str], limit: int = LISTED) -> str:
    """'a, b, c' or 'a, ..., j and 12 more'."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit:,} more" if len(items) > limit else "")


# --- rows ----------------------------------------------------------------------------------------

@dataclass
class Row:
    """One rendered row: its ids and shifted labels (-100: no target), its source and place."""

    ids: np.ndarray        # (n,) int64
    labels: np.ndarray     # (n,) int64: the next token where it is trained, else IGNORE
    source: int            # index of its data.rows (or data.val_rows) entry
    location: str          # file:line

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass
class _Rendered:
    """A row before cutting: ids, the template's trained mask, where its last answer starts."""

    ids: list[int]
    trained: list[bool]
    record: Record
    source: int

    @property
    def last_answer(self) -> int:
        end = max(i for i, t in enumerate(self.trained) if t)
        start = end
        while start > 0 and self.trained[start - 1]:
            start -= 1
        return start


def shifted_labels(ids: Sequence[int], trained: Sequence[bool], every_token: bool = False) -> np.ndarray:
    """labels[t] = ids[t + 1] where token t + 1 is trained (or always, `every_token`); IGNORE elsewhere."""
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    if len(ids) > 1:
        nxt = ids[1:]
        labels[:-1] = nxt if every_token else np.where(np.asarray(trained[1:], dtype=bool), nxt, IGNORE)
    return labels


class _Renderer:
    """Rows to ids and trained masks with one template and system prompt."""

    def __init__(self, tokenizer, template, system: str | None):
        from fledge.templates import get_template
        self.tokenizer, self.system = tokenizer, system
        self.template = get_template(template, tokenizer)
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id

    def check_template(self) -> None:
        """Template-level failures (missing tokens, no generation blocks) before any row, without a place."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        self._render(probe)

    def __call__(self, record: Record) -> tuple[list[int], list[bool]]:
        if record.is_completion:
            return self._completion(record.response)
        return self._render(record.messages)

    def _render(self, messages) -> tuple[list[int], list[bool]]:
        from fledge.templates import render
        out = render(messages, self.tokenizer, self.template, system=self.system)
        return out.input_ids, out.trained

    def _completion(self, text: str) -> tuple[list[int], list[bool]]:
        from fledge.templates import _refuse_control_text
        if self.eos is None:
            raise DataError("a text row is trained as BOS + text + EOS, and this tokenizer has no EOS; give the "
                            "tokenizer an eos_token or write the rows as pairs or chats")
        _refuse_control_text([{"role": "text", "content": text}], self.tokenizer, self.template)
        head = [self.bos] if self.bos is not None else []
        ids = head + list(self.tokenizer.encode(text, add_special_tokens=False)) + [self.eos]
        return ids, [False] * len(head) + [True] * (len(ids) - len(head))


# --- reading -------------------------------------------------------------------------------------

@dataclass
class SourceStats:
    """What became of one data.rows (or data.val_rows) entry's rows."""

    path: str
    weight: float
    rows: int = 0        # good rows read
    skipped: int = 0     # bad rows dropped (data.on_bad_row: skip)
    train: int = 0
    val: int = 0
    cut: int = 0
    dropped: int = 0     # longer than max_length (on_too_long: drop)


def _read(key: str, sources: list, render: _Renderer, stats: list[SourceStats],
          problems: list[RowProblem]) -> list[_Rendered]:
    """Every row of every source rendered; bad rows appended to `problems`."""
    out: list[_Rendered] = []
    for i, src in enumerate(sources):
        fields = FieldMap(src.input_field, src.output_field)
        problem = format_problem(src.format, fields)
        if problem:
            raise RecipeError(f"{key}[{i}] ({src.path}): {problem}. Set format: auto, io or prompt_completion, or "
                              f"remove input_field and output_field.")
        stats.append(SourceStats(src.path, src.weight))
        for path in expand_sources([src.path], ROW_SUFFIXES):
            for item in scan_file(path, fields, fmt=src.format):
                if isinstance(item, RowProblem):
                    problems.append(item)
                    stats[-1].skipped += 1
                    continue
                try:
                    ids, trained = render(item)
                except (DataError, TemplateError) as e:
                    problems.append(RowProblem(item.source, item.line, str(e).rstrip(".")))
                    stats[-1].skipped += 1
                    continue
                out.append(_Rendered(ids, trained, item, i))
                stats[-1].rows += 1
    return out


def _bad_rows(problems: list[RowProblem], on_bad_row: str, say: Callable) -> None:
    if not problems:
        return
    if on_bad_row == "skip":
        say(f"skipped {len(problems):,} bad row{'s' if len(problems) != 1 else ''} (data.on_bad_row: skip): "
            + listing([f"{p.location} ({_short(p.message)})" for p in problems]))
        return
    first, rest = problems[0], problems[1:]
    more = (f". {len(rest):,} more bad row{'s' if len(rest) != 1 else ''}: "
            + listing([f"{p.location} ({_short(p.message)})" for p in rest], LISTED - 1)) if rest else ""
    raise first.error(f"{more}. Fix the rows, or set data.on_bad_row: skip (--skip-invalid) to drop bad rows and "
                      f"have them listed.")


def _short(message: str, limit: int = 80) -> str:
    return message if len(message) <= limit else message[:limit - 3] + "..."


# --- splitting -----------------------------------------------------------------------------------

def _group_key(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def split_rows(records: list[Record], val_fraction: float, seed: int, group_by: str = "",
               say: Callable = print) -> np.ndarray:
    """is_val per record: val_fraction of them (at least one), copies and groups kept on one side."""
    from fledge.data.split import assign_split
    n = len(records)
    if n < 2:
        raise DataError(f"{n} row{'s' if n != 1 else ''} in data.rows: holding one out for validation leaves nothing "
                        f"to train on. Add rows, give data.val_rows, or set data.val_fraction: 0 to train without "
                        f"validation.")
    _, copies = np.unique(exact_keys([r.text for r in records]), return_inverse=True)
    links = [copies.reshape(-1)]
    if group_by:
        values = [_group_key(r.get(group_by)) for r in records]
        ids = {v: k for k, v in enumerate(dict.fromkeys(v for v in values if v is not None))}
        links.append(np.array([ids[v] if v is not None else -1 for v in values], dtype=np.int64))
        missing = sum(v is None for v in values)
        if missing:
            say(f"warning: {missing:,} of {n:,} rows have no {group_by!r} value (data.group_by); each is its own group")
    want = min(n - 1, max(1, round(n * val_fraction)))
    is_val, units = assign_split(n, (n - want) / n, seed, links)
    got = int(is_val.sum())
    if got == 0:
        what = f"data.group_by {group_by!r} and identical rows" if group_by else "identical rows"
        raise DataError(f"no row could be held out for validation: {what} form {units:,} units that stay on one side, "
                        f"none as small as the {want:,} validation rows asked (data.val_fraction {val_fraction} of "
                        f"{n:,}). Raise data.val_fraction, group more finely, or give data.val_rows.")
    if abs(got - want) > max(1, 0.02 * n):
        say(f"warning: validation holds {got:,} rows where {want:,} were asked; groups and identical rows are kept "
            f"whole, so units this large cannot split finer")
    return is_val


def _leakage(train: list[_Rendered], val: list[_Rendered]) -> int:
    """Validation rows whose text is also a training row's."""
    if not train or not val:
        return 0
    index = DuplicateIndex()
    index.add([r.record.text for r in train] + [r.record.text for r in val])
    exact, _ = leakage_between(index, np.arange(len(train)), len(train) + np.arange(len(val)))
    return exact


# --- length --------------------------------------------------------------------------------------

def _fit(rows: list[_Rendered], max_length: int, policy: str, bos: int | None, every_token: bool,
         stats: list[SourceStats], limit_hint: str, report: "RowStats", say: Callable) -> list[Row]:
    """Rows within max_length (cut or dropped as `policy` says), with their shifted labels; the
    places of cut and dropped rows are added to `report`."""
    out: list[Row] = []
    too_long: list[str] = []
    uncuttable: list[str] = []
    dropped: list[str] = []
    longest = 0
    for r in rows:
        n = len(r.ids)
        ids, trained, cut = r.ids, r.trained, False
        if n > max_length:
            longest = max(longest, n)
            where = f"{r.record.location} ({n:,} tokens)"
            if policy == "error":
                too_long.append(where)
                continue
            if policy == "drop":
                dropped.append(where)
                stats[r.source].dropped += 1
                continue
            keep_bos = bos is not None and ids[0] == bos
            first = n - max_length + keep_bos      # first kept index after BOS
            if first > r.last_answer:
                uncuttable.append(f"{r.record.location} (last answer {n - r.last_answer:,} tokens)")
                continue
            ids = ids[:1] + ids[first:] if keep_bos else ids[first:]
            trained = trained[:1] + trained[first:] if keep_bos else trained[first:]
            cut = True
            stats[r.source].cut += 1
            report.cut.append(r.record.location)
        labels = shifted_labels(ids, trained, every_token)
        if cut and ids[0] == bos:
            labels[0] = IGNORE
        out.append(Row(np.asarray(ids, dtype=np.int64), labels, r.source, r.record.location))
    if too_long:
        raise DataError(f"{len(too_long):,} row{'s are' if len(too_long) != 1 else ' is'} longer than {max_length:,} "
                        f"tokens ({limit_hint}): {listing(too_long)}. Raise finetune.max_length to at least "
                        f"{longest:,} (packed rows must also fit train.block_size), or set finetune.on_too_long: "
                        f"truncate (cut prompts from the left) or drop.")
    if uncuttable:
        raise DataError(f"{len(uncuttable):,} row{'s' if len(uncuttable) != 1 else ''} cannot be cut to {max_length:,} "
                        f"tokens ({limit_hint}) because the last answer and its end token alone are longer: "
                        f"{listing(uncuttable)}. Raise finetune.max_length, or set finetune.on_too_long: drop.")
    report.dropped.extend(dropped)
    if dropped:
        say(f"dropped {len(dropped):,} row{'s' if len(dropped) != 1 else ''} longer than {max_length:,} tokens "
            f"({limit_hint}; finetune.on_too_long: drop): {listing(dropped)}")
    return out


# --- packing -------------------------------------------------------------------------------------

def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity` tokens: best fit in the given
    order (each row goes to the open bin with the least room that holds it, else a new bin), never
    splitting a row. Bins are in the order they were opened."""
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []     # sorted (free tokens, bin) of bins with space left
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"a row of {n} tokens cannot fit a bin of {capacity}")
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, b = room.pop(at)
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, b))
    return bins


@dataclass
class Layout:
    """How sequences are shaped and drawn."""

    block_size: int
    batch_size: int
    grad_accum: int
    packing: bool
    pad_id: int
    seed: int


class RowBatches:
    """Training and validation batches of rendered rows; implements `fledge.train.batches.BatchSource`."""

    def __init__(self, train: list[Row], val: list[Row], weights: Sequence[float], layout: Layout, stats: "RowStats"):
        self.train_rows, self.val_rows, self.layout, self.stats = train, val, layout, stats
        self.val_records: list[Record] = []      # the validation rows as read (prompts, references), for eval.every
        self.weights = list(weights)
        self.n_train_rows = len(train)
        self._lengths = np.array([len(r) for r in train], dtype=np.int64)
        by_source = np.array([r.source for r in train], dtype=np.int64)
        self._by_source = [np.flatnonzero(by_source == s) for s in range(len(self.weights))]
        self._sizes: list[int] = []                  # sequences in epoch 0, 1, ...
        self._starts: list[int] = []                 # first global sequence index of each epoch
        self._cache: dict[int, list[list[int]]] = {}
        self._val = self._sequences(list(range(len(val))), [len(r) for r in val])
        epoch0 = self._epoch(0)
        tokens = int(sum(self._lengths[i] for seq in epoch0 for i in seq))
        self._tokens_per_sequence = tokens / max(1, len(epoch0))
        stats.sequences = len(epoch0)
        stats.rows_per_epoch = sum(len(seq) for seq in epoch0)
        if layout.packing:
            stats.efficiency = tokens / max(1, len(epoch0) * layout.block_size)
        else:   # padded to the longest row of each micro-batch of epoch 0
            b = layout.batch_size
            widths = [max(self._lengths[seq[0]] for seq in epoch0[k:k + b]) * len(epoch0[k:k + b])
                      for k in range(0, len(epoch0), b)]
            stats.efficiency = tokens / max(1, sum(widths))

    # --- epochs ---

    def _draw(self, epoch: int) -> list[int]:
        """Row indices of one epoch (weights applied), shuffled."""
        rng = np.random.default_rng([self.layout.seed, epoch, 1])
        picks = []
        for weight, rows in zip(self.weights, self._by_source):
            whole, frac = int(weight), weight - int(weight)
            picks.extend([rows] * whole)
            exact = frac * len(rows)
            k = int(exact) + int(rng.random() < exact - int(exact))
            if k:
                picks.append(np.sort(rng.choice(rows, size=k, replace=False)))
        drawn = np.concatenate(picks) if picks else np.empty(0, dtype=np.int64)
        rng.shuffle(drawn)
        return drawn.tolist()

    def _sequences(self, rows: list[int], lengths: Sequence[int], rng: np.random.Generator | None = None
                   ) -> list[list[int]]:
        if not self.layout.packing:
            return [[r] for r in rows]
        bins = [[rows[i] for i in b] for b in pack_rows(lengths, self.layout.block_size)]
        if rng is not None:
            bins = [bins[i] for i in rng.permutation(len(bins))]
        return bins

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            rows = self._draw(epoch)
            rng = np.random.default_rng([self.layout.seed, epoch, 2])
            seqs = self._sequences(rows, self._lengths[rows].tolist(), rng)
            if len(self._cache) >= 3:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = seqs
        return self._cache[epoch]

    def _locate(self, g: int) -> tuple[int, int]:
        """(epoch, index in it) of global sequence g."""
        while not self._starts or g >= self._starts[-1] + self._sizes[-1]:
            e = len(self._sizes)
            self._starts.append(self._starts[-1] + self._sizes[-1] if e else 0)
            self._sizes.append(len(self._epoch(e)))
        e = bisect.bisect_right(self._starts, g) - 1   # the last epoch starting at or before g: never empty
        return e, g - self._starts[e]

    # --- batches ---

    def _batch(self, rows: list[Row], sequences: list[list[int]]) -> Batch:
        L = self.layout
        width = L.block_size if L.packing else max(sum(len(rows[i]) for i in s) for s in sequences)
        B = len(sequences)
        ids = np.full((B, width), L.pad_id, dtype=np.int64)
        labels = np.full((B, width), IGNORE, dtype=np.int64)
        positions = np.zeros((B, width), dtype=np.int64)
        documents = np.full((B, width), -1, dtype=np.int64)
        for b, seq in enumerate(sequences):
            at = 0
            for d, i in enumerate(seq):
                row = rows[i]
                n = len(row)
                ids[b, at:at + n] = row.ids
                labels[b, at:at + n] = row.labels
                positions[b, at:at + n] = np.arange(n)
                documents[b, at:at + n] = d
                at += n
            positions[b, at:] = np.arange(width - at)   # padding: a segment of its own
        batch = Batch(torch.from_numpy(ids), torch.from_numpy(labels))
        if L.packing:
            batch.position_ids, batch.document_ids = torch.from_numpy(positions), torch.from_numpy(documents)
        return batch

    def train_batch(self, step: int, micro: int, rank: int, world: int) -> Batch:
        L = self.layout
        first = step * (L.batch_size * L.grad_accum * world) + (micro * world + rank) * L.batch_size
        sequences = []
        for g in range(first, first + L.batch_size):
            epoch, k = self._locate(g)
            sequences.append(self._epoch(epoch)[k])
        return self._batch(self.train_rows, sequences)

    def val_batches(self, rank: int, world: int) -> list[Batch]:
        if not self._val:
            return []
        b = self.layout.batch_size
        mine = self._val[rank::world]
        count = math.ceil(math.ceil(len(self._val) / world) / b)   # the same on every rank
        out = []
        for k in range(count):
            part = mine[k * b:(k + 1) * b]
            out.append(self._batch(self.val_rows, part) if part else self._empty_batch())
        return out

    def _empty_batch(self) -> Batch:
        width = self.layout.block_size if self.layout.packing else 1
        batch = Batch(torch.full((1, width), self.layout.pad_id, dtype=torch.long),
                      torch.full((1, width), IGNORE, dtype=torch.long))
        if self.layout.packing:
            batch.position_ids = torch.arange(width)[None]
            batch.document_ids = torch.full((1, width), -1, dtype=torch.long)
        return batch

    def tokens_per_step(self, world: int) -> int:
        """Real (not padding) tokens one step reads: the mean per sequence of epoch 0 times the sequences."""
        L = self.layout
        return round(self._tokens_per_sequence * L.batch_size * L.grad_accum * world)

    def steps_per_epoch(self, world: int, batch_size: int, grad_accum: int) -> int:
        """Steps that read epoch 0's sequences once (later epochs differ by a few sequences at most)."""
        return max(1, math.ceil(self.stats.sequences / (batch_size * grad_accum * world)))

    def describe(self) -> str:
        s, L = self.stats, self.layout
        shape = (f"packed into {s.sequences:,} sequences of {L.block_size:,} tokens per epoch, {s.efficiency:.0%} "
                 f"filled" if L.packing else f"one per sequence ({s.sequences:,} per epoch), padded to the longest "
                 f"of each micro-batch, {s.efficiency:.0%} real tokens")
        val = f"{s.val_rows:,} validation rows" if s.val_rows else "no validation rows"
        return f"rows: {s.train_rows:,} training rows ({s.rows_per_epoch:,} per epoch with weights) {shape}; {val}"


# --- statistics ----------------------------------------------------------------------------------

@dataclass
class RowStats:
    """What the caller prints before training: see `format`."""

    sources: list[SourceStats]
    val_sources: list[SourceStats]
    train_rows: int = 0
    val_rows: int = 0
    tokens_min: int = 0
    tokens_median: int = 0
    tokens_max: int = 0
    trained_share: float = 0.0     # targets / tokens of the training rows
    skipped: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    leaked: int = 0
    packing: bool = True
    block_size: int = 0
    max_length: int = 0
    sequences: int = 0             # in epoch 0
    rows_per_epoch: int = 0        # rows drawn in epoch 0 (weights applied)
    efficiency: float = 0.0        # real tokens / token slots in epoch 0

    def format(self) -> str:
        lines = [f"{'rows':<40} {'read':>7} {'bad':>5} {'train':>7} {'val':>6} {'cut':>5} {'dropped':>7} "
                 f"{'weight':>6}"]
        for kind, group in (("", self.sources), ("val: ", self.val_sources)):
            for s in group:
                name = kind + s.path
                name = name if len(name) <= 40 else "..." + name[-37:]
                weight = f"{s.weight:g}" if not kind else "-"
                lines.append(f"{name:<40} {s.rows + s.skipped:>7,} {s.skipped:>5,} {s.train:>7,} {s.val:>6,} "
                             f"{s.cut:>5,} {s.dropped:>7,} {weight:>6}")
        lines.append(f"tokens per training row: min {self.tokens_min:,}, median {self.tokens_median:,}, max "
                     f"{self.tokens_max:,} (limit {self.max_length:,}); {self.trained_share:.1%} of tokens are trained")
        if self.packing:
            lines.append(f"packing: {self.rows_per_epoch:,} rows per epoch in {self.sequences:,} sequences of "
                         f"{self.block_size:,} tokens, {self.efficiency:.1%} filled")
        else:
            lines.append(f"no packing: {self.rows_per_epoch:,} rows per epoch, one per sequence, "
                         f"{self.efficiency:.1%} of batch tokens are real (the rest is padding)")
        for what, items in (("bad rows skipped", self.skipped), ("rows cut", self.cut), ("rows dropped", self.dropped)):
            if items:
                lines.append(f"{what}: {len(items):,} ({listing(items)})")
        if self.leaked:
            lines.append(f"warning: {self.leaked:,} validation rows are exact copies of training rows")
        return "\n".join(lines)


# --- building --------------------------------------------------------------------------------------

def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None or pad == tokenizer.eos_token_id:
        raise TokenizerError(f"the tokenizer's pad token is {tokenizer.pad_token!r} (EOS is {tokenizer.eos_token!r}); "
                             f"padding needs its own id, never EOS. Call fledge.templates.set_pad_token(tokenizer) "
                             f"(and resize the embeddings if it adds a token).")
    return int(pad)


def build_row_batches(recipe, tokenizer, template, *, say: Callable[[str], Any] = print) -> RowBatches:
    """Every data.rows row read, checked, split, rendered, cut and ready to draw (see the module docstring).

    `tokenizer`: a transformers fast tokenizer (fledge's via `templates.hf_tokenizer`) with a pad
    token that is not EOS; `template`: a Template or a name for `templates.get_template`. Raises
    DataError for bad rows (unless skipped), rows too long, or nothing to train on; RecipeError for
    settings that contradict each other; TemplateError when the template cannot render at all.
    """
    data, ft, train = recipe.data, recipe.finetune, recipe.train
    if not data.rows:
        raise RecipeError("data.rows is empty: fine-tuning reads rows (instruction, chat, pairs). Name the files "
                          "under data.rows.")
    max_length = ft.max_length or train.block_size
    limit_hint = "finetune.max_length" if ft.max_length else "train.block_size; finetune.max_length is 0"
    if ft.packing and max_length > train.block_size:
        raise RecipeError(f"finetune.max_length ({max_length:,}) exceeds train.block_size ({train.block_size:,}) with "
                          f"finetune.packing: a packed sequence holds whole rows. Raise train.block_size to at least "
                          f"{max_length:,} or lower finetune.max_length.")
    layout = Layout(train.block_size, train.batch_size, train.grad_accum, ft.packing, _pad_id(tokenizer), train.seed)
    render = _Renderer(tokenizer, template, recipe.template.system or None)
    render.check_template()

    problems: list[RowProblem] = []
    sources: list[SourceStats] = []
    val_sources: list[SourceStats] = []
    pool = _read("data.rows", data.rows, render, sources, problems)
    held = _read("data.val_rows", data.val_rows, render, val_sources, problems)
    _bad_rows(problems, data.on_bad_row, say)

    if data.val_rows:
        train_part, val_part = pool, held
        unused = sorted({"data.group_by", "data.val_fraction"} & set(recipe.given))
        if unused:
            say(f"note: data.val_rows holds the validation rows, so {' and '.join(unused)} "
                f"{'do' if len(unused) > 1 else 'does'} not apply")
    elif data.val_fraction > 0:
        is_val = split_rows([r.record for r in pool], data.val_fraction, data.split_seed, data.group_by, say)
        train_part = [r for r, v in zip(pool, is_val) if not v]
        val_part = [r for r, v in zip(pool, is_val) if v]
    else:
        train_part, val_part = pool, []
        say("no validation rows: data.val_fraction is 0 and data.val_rows is empty")
    leaked = _leakage(train_part, val_part)
    if leaked:
        say(f"warning: {leaked:,} of {len(val_part):,} validation rows are exact copies of training rows, so "
            f"validation loss will look better than the model is. Remove them from data.val_rows (fledge data split "
            f"keeps copies on one side).")

    every = ft.train_on_prompt
    bos = tokenizer.bos_token_id
    stats = RowStats(sources, val_sources, leaked=leaked, packing=ft.packing, block_size=train.block_size,
                     max_length=max_length, skipped=[p.location for p in problems])
    train_rows = _fit(train_part, max_length, ft.on_too_long, bos, every, sources, limit_hint, stats, say)
    val_stats = val_sources if data.val_rows else sources
    val_rows = _fit(val_part, max_length, ft.on_too_long, bos, every, val_stats, limit_hint, stats, say)
    if val_part and not val_rows:
        say("warning: every validation row was dropped as too long; training runs without validation")
    for r in train_rows:
        sources[r.source].train += 1
    for r in val_rows:
        val_stats[r.source].val += 1

    weights = [src.weight for src in data.rows]
    if sum(r.n_targets for r in train_rows if weights[r.source] > 0) == 0:
        raise DataError(f"no trainable tokens: {len(train_rows):,} training rows remain of {len(pool):,} read"
                        + (", all from sources of weight 0" if train_rows else "")
                        + ". Add rows, give the sources weights above 0, or see what was dropped above.")
    per_epoch = sum(weights[r.source] for r in train_rows)
    if per_epoch < 1:
        raise DataError(f"data.rows weights draw {per_epoch:.2f} rows per epoch; raise them so an epoch holds at "
                        f"least one row.")
    lengths = np.array([len(r) for r in train_rows])
    stats.train_rows, stats.val_rows = len(train_rows), len(val_rows)
    stats.tokens_min, stats.tokens_max = int(lengths.min()), int(lengths.max())
    stats.tokens_median = int(np.median(lengths))
    stats.trained_share = sum(r.n_targets for r in train_rows) / max(1, int(lengths.sum()))
    source = RowBatches(train_rows, val_rows, weights, layout, stats)
    kept = {r.location for r in val_rows}
    source.val_records = [r.record for r in val_part if r.record.location in kept]
    return source
