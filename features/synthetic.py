"""Synthetic MovieLens-like data with known structure, so tests and demos need no download.

Each user picks items by sampling without replacement from
    softmax(popularity prior + taste_strength * genre affinity + factor_strength * p_u . q_i)
so the data has (a) a heavy-tailed popularity curve that a popularity baseline exploits and
(b) per-user taste that only a personalised model can learn. The output is a pure function of
the config (one numpy Generator seeded with cfg.seed).
"""
from __future__ import annotations

import numpy as np

from features.config import SYNTHETIC_GENRES, SyntheticConfig
from features.schema import Dataset, Interactions, Items, Users
from features.vocab import Vocab

OCCUPATIONS = ("student", "engineer", "educator", "artist", "healthcare", "retired", "other")
_GENRES_PER_ITEM_P = np.array([0.5, 0.35, 0.15])  # P(1 genre), P(2), P(3)
_USER_CHUNK = 2048  # users per logits block, bounds memory at chunk * n_items floats


def _gumbel_top_k(rng: np.random.Generator, logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of k draws without replacement per row, ∝ softmax(logits), best first (Gumbel top-k)."""
    keys = logits + rng.gumbel(size=logits.shape)
    top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def _item_genres(rng: np.random.Generator, n_items: int, n_genres: int) -> np.ndarray:
    """Binary (n_items, n_genres) matrix with 1-3 genres per item; some genres more common than others."""
    genre_logw = np.log(rng.dirichlet(np.full(n_genres, 2.0)))
    k = rng.choice(3, size=n_items, p=_GENRES_PER_ITEM_P) + 1
    ranked = _gumbel_top_k(rng, np.tile(genre_logw, (n_items, 1)), 3)
    onehot = np.zeros((n_items, n_genres), dtype=np.float64)
    rows = np.repeat(np.arange(n_items), k)
    cols = ranked[np.arange(3)[None, :] < k[:, None]]
    onehot[rows, cols] = 1.0
    return onehot


def _interaction_counts(rng: np.random.Generator, cfg: SyntheticConfig) -> np.ndarray:
    """Per-user counts: 5 + a geometric tail, mean ≈ mean_interactions_per_user, capped at n_items."""
    extra = cfg.mean_interactions_per_user - 5
    tail = rng.geometric(1.0 / (extra + 1), size=cfg.n_users) - 1 if extra > 0 else np.zeros(cfg.n_users, int)
    return np.minimum(5 + tail, cfg.n_items).astype(np.int64)


def generate(cfg: SyntheticConfig = SyntheticConfig()) -> Dataset:
    """Build a Dataset (interactions, item metadata, demographics, stated preferences) from cfg."""
    rng = np.random.default_rng(cfg.seed)
    U, I, G, F = cfg.n_users, cfg.n_items, cfg.n_genres, cfg.n_factors
    genre_names = list(SYNTHETIC_GENRES[:G])

    # Items: Zipf-like prior over a random popularity rank, genres, latent factors.
    rank = rng.permutation(I) + 1
    pop_logit = -cfg.popularity_exponent * np.log(rank)
    item_genre = _item_genres(rng, I, G)
    item_genre_mean = item_genre / item_genre.sum(axis=1, keepdims=True)
    q = rng.normal(0.0, F ** -0.25, size=(I, F))

    # Users: genre taste and latent factors (p.q ~ N(0, 1)).
    taste = rng.normal(0.0, 1.0, size=(U, G))
    p = rng.normal(0.0, F ** -0.25, size=(U, F))
    counts = _interaction_counts(rng, cfg)

    users, items, affinity = [], [], []
    for lo in range(0, U, _USER_CHUNK):
        hi = min(lo + _USER_CHUNK, U)
        aff = cfg.taste_strength * taste[lo:hi] @ item_genre_mean.T + cfg.factor_strength * p[lo:hi] @ q.T
        c = counts[lo:hi]
        picked = _gumbel_top_k(rng, pop_logit[None, :] + aff, int(c.max()))
        keep = np.arange(picked.shape[1])[None, :] < c[:, None]
        rows = np.nonzero(keep)[0]
        users.append(rows + lo)
        items.append(picked[keep])
        affinity.append(aff[rows, picked[keep]])
    user = np.concatenate(users)
    item = np.concatenate(items)
    aff = np.concatenate(affinity)

    # Ratings: standardised affinity plus noise, mapped onto 1..5.
    z = (aff - aff.mean()) / (aff.std() + 1e-9)
    rating = np.clip(np.rint(3.5 + z + rng.normal(0.0, 0.6, size=len(z))), 1, 5).astype(np.float32)

    # Timestamps: uniform over the span, then rows sorted by (user, time) and made strictly
    # increasing per user, so the time order is independent of preference order.
    span = int(cfg.span_days * 86400)
    ts = cfg.start_timestamp + rng.integers(0, span, size=len(user))
    order = np.lexsort((ts, user))
    user, item, rating, ts = user[order], item[order], rating[order], ts[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ts = ts + (np.arange(len(user)) - np.repeat(starts, counts))
    inter = Interactions(user.astype(np.int64), item.astype(np.int64), rating, ts.astype(np.int64))

    # Side tables.
    item_genre_idx = [tuple(int(g) for g in np.flatnonzero(row)) for row in item_genre]
    titles = [f"Item {i + 1} ({'/'.join(genre_names[g] for g in gs)})" for i, gs in enumerate(item_genre_idx)]
    year = rng.integers(1960, 2025, size=I).astype(np.int32)
    taste_order = np.argsort(-taste, axis=1, kind="stable")
    item_table = Items(title=titles, genres=item_genre_idx, year=year)
    user_table = Users(
        age=rng.integers(18, 66, size=U).astype(np.int32),
        gender=[("F", "M")[g] for g in rng.integers(0, 2, size=U)],
        occupation=[OCCUPATIONS[o] for o in rng.integers(0, len(OCCUPATIONS), size=U)],
        liked_genres=[(int(a), int(b)) for a, b in taste_order[:, :2]],
        avoided_genres=[(int(g),) for g in taste_order[:, -1]],
    )
    return Dataset(
        name=f"synthetic-seed{cfg.seed}",
        interactions=inter,
        items=item_table,
        users=user_table,
        genre_names=genre_names,
        user_vocab=Vocab([f"u{i}" for i in range(1, U + 1)], kind="user"),
        item_vocab=Vocab([f"i{i}" for i in range(1, I + 1)], kind="item"),
    )
