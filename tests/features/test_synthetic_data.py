"""The synthetic generator is deterministic, well-formed, and carries learnable structure."""
import re
import time

import numpy as np
import pytest

from features.config import SyntheticConfig
from features.splits import stratified_split
from features.synthetic import generate


@pytest.fixture(scope="module")
def ds():
    return generate(SyntheticConfig())


def _item_genre_matrix(ds):
    a = np.zeros((ds.n_items, len(ds.genre_names)))
    for i, gs in enumerate(ds.items.genres):
        a[i, list(gs)] = 1
    return a


def test_same_seed_identical_different_seed_differs():
    cfg = SyntheticConfig(n_users=200, n_items=150, seed=5)
    a, b, c = generate(cfg), generate(cfg), generate(cfg.model_copy(update={"seed": 6}))
    for f in ("user", "item", "rating", "timestamp"):
        assert np.array_equal(getattr(a.interactions, f), getattr(b.interactions, f))
    assert a.items.title == b.items.title and a.items.genres == b.items.genres
    assert np.array_equal(a.items.year, b.items.year) and np.array_equal(a.users.age, b.users.age)
    assert a.users.gender == b.users.gender and a.users.liked_genres == b.users.liked_genres
    assert len(a.interactions) != len(c.interactions) or not np.array_equal(a.interactions.item, c.interactions.item)


def test_defaults_are_fast():
    t = time.perf_counter()
    generate(SyntheticConfig(seed=11))
    assert time.perf_counter() - t < 2.0


def test_shapes_ids_and_side_tables(ds):
    cfg = SyntheticConfig()
    assert ds.n_users == cfg.n_users and ds.n_items == cfg.n_items and len(ds.genre_names) == cfg.n_genres
    assert ds.user_vocab.ids[0] == "u1" and ds.user_vocab.ids[-1] == f"u{cfg.n_users}"
    assert ds.item_vocab.ids[0] == "i1" and ds.item_vocab.ids[-1] == f"i{cfg.n_items}"
    assert len(ds.items) == cfg.n_items and len(ds.users) == cfg.n_users
    assert all(1 <= len(g) <= 3 for g in ds.items.genres)
    for i in (0, 16, cfg.n_items - 1):
        names = "/".join(ds.genre_names[g] for g in ds.items.genres[i])
        assert ds.items.title[i] == f"Item {i + 1} ({names})"
    assert re.fullmatch(r"Item 17 \([A-Za-z/-]+\)", ds.items.title[16])
    assert set(ds.users.gender) <= {"F", "M"} and ds.users.age.min() >= 18
    assert ((ds.items.year >= 1960) & (ds.items.year <= 2024)).all()
    r = ds.interactions.rating
    assert set(np.unique(r).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0} and len(np.unique(r)) >= 4
    assert abs(len(ds.interactions) / cfg.n_users - cfg.mean_interactions_per_user) < 5


def test_min_five_per_user_no_duplicates_time_increasing(ds):
    it = ds.interactions
    assert np.bincount(it.user, minlength=ds.n_users).min() >= 5
    pairs = it.user * ds.n_items + it.item
    assert len(np.unique(pairs)) == len(pairs)
    same_user = it.user[1:] == it.user[:-1]
    assert np.all(np.diff(it.user) >= 0)  # rows grouped by user
    assert np.all(np.diff(it.timestamp)[same_user] > 0)  # strictly increasing per user
    cfg = SyntheticConfig()
    assert it.timestamp.min() >= cfg.start_timestamp
    assert it.timestamp.max() < cfg.start_timestamp + cfg.span_days * 86400 + 1000


def test_popularity_is_heavy_tailed(ds):
    counts = np.sort(np.bincount(ds.interactions.item, minlength=ds.n_items))[::-1]
    top_decile_share = counts[: ds.n_items // 10].sum() / counts.sum()
    assert top_decile_share > 0.30
    flat = generate(SyntheticConfig(popularity_exponent=0.0, taste_strength=0.0, factor_strength=0.0))
    flat_counts = np.sort(np.bincount(flat.interactions.item, minlength=flat.n_items))[::-1]
    assert flat_counts[: flat.n_items // 10].sum() / flat_counts.sum() < 0.15  # ~uniform without the prior


def test_stated_preferences_match_behaviour(ds):
    it, a = ds.interactions, _item_genre_matrix(ds)
    per_user = np.zeros((ds.n_users, a.shape[1]))
    np.add.at(per_user, it.user, a[it.item])
    share = per_user / np.bincount(it.user)[:, None]  # share of each user's rows touching genre g
    overall = a[it.item].mean(axis=0)
    users = np.arange(ds.n_users)
    liked = np.array(ds.users.liked_genres)
    avoided = np.array(ds.users.avoided_genres)[:, 0]
    assert liked.shape == (ds.n_users, 2) and np.all(liked[:, 0] != liked[:, 1])
    assert not np.any(liked == avoided[:, None])
    assert (share[users, liked[:, 0]] > overall[liked[:, 0]]).mean() > 0.8
    assert (share[users, liked[:, 0]] / overall[liked[:, 0]]).mean() > 1.5
    assert (share[users, avoided] < overall[avoided]).mean() > 0.8


def _recall_at_10(scores, train, test):
    scores = np.where(train > 0, -np.inf, scores)
    top = np.argsort(-scores, axis=1)[:, :10]
    hits = np.take_along_axis(test, top, axis=1).sum(axis=1)
    n = test.sum(axis=1)
    has = n > 0
    return float((hits[has] / np.minimum(n[has], 10)).mean())


def test_collaborative_model_clearly_beats_popularity(ds):
    """Item-kNN (cosine) must beat the popularity baseline: the data has personal structure."""
    train, test = stratified_split(ds.interactions, ratio=0.8, by="user", seed=0)
    x = np.zeros((ds.n_users, ds.n_items))
    x[train.user, train.item] = 1
    t = np.zeros_like(x)
    t[test.user, test.item] = 1
    pop = _recall_at_10(np.tile(x.sum(axis=0), (ds.n_users, 1)), x, t)
    norm = np.sqrt(x.sum(axis=0)) + 1e-9
    sim = (x.T @ x) / norm[:, None] / norm[None, :]
    np.fill_diagonal(sim, 0)
    knn = _recall_at_10(x @ sim, x, t)
    assert knn > 1.25 * pop, (knn, pop)
