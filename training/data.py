"""Turn CSR user->items matrices and side features into TorchRec KeyedJaggedTensors.

Training examples are users, not (user, item) pairs: each epoch hides a random share of
every user's training items from the user tower and asks the model to predict them
(a denoising objective; no item is ever both input and target). One example per user is
also the privacy unit later DP work needs.

A history CSR is `(indptr, indices)` or `(indptr, indices, ratings)`; ratings (aligned with
indices) weight the history bag when the model is rating-weighted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

from features.content import ItemSide, UserSide, item_side, user_side, user_inputs, year_edges
from features.schema import Dataset, Interactions
from training.model import AGE, AVOIDED, GENDER, GENRES, HISTORY, ITEM_ID, LIKED, OCCUPATION, TITLE, USER_ID, YEAR, TowerSpec

CSR = tuple[np.ndarray, ...]  # (indptr, indices[, ratings])


@dataclass(frozen=True)
class Context:
    """Side features of the dataset, indexed like the vocabularies."""

    users: UserSide
    items: ItemSide
    rating_weighted: bool = False

    @classmethod
    def from_dataset(cls, ds: Dataset, title_buckets: int = 1024, rating_weighted: bool = False, year_resolution: str = "decade") -> "Context":
        return cls(user_side(ds), item_side(ds, title_buckets, year_edges(year_resolution)), rating_weighted)


def rated_csr(inter: Interactions, n_users: int) -> CSR:
    """(indptr, indices, ratings): distinct items per user, sorted; the last rating of a pair wins."""
    key = inter.user.astype(np.int64) * (int(inter.item.max(initial=0)) + 1) + inter.item
    # reversed + unique(return_index) keeps the LAST occurrence of each pair
    _, first_rev = np.unique(key[::-1], return_index=True)
    keep = len(key) - 1 - first_rev
    order = keep[np.lexsort((inter.item[keep], inter.user[keep]))]
    counts = np.bincount(inter.user[order], minlength=n_users)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return indptr, inter.item[order].astype(np.int64), inter.rating[order].astype(np.float32)


def _positions(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    shift = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
    return lengths, shift + np.arange(lengths.sum())


def gather_rows(csr: CSR, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, concatenated indices) of the CSR rows `rows`, vectorized."""
    lengths, pos = _positions(csr[0], rows)
    return lengths, csr[1][pos]


def csr_rows(csr: CSR, rows: np.ndarray, column: int = 1) -> list[np.ndarray]:
    """The rows as a list of arrays (column 1 = indices, 2 = ratings)."""
    lengths, pos = _positions(csr[0], rows)
    return np.split(csr[column][pos], np.cumsum(lengths)[:-1]) if len(rows) else []


def csr_from_mask(csr: CSR, keep: np.ndarray) -> CSR:
    """The sub-matrix of the entries where `keep` is True, rows preserved (ratings too)."""
    indptr = csr[0]
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    counts = np.bincount(rows[keep], minlength=len(indptr) - 1)
    return (np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), *(c[keep] for c in csr[1:]))


def user_feed(
    spec: TowerSpec,
    ctx: Context,
    users: np.ndarray,
    history: CSR,
    user_index: np.ndarray | None = None,
    demographics: np.ndarray | None = None,
    liked: list[np.ndarray] | None = None,
    avoided: list[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The numpy user-tower feed (the ONNX input layout) for a batch of users.

    `demographics` masks users whose demographics must not be used (False -> missing);
    `liked` / `avoided` override the stated genres (training samples them).
    """
    u = ctx.users
    keep = np.ones(len(users), bool) if demographics is None else np.asarray(demographics, bool)
    ratings = csr_rows(history, users, 2) if ctx.rating_weighted and len(history) > 2 else None
    return user_inputs(
        csr_rows(history, users),
        ratings,
        users if user_index is None else user_index,
        np.where(keep, u.age[users], 0),
        np.where(keep, u.gender[users], 0),
        np.where(keep, u.occupation[users], 0),
        csr_rows(u.liked, users) if liked is None else liked,
        csr_rows(u.avoided, users) if avoided is None else avoided,
    )


def _lengths(offsets: np.ndarray, total: int) -> np.ndarray:
    return np.diff(np.append(offsets, total))


def kjt_from_feed(spec: TowerSpec, feed: dict[str, np.ndarray], device: torch.device) -> KeyedJaggedTensor:
    """Weighted KJT for the user arch (all tables SUM-pool): history weights as given, stated
    genre bags 1/len (a mean, as the exported `EmbeddingBag(mode="mean")`), single ids 1."""
    batch = len(feed["user"])
    ones = np.ones(batch, np.int64)

    def mean_bag(key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lengths = _lengths(feed[f"{key}_offsets"], len(feed[key]))
        return feed[key], lengths, np.repeat(1.0 / np.maximum(lengths, 1), lengths).astype(np.float32)

    parts = {
        HISTORY: (feed["history"], _lengths(feed["history_offsets"], len(feed["history"])), feed["history_weights"]),
        USER_ID: (feed["user"], ones, None),
        LIKED: mean_bag("liked"),
        AVOIDED: mean_bag("avoided"),
    }
    keys = spec.user_features()
    values, lengths, weights = [], [], []
    for key in keys:
        v, n, w = parts.get(key, (feed.get(key), ones, None))
        values.append(v)
        lengths.append(n)
        weights.append(np.ones(len(v), np.float32) if w is None else w)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.from_numpy(np.concatenate(values).astype(np.int64)).to(device),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)).to(device),
        weights=torch.from_numpy(np.concatenate(weights).astype(np.float32)).to(device),
    )


def user_features(spec: TowerSpec, ctx: Context, users: np.ndarray, history: CSR, device: torch.device, user_index: np.ndarray | None = None, **kw) -> KeyedJaggedTensor:
    """KJT for a batch of users (see `user_feed` for the optional overrides)."""
    return kjt_from_feed(spec, user_feed(spec, ctx, users, history, user_index, **kw), device)


def item_features(spec: TowerSpec, ctx: Context, device: torch.device, items: np.ndarray | None = None, oov: np.ndarray | None = None) -> KeyedJaggedTensor:
    """KJT with the item keys for `items` (default: the whole catalog); `oov` marks items whose
    id row is replaced by the OOV row (id-dropout in training, never-trained items at export)."""
    items = np.arange(spec.n_items) if items is None else items
    ids = items if oov is None else np.where(oov, spec.item_oov_index, items)
    one = np.ones(len(items), np.int64)
    side = ctx.items
    parts = {ITEM_ID: (ids, one), GENRES: gather_rows(side.genres, items)[::-1], YEAR: (side.year[items], one), TITLE: gather_rows(side.title, items)[::-1]}
    keys = spec.item_features()
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.from_numpy(np.concatenate([parts[k][0] for k in keys]).astype(np.int64)).to(device),
        lengths=torch.from_numpy(np.concatenate([parts[k][1] for k in keys]).astype(np.int32)).to(device),
    )


@dataclass
class UserBatch:
    users: np.ndarray  # user indices
    features: KeyedJaggedTensor  # history (the non-hidden items) + side features
    targets: CSR  # hidden items per user of the batch (rows follow `users`)


def sample_stated(ctx: Context, histories: list[np.ndarray], rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Stand-in stated preferences for data that has none: 1-3 genres drawn by their share of the
    user's (input) history, and one genre absent from it as 'avoided' half of the time."""
    n_genres = int(ctx.items.genres[1].max(initial=-1)) + 1
    liked, avoided = [], []
    for h in histories:
        counts = np.bincount(gather_rows(ctx.items.genres, h)[1], minlength=n_genres).astype(float)
        if counts.sum() == 0:
            liked.append(np.zeros(0, np.int64))
        else:
            n = min(int(rng.integers(1, 4)), int((counts > 0).sum()))
            liked.append(np.sort(rng.choice(n_genres, size=n, replace=False, p=counts / counts.sum())))
        absent = np.flatnonzero(counts == 0)
        avoided.append(rng.choice(absent, size=1) if len(absent) and rng.random() < 0.5 else np.zeros(0, np.int64))
    return liked, avoided


def epoch_batches(
    spec: TowerSpec,
    ctx: Context,
    train: CSR,
    batch_size: int,
    history_dropout: float,
    user_id_dropout: float,
    rng: np.random.Generator,
    device: torch.device,
    demographics_dropout: float = 0.0,
    stated_dropout: float = 0.5,
) -> Iterator[UserBatch]:
    """One epoch: shuffle users with training items, hide ~history_dropout of each one's items.

    Side features get dropout too, so the model serves users without them (no consent, no
    stated preferences) and users with nothing else (stated genres, empty history).
    """
    indptr = train[0]
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
        extra: dict = {}
        if spec.use_demographics:
            extra["demographics"] = rng.random(len(batch)) >= demographics_dropout
        if spec.use_stated:
            liked, avoided = (csr_rows(ctx.users.liked, batch), csr_rows(ctx.users.avoided, batch)) if ctx.users.has_stated else sample_stated(ctx, csr_rows(history, batch), rng)
            drop = rng.random(len(batch)) < stated_dropout
            empty = np.zeros(0, np.int64)
            extra["liked"] = [empty if d else g for d, g in zip(drop, liked)]
            extra["avoided"] = [empty if d else g for d, g in zip(drop, avoided)]
        t_len, t_val = gather_rows(targets, batch)
        features = user_features(spec, ctx, batch, history, device, user_index, **extra)
        yield UserBatch(batch, features, (np.concatenate([[0], np.cumsum(t_len)]), t_val))


# -- the device path (trainer.device_batches) ------------------------------------------------
DEVICE_BATCH_FEATURES = (HISTORY, USER_ID, AGE, GENDER, OCCUPATION)


def device_batches_supported(spec: TowerSpec) -> bool:
    """Whether `device_epoch_batches` builds every user feature of `spec` (stated genres: no, their
    synthetic stand-ins are drawn per user on the host)."""
    return set(spec.user_features()) <= set(DEVICE_BATCH_FEATURES)


def device_epoch_batches(
    spec: TowerSpec,
    ctx: Context,
    train: CSR,
    batch_size: int,
    history_dropout: float,
    user_id_dropout: float,
    rng: np.random.Generator,
    device: torch.device,
    demographics_dropout: float = 0.0,
) -> Iterator[UserBatch]:
    """`epoch_batches` with torch ops on `device`: the same epoch (history dropout with at least one
    hidden item per user, shuffled users, user-id and demographics dropout), its random draws from a
    torch generator on the device seeded by `rng` (so a resumed run replays it). The CSR goes to the
    device once per epoch and the epoch is laid out there in batch order; a step only slices it and
    draws its dropout, so no step copies from the host or waits for the device. Targets come back to
    the host once per epoch (the task reads them as numpy)."""
    if not device_batches_supported(spec):
        raise ValueError(f"trainer.device_batches: user features {sorted(set(spec.user_features()) - set(DEVICE_BATCH_FEATURES))} are built on the host only")
    gen = torch.Generator(device=device)
    gen.manual_seed(int(rng.integers(2**62)))
    indptr = torch.from_numpy(np.asarray(train[0], np.int64)).to(device)
    nnz, n_users = int(train[0][-1]), len(train[0]) - 1
    lengths = indptr[1:] - indptr[:-1]
    rows = torch.repeat_interleave(torch.arange(n_users, device=device), lengths, output_size=nnz)
    hide = torch.rand(nnz, generator=gen, device=device) < history_dropout
    # every user needs at least one target: hide one random item of users that got none
    hidden = torch.zeros(n_users, dtype=torch.int64, device=device).index_add_(0, rows, hide.long())
    pick = indptr[:-1] + (torch.rand(n_users, generator=gen, device=device) * lengths).long()
    hide[pick[(hidden == 0) & (lengths > 0)]] = True
    users = torch.nonzero(lengths > 0).flatten()
    users = users[torch.randperm(len(users), generator=gen, device=device)]
    yield from _device_batches(spec, ctx, train, batch_size, user_id_dropout, gen, device, demographics_dropout, hide, users)


def _device_batches(spec, ctx, train, batch_size, user_id_dropout, gen, device, demographics_dropout, hide, users) -> Iterator[UserBatch]:
    """The epoch for a given hide mask (nnz,) and user order (both on `device`), in batches."""
    indptr = torch.from_numpy(np.asarray(train[0], np.int64)).to(device)
    indices = torch.from_numpy(np.asarray(train[1], np.int64)).to(device)
    lengths = indptr[1:] - indptr[:-1]
    # every entry of the shuffled users, in batch order (one host sync: the epoch's size)
    seg_len = lengths[users]
    total = int(seg_len.sum())
    seg = torch.repeat_interleave(torch.arange(len(users), device=device), seg_len, output_size=total)
    first = torch.cumsum(seg_len, 0) - seg_len
    pos = indptr[users][seg] + torch.arange(total, device=device) - first[seg]
    keep = ~hide[pos]
    kept_seg = seg[keep]
    hist = indices[pos[keep]]
    hist_len = torch.zeros(len(users), dtype=torch.int64, device=device).index_add_(0, kept_seg, torch.ones_like(kept_seg))
    if ctx.rating_weighted and len(train) > 2:
        raw = torch.from_numpy(np.asarray(train[2], np.float32)).to(device)[pos[keep]]
        sums = torch.zeros(len(users), dtype=torch.float32, device=device).index_add_(0, kept_seg, raw)
        plain = (1.0 / hist_len.clamp(min=1).float())[kept_seg]
        # a history whose ratings sum to <= 0 falls back to a plain mean, as user_inputs does
        weights = torch.where(sums[kept_seg] > 0, raw / sums[kept_seg].clamp(min=torch.finfo(torch.float32).tiny), plain)
    else:
        weights = (1.0 / hist_len.clamp(min=1).float())[kept_seg]
    # host copies, once per epoch: batch boundaries and the targets (the task's numpy CSR)
    n_batches = -(-len(users) // batch_size)
    bounds = torch.arange(n_batches + 1, device=device).mul_(batch_size).clamp_(max=len(users))
    hist_ends = torch.cat([hist_len.new_zeros(1), torch.cumsum(hist_len, 0)])[bounds].tolist()
    t_seg, t_val = seg[~keep].cpu().numpy(), indices[pos[~keep]].cpu().numpy()
    t_ptr = np.concatenate([[0], np.cumsum(np.bincount(t_seg, minlength=len(users)))]).astype(np.int64)
    users_np = users.cpu().numpy()
    u = ctx.users
    side = {k: torch.from_numpy(np.asarray(v, np.int64)).to(device) for k, v in ((AGE, u.age), (GENDER, u.gender), (OCCUPATION, u.occupation))} if spec.use_demographics else {}
    keys = spec.user_features()
    bounds = bounds.tolist()
    for b in range(n_batches):
        a, z = bounds[b], bounds[b + 1]
        batch, n = users[a:z], z - a
        parts = {HISTORY: (hist[hist_ends[b] : hist_ends[b + 1]], hist_len[a:z], weights[hist_ends[b] : hist_ends[b + 1]])}
        if spec.use_user_id:
            oov = torch.rand(n, generator=gen, device=device) < user_id_dropout
            parts[USER_ID] = (torch.where(oov, spec.user_oov_index, batch), None, None)
        if spec.use_demographics:
            consent = torch.rand(n, generator=gen, device=device) >= demographics_dropout
            for k in (AGE, GENDER, OCCUPATION):
                parts[k] = (torch.where(consent, side[k][batch], 0), None, None)
        ones_len = torch.ones(n, dtype=torch.int32, device=device)
        values = [parts[k][0] for k in keys]
        features = KeyedJaggedTensor(
            keys=keys,
            values=torch.cat(values),
            lengths=torch.cat([ones_len if parts[k][1] is None else parts[k][1].int() for k in keys]),
            weights=torch.cat([torch.ones(n, dtype=torch.float32, device=device) if parts[k][2] is None else parts[k][2] for k in keys]),
            stride=n,
            length_per_key=[hist_ends[b + 1] - hist_ends[b] if k == HISTORY else n for k in keys],  # known here: no sync
        )
        t = t_ptr[a : z + 1]
        yield UserBatch(users_np[a:z], features, (t - t[0], t_val[t[0] : t[-1]]))
