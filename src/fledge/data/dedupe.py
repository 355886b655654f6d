"""Exact and near-duplicate detection that scales to millions of short rows.

    index = DuplicateIndex(NearOptions(threshold=0.85))
    for batch in batches_of_texts:
        index.add(batch)
    found = index.find()          # found.exact_of[i]: first identical row, or -1
                                  # found.near_of[i]: the row it nearly repeats, or -1

Exact: rows whose text is identical (a 64-bit key per row; the first occurrence wins).
Near: MinHash over character n-grams of the lowercased, whitespace-collapsed text, with LSH
banding, so the work grows with the number of rows, not its square. Candidate pairs that
share a band are verified by their estimated Jaccard similarity and joined into clusters; the
first row of a cluster is kept. Per row the index holds an 8-byte key and `num_perm` 16-bit
MinHash values (the low bits of each 32-bit value: "b-bit MinHash"), 136 bytes at the default
64 permutations, whatever the number of files.

The threshold is soft: pairs are judged on the 64-permutation estimate (standard error about
0.045 at 0.85), so pairs within a few hundredths of it go either way. On bench data
(bench/data_bench.py rows, threshold 0.85) 93% of pairs with true Jaccard >= 0.9 and all with
>= 0.95 were found; raise num_perm for a sharper edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fledge.recipe import option

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


@dataclass
class NearOptions:
    """How near duplicates are found."""

    threshold: float = option(0.85, "Jaccard similarity of character n-grams at which two rows are near "
                                    "duplicates", min=0.0, max=1.0)
    ngram: int = option(5, "characters per shingle; texts shorter than this are one shingle", min=1)
    num_perm: int = option(64, "MinHash permutations (more: more exact, slower, bigger)", min=8, max=1024)
    seed: int = option(1, "seed of the MinHash permutations")


def exact_keys(texts: list[str]) -> np.ndarray:
    """64-bit keys of texts: Python's string hash (SipHash, salted per process), so equal texts
    get equal keys within one run, which is all a check needs; two different texts share a key
    with probability about n^2 / 2^65 (3e-8 for a million rows)."""
    return np.fromiter(map(hash, texts), dtype=np.int64, count=len(texts))


def normalize_for_near(text: str) -> str:
    """Lowercase, whitespace runs as one space. The unit separator that joins a row's prompt and
    response is whitespace too, so one text cut at another place is a near duplicate (similarity 1):
    a model that trained on one of them has seen the other."""
    return " ".join(text.lower().split())


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def _shingles(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every character n-gram of every text, and where each text's run starts."""
    padded = [t if len(t) >= n else t + "\x01" * (n - len(t)) for t in texts]
    lengths = np.fromiter(map(len, padded), dtype=np.int64, count=len(padded))
    codes = np.frombuffer("\x00".join(padded).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    codes = codes.astype(np.uint64)
    starts = np.concatenate(([0], np.cumsum(lengths + 1)[:-1]))  # text i starts at starts[i]
    total = len(codes) - n + 1
    h = np.zeros(total, dtype=np.uint64)
    for k in range(n):  # a polynomial rolling combination, then a 64-bit mix (splitmix64's finalizer)
        h = h * np.uint64(0x100000001B3) + codes[k:k + total]
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    grams_per_text = lengths - n + 1
    # keep the n-grams that lie inside one text: positions starts[i] .. starts[i] + grams[i] - 1
    owner_starts = np.repeat(starts, grams_per_text)
    offsets = np.arange(grams_per_text.sum()) - np.repeat(np.cumsum(grams_per_text) - grams_per_text,
                                                          grams_per_text)
    positions = owner_starts + offsets
    run_starts = np.concatenate(([0], np.cumsum(grams_per_text)[:-1]))
    return h[positions] & _MASK32, run_starts


def minhash(texts: list[str], options: NearOptions) -> np.ndarray:
    """(len(texts), num_perm) uint16: b-bit MinHash signatures of the normalized texts."""
    out = np.empty((len(texts), options.num_perm), dtype=np.uint16)
    if not texts:
        return out
    a, b = _permutations(options.num_perm, options.seed)
    grams, starts = _shingles([normalize_for_near(t) for t in texts], options.ngram)
    for j in range(options.num_perm):
        # multiply-shift hashing of 32-bit keys: ((a x + b) mod 2^64) >> 32 is 2-universal
        values = (a[j] * grams + b[j]) >> _SHIFT32
        out[:, j] = np.minimum.reduceat(values, starts)
    return out


def lsh_bands(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows per band): the longest bands that still make a pair at exactly `threshold` a
    candidate with probability >= `recall` (1 - (1 - t^rows)^bands).

    Recall is chosen over precision because a candidate costs one signature comparison, while a
    pair that is never a candidate is a duplicate silently missed.
    """
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


class Signatures:
    """MinHash signatures kept in the blocks they were computed in, so growing never copies."""

    def __init__(self, width: int, blocks: list[np.ndarray] | None = None):
        self.width = width
        self.blocks: list[np.ndarray] = []
        self.offsets = [0]
        for block in blocks or []:
            self.append(block)

    def append(self, block: np.ndarray) -> None:
        self.blocks.append(block)
        self.offsets.append(self.offsets[-1] + len(block))

    def __len__(self) -> int:
        return self.offsets[-1]

    def columns(self, lo: int, hi: int) -> np.ndarray:
        """(n, hi - lo): columns lo..hi-1 of every row."""
        if not self.blocks:
            return np.empty((0, hi - lo), dtype=np.uint16)
        return np.concatenate([b[:, lo:hi] for b in self.blocks])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), width): the signatures of the given rows."""
        out = np.empty((len(rows), self.width), dtype=np.uint16)
        if not len(rows):
            return out
        block_of = np.searchsorted(np.asarray(self.offsets), rows, side="right") - 1
        order = np.argsort(block_of, kind="stable")
        cuts = np.flatnonzero(np.diff(block_of[order])) + 1
        for part in np.split(order, cuts):
            k = block_of[part[0]]
            out[part] = self.blocks[k][rows[part] - self.offsets[k]]
        return out


def candidate_pairs(signatures: Signatures, bands: int, rows_per_band: int, rows: np.ndarray,
                    sides: np.ndarray | None = None, seed: int = 1) -> np.ndarray:
    """(M, 2) pairs of row numbers, among `rows`, that agree on at least one band.

    Within a bucket each row is paired with the bucket's first row (a star, not every pair), so
    a bucket of size k costs k, not k^2. With `sides` (0/1 for each of `rows`), only pairs across
    sides are returned as (side-0 row, side-1 row), each side-1 row paired with the first side-0
    row of its bucket. Otherwise pairs are (earlier row, later row).
    """
    n = len(rows)
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    weights = np.random.default_rng(seed + 7919).integers(1, 2**63, size=rows_per_band, dtype=np.uint64) | np.uint64(1)
    position = np.arange(n)
    width = int(rows.max()) + 1
    found = []
    for band in range(bands):
        cols = signatures.columns(band * rows_per_band, (band + 1) * rows_per_band)[rows]
        keys = np.zeros(n, dtype=np.uint64)
        for c in range(rows_per_band):  # one column at a time keeps the temporaries at n words
            keys += cols[:, c].astype(np.uint64) * weights[c]
        del cols
        order = np.lexsort((sides, keys)) if sides is not None else np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        new_bucket = np.empty(n, dtype=bool)
        new_bucket[0] = True
        new_bucket[1:] = sorted_keys[1:] != sorted_keys[:-1]
        first = order[np.maximum.accumulate(np.where(new_bucket, position, 0))]
        member = ~new_bucket
        if sides is not None:
            member &= (sides[order] == 1) & (sides[first] == 0)
        a, b = rows[first[member]], rows[order[member]]
        if sides is None:
            a, b = np.minimum(a, b), np.maximum(a, b)
        found.append(a * width + b)  # one int64 per pair: unique() on 1-D is far cheaper than on rows
    codes = np.unique(np.concatenate(found))
    return np.stack([codes // width, codes % width], axis=1)


def similar_pairs(signatures: Signatures, pairs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The pairs whose estimated Jaccard similarity reaches `threshold`, and those estimates."""
    keep, sims = [], []
    for s in range(0, len(pairs), 200_000):
        chunk = pairs[s:s + 200_000]
        est = (signatures.take(chunk[:, 0]) == signatures.take(chunk[:, 1])).mean(axis=1)
        ok = est >= threshold - 1e-9
        keep.append(chunk[ok])
        sims.append(est[ok])
    if not keep:
        return np.empty((0, 2), dtype=np.int64), np.empty(0)
    return np.concatenate(keep), np.concatenate(sims)


def cross_pairs(signatures: Signatures, left: np.ndarray, right: np.ndarray,
                near: NearOptions) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (left row, right row) of near duplicates across two sets of rows, and their estimates."""
    if not len(left) or not len(right):
        return np.empty((0, 2), dtype=np.int64), np.empty(0)
    rows = np.concatenate([left, right])
    sides = np.concatenate([np.zeros(len(left), dtype=np.int8), np.ones(len(right), dtype=np.int8)])
    bands, per_band = lsh_bands(near.threshold, near.num_perm)
    return similar_pairs(signatures, candidate_pairs(signatures, bands, per_band, rows, sides, near.seed),
                         near.threshold)


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Label of each of n nodes: the smallest node index of its component."""
    labels = np.arange(n)
    if len(pairs) == 0:
        return labels
    i, j = pairs[:, 0], pairs[:, 1]
    while True:
        low = np.minimum(labels[i], labels[j])
        before = labels.copy()
        np.minimum.at(labels, i, low)
        np.minimum.at(labels, j, low)
        while True:  # pointer jumping: follow labels to their roots
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(labels, before):
            return labels


@dataclass
class Duplicates:
    """What `DuplicateIndex.find` found, by row number (0-based, in the order rows were added)."""

    exact_of: np.ndarray      # first row with the identical text, or -1
    near_of: np.ndarray       # the kept row of its near-duplicate cluster, or -1 (exact copies: -1)
    similarity: np.ndarray    # estimated Jaccard with near_of's row where that pair was checked; else 0

    @property
    def keep(self) -> np.ndarray:
        return (self.exact_of < 0) & (self.near_of < 0)

    @property
    def n_exact(self) -> int:
        return int((self.exact_of >= 0).sum())

    @property
    def n_near(self) -> int:
        return int((self.near_of >= 0).sum())


class DuplicateIndex:
    """Keys (and signatures, when near duplicates are wanted) of rows added in batches."""

    def __init__(self, near: NearOptions | None = None):
        self.near = near
        self._keys: list[np.ndarray] = []
        self.signatures = Signatures(near.num_perm if near else 0)
        self.size = 0

    def add(self, texts: list[str]) -> None:
        self._keys.append(exact_keys(texts))
        if self.near is not None:
            self.signatures.append(minhash(texts, self.near))
        self.size += len(texts)

    @property
    def keys(self) -> np.ndarray:
        if len(self._keys) > 1:
            self._keys = [np.concatenate(self._keys)]
        return self._keys[0] if self._keys else np.empty(0, dtype=np.int64)

    def find(self) -> Duplicates:
        n = self.size
        _, first, inverse = np.unique(self.keys, return_index=True, return_inverse=True)
        first_of_row = first[inverse.reshape(-1)]
        exact_of = np.where(first_of_row != np.arange(n), first_of_row, -1)
        near_of = np.full(n, -1, dtype=np.int64)
        similarity = np.zeros(n)
        if self.near is None or n < 2:
            return Duplicates(exact_of, near_of, similarity)
        distinct = np.sort(first)  # near duplicates are looked for among distinct texts only
        bands, per_band = lsh_bands(self.near.threshold, self.near.num_perm)
        pairs = candidate_pairs(self.signatures, bands, per_band, distinct, seed=self.near.seed)
        pairs, sims = similar_pairs(self.signatures, pairs, self.near.threshold)
        labels = connected_components(n, pairs)
        members = np.flatnonzero(labels != np.arange(n))
        near_of[members] = labels[members]
        similarity[pairs[:, 1]] = sims  # with the partner that linked the row in (for reports)
        return Duplicates(exact_of, near_of, similarity)


def cross_duplicates(train: DuplicateIndex, val: DuplicateIndex) -> tuple[np.ndarray, np.ndarray]:
    """For each val row: the train row with identical text (or -1), and a train row it nearly
    repeats (or -1; looked for only when both indexes hold signatures and the texts differ)."""
    exact = np.full(val.size, -1, dtype=np.int64)
    train_keys, val_keys = train.keys, val.keys
    if train.size and val.size:
        order = np.argsort(train_keys, kind="stable")
        pos = np.minimum(np.searchsorted(train_keys[order], val_keys), len(order) - 1)
        hit = train_keys[order][pos] == val_keys
        exact[hit] = order[pos[hit]]
    close = np.full(val.size, -1, dtype=np.int64)
    if train.near is None or val.near is None:
        return exact, close
    both = Signatures(train.signatures.width, train.signatures.blocks + val.signatures.blocks)
    pairs, _ = cross_pairs(both, np.arange(train.size), train.size + np.arange(val.size), train.near)
    close[pairs[:, 1] - train.size] = pairs[:, 0]
    close[exact >= 0] = -1
    return exact, close


def leakage_between(index: DuplicateIndex, train_rows: np.ndarray, val_rows: np.ndarray) -> tuple[int, int | None]:
    """(val rows whose text is also a train row's, val rows that nearly repeat a train row or None
    when the index holds no signatures), for two sets of rows of one index."""
    keys = index.keys
    exact = np.isin(keys[val_rows], keys[train_rows])
    if index.near is None:
        return int(exact.sum()), None
    pairs, _ = cross_pairs(index.signatures, train_rows, val_rows, index.near)
    near = np.zeros(len(keys), dtype=bool)
    near[pairs[:, 1]] = True
    return int(exact.sum()), int((near[val_rows] & ~exact).sum())
