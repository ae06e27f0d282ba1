"""Turn CSR user->items matrices into TorchRec KeyedJaggedTensors.

Training examples are users, not (user, item) pairs: each epoch hides a random share of
every user's training items from the user tower and asks the model to predict them
(a denoising objective; no item is ever both input and target). One example per user is
also the privacy unit later DP work needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from training.model import GENRES, HISTORY, ITEM_ID, USER_ID, TowerSpec

CSR = tuple[np.ndarray, np.ndarray]  # (indptr, indices)


def gather_rows(csr: CSR, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, concatenated values) of the CSR rows `rows`, vectorized."""
    indptr, indices = csr
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    shift = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return lengths, indices[shift + np.arange(lengths.sum())]


def csr_from_mask(csr: CSR, keep: np.ndarray) -> CSR:
    """The sub-matrix of the entries where `keep` is True, rows preserved."""
    indptr, indices = csr
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    counts = np.bincount(rows[keep], minlength=len(indptr) - 1)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), indices[keep]


def csr_union(a: CSR, b: CSR) -> CSR:
    """Row-wise union of two CSRs with the same number of rows (duplicates kept once)."""
    n = len(a[0]) - 1
    rows = np.concatenate([np.repeat(np.arange(n), np.diff(a[0])), np.repeat(np.arange(n), np.diff(b[0]))])
    cols = np.concatenate([a[1], b[1]])
    pairs = np.unique(np.stack([rows, cols], 1), axis=0)
    counts = np.bincount(pairs[:, 0], minlength=n)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), pairs[:, 1].astype(np.int64)


def user_features(
    spec: TowerSpec, users: np.ndarray, history: CSR, device: torch.device, user_index: np.ndarray | None = None
) -> KeyedJaggedTensor:
    """KJT with keys [history, (user_id)] for a batch of users; `user_index` overrides the id row (OOV)."""
    lengths, values = gather_rows(history, users)
    keys, all_lengths, all_values = [HISTORY], [lengths], [values]
    if spec.use_user_id:
        keys.append(USER_ID)
        all_lengths.append(np.ones(len(users), dtype=np.int64))
        all_values.append(users if user_index is None else user_index)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.from_numpy(np.concatenate(all_values).astype(np.int64)).to(device),
        lengths=torch.from_numpy(np.concatenate(all_lengths).astype(np.int32)).to(device),
    )


def item_features(spec: TowerSpec, item_genres: Sequence[Sequence[int]], device: torch.device, items: np.ndarray | None = None) -> KeyedJaggedTensor:
    """KJT with keys [item_id, (genres)] for `items` (default: the whole catalog)."""
    items = np.arange(spec.n_items) if items is None else items
    keys, lengths, values = [ITEM_ID], [np.ones(len(items), dtype=np.int64)], [items]
    if spec.use_genres:
        genre_lists = [item_genres[i] for i in items]
        keys.append(GENRES)
        lengths.append(np.fromiter((len(g) for g in genre_lists), dtype=np.int64, count=len(items)))
        values.append(np.fromiter((g for gs in genre_lists for g in gs), dtype=np.int64))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.from_numpy(np.concatenate(values).astype(np.int64)).to(device),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)).to(device),
    )


@dataclass
class UserBatch:
    users: np.ndarray  # user indices
    features: KeyedJaggedTensor  # history (the non-hidden items) + user id
    targets: CSR  # hidden items per user of the batch (rows follow `users`)


def epoch_batches(
    spec: TowerSpec,
    train: CSR,
    batch_size: int,
    history_dropout: float,
    user_id_dropout: float,
    rng: np.random.Generator,
    device: torch.device,
) -> Iterator[UserBatch]:
    """One epoch: shuffle users with training items, hide ~history_dropout of each one's items."""
    indptr, _ = train
    lengths = np.diff(indptr)
    hide = rng.random(indptr[-1]) < history_dropout
    # every user needs at least one target: hide one random item of users that got none
    rows = np.repeat(np.arange(len(lengths)), lengths)
    none = (np.bincount(rows[hide], minlength=len(lengths)) == 0) & (lengths > 0)
    forced = indptr[:-1][none] + (rng.random(none.sum()) * lengths[none]).astype(np.int64)
    hide[forced] = True
    history, targets = csr_from_mask(train, ~hide), csr_from_mask(train, hide)
    users = rng.permutation(np.flatnonzero(lengths > 0))
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        user_index = np.where(rng.random(len(batch)) < user_id_dropout, spec.user_oov_index, batch)
        t_len, t_val = gather_rows(targets, batch)
        yield UserBatch(batch, user_features(spec, batch, history, device, user_index), (np.concatenate([[0], np.cumsum(t_len)]), t_val))
