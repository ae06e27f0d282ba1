"""Train / validation / test split protocols, deterministic by seed and fully vectorised.

`stratified_split` follows the Microsoft Recommenders `python_stratified_split` protocol
(per-group shuffle, first round(ratio * len) rows to train, banker's rounding like Python's
round), so results are comparable with published baselines; the shuffle itself is ours, so
row-level assignments differ from the pandas implementation. `leave_last_n` is the usual
sequential protocol. `given_split` keeps the test part a dataset was published with: a loader
of such data (features/lines.py) gives its train rows timestamp GIVEN_TRAIN and its test rows
GIVEN_TEST (the files carry no time; the test part counts as the later one). Every row lands
in exactly one part.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from features.config import SplitConfig
from features.schema import Interactions


@dataclass(frozen=True)
class Split:
    train: Interactions
    val: Interactions | None
    test: Interactions


def _groups(sorted_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, size) of each run of equal values in an already sorted key array (non-empty)."""
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_key)) + 1])
    sizes = np.diff(np.concatenate([starts, [len(sorted_key)]]))
    return starts, sizes


def stratified_split(
    inter: Interactions, ratio: float = 0.75, by: Literal["item", "user"] = "item", seed: int = 42
) -> tuple[Interactions, Interactions]:
    """Per `by` group: shuffle with seed, first round(ratio * len) rows (>= 1) to train, rest to test.

    Both parts keep the original row order.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if by not in ("item", "user"):
        raise ValueError(f"by must be 'item' or 'user', got {by!r}")
    n = len(inter)
    if n == 0:
        return inter, inter
    key = inter.item if by == "item" else inter.user
    perm = np.random.default_rng(seed).permutation(n)
    order = perm[np.argsort(key[perm], kind="stable")]  # grouped by key, shuffled within a group
    starts, sizes = _groups(key[order])
    rank = np.arange(n) - np.repeat(starts, sizes)
    n_train = np.maximum(1, np.round(ratio * sizes)).astype(np.int64)
    train = np.empty(n, dtype=bool)
    train[order] = rank < np.repeat(n_train, sizes)
    return inter.take(train), inter.take(~train)


def leave_last_n(inter: Interactions, n: int = 1) -> tuple[Interactions, Interactions]:
    """Per user, the n most recent rows (timestamp, ties by row order) go to test.

    Users with <= n rows keep everything in train, so no user disappears from training.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rows = len(inter)
    if rows == 0:
        return inter, inter
    order = np.lexsort((np.arange(rows), inter.timestamp, inter.user))
    starts, sizes = _groups(inter.user[order])
    from_end = np.repeat(starts + sizes, sizes) - 1 - np.arange(rows)  # 0 = most recent
    test = np.zeros(rows, dtype=bool)
    test[order] = (from_end < n) & (np.repeat(sizes, sizes) > n)
    return inter.take(~test), inter.take(test)


GIVEN_TRAIN, GIVEN_TEST = 0, 1  # timestamps of a fixed split's train and test rows (see the module doc)


def given_split(inter: Interactions) -> tuple[Interactions, Interactions]:
    """The data's own split: rows with timestamp GIVEN_TEST are the test part, the rest train.

    ValueError naming split.protocol when the rows do not carry a fixed split (real timestamps,
    or no test row at all)."""
    if len(inter) == 0:
        return inter, inter
    test = inter.timestamp == GIVEN_TEST
    if not test.any() or not (test | (inter.timestamp == GIVEN_TRAIN)).all():
        raise ValueError(
            "split.protocol: 'given' needs data published with a fixed test part (data.lines.test_path, "
            "or data.source: ml1m-implicit); this data has none: use stratified or leave_last_n"
        )
    return inter.take(~test), inter.take(test)


def split(inter: Interactions, cfg: SplitConfig = SplitConfig()) -> Split:
    """Apply cfg: test first, then validation carved out of the remaining train rows.

    stratified: val = a per-group val_fraction of train (same procedure, seed + 1).
    given: test = the data's own test part; val carved from its train part as for stratified.
    leave_last_n: val = the next-to-last n rows per user (val_fraction > 0 only switches it on).
    """
    val = None
    if cfg.protocol in ("stratified", "given"):
        if cfg.protocol == "given":
            train, test = given_split(inter)
        else:
            train, test = stratified_split(inter, cfg.ratio, cfg.by, cfg.seed)
        if cfg.val_fraction > 0:
            train, val = stratified_split(train, 1.0 - cfg.val_fraction, cfg.by, cfg.seed + 1)
    else:
        train, test = leave_last_n(inter, cfg.n)
        if cfg.val_fraction > 0:
            train, val = leave_last_n(train, cfg.n)
    return Split(train=train, val=val, test=test)


def user_items_csr(inter: Interactions, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (indptr, indices) of each user's distinct items, sorted; user u owns indices[indptr[u]:indptr[u+1]]."""
    if len(inter) and (inter.user.min() < 0 or inter.user.max() >= n_users or inter.item.min() < 0 or inter.item.max() >= n_items):
        raise ValueError(f"user/item index out of range for n_users={n_users}, n_items={n_items}")
    pairs = np.unique(inter.user.astype(np.int64) * n_items + inter.item.astype(np.int64))
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(pairs // n_items, minlength=n_users), out=indptr[1:])
    return indptr, (pairs % n_items).astype(np.int64)
