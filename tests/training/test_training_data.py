"""CSR helpers and the KJT batching of training/data.py, on hand-made CSRs and a tiny synthetic set."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from features.config import SyntheticConfig
from features.content import ItemSide, UserSide, to_csr
from features.schema import Interactions
from features.splits import user_items_csr
from features.synthetic import generate
from training.data import (
    Context,
    csr_from_mask,
    csr_rows,
    epoch_batches,
    gather_rows,
    item_features,
    rated_csr,
    user_features,
)
from training.model import GENRES, HISTORY, ITEM_ID, TITLE, USER_ID, YEAR, TowerSpec

CPU = torch.device("cpu")


def csr(rows: list[list[int]], ratings: list[list[float]] | None = None):
    indptr = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    out = (indptr, np.array([i for r in rows for i in r], dtype=np.int64))
    return out if ratings is None else (*out, np.array([x for r in ratings for x in r], dtype=np.float32))


def rows_of(c, column: int = 1) -> list[list]:
    indptr, values = c[0], c[column]
    return [values[indptr[u] : indptr[u + 1]].tolist() for u in range(len(indptr) - 1)]


def jagged(kjt, key: str) -> list[list[int]]:
    return [t.tolist() for t in kjt[key].to_dense()]


def jagged_weights(kjt, key: str) -> list[list[float]]:
    jt = kjt[key]
    offsets = jt.offsets().tolist()
    w = jt.weights().tolist()
    return [w[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def same(actual: list[list[float]], expected: list[list[float]]) -> bool:
    """Nested lists equal in shape and within float32 rounding."""
    return [len(r) for r in actual] == [len(r) for r in expected] and all(np.allclose(a, e, rtol=1e-6, atol=1e-7) for a, e in zip(actual, expected))


def make_ctx(n_users: int, item_genres, year=None, titles=None, rating_weighted: bool = False) -> Context:
    """A Context by hand: no demographics (all 0 = missing), no stated genres."""
    n_items = len(item_genres)
    zeros = np.zeros(n_users, np.int64)
    users = UserSide(zeros, zeros, zeros, to_csr([()] * n_users), to_csr([()] * n_users), [], [])
    items = ItemSide(to_csr(item_genres), np.zeros(n_items, np.int64) if year is None else np.asarray(year, np.int64), to_csr(titles or [()] * n_items))
    return Context(users, items, rating_weighted)


# rows: 0 -> [7, 8], 1 -> [], 2 -> [1, 2, 3], 3 -> [5]
TOY = csr([[7, 8], [], [1, 2, 3], [5]])
TOY_RATED = csr([[7, 8], [], [1, 2, 3], [5]], [[4, 1], [], [1, 2, 2], [3]])


# -- CSR helpers -----------------------------------------------------------------------------
def test_gather_rows_hand_case():
    lengths, values = gather_rows(TOY, np.array([2, 0, 1, 3, 2]))
    assert lengths.tolist() == [3, 2, 0, 1, 3]
    # row 2, row 0, (row 1 empty), row 3, row 2 again
    assert values.tolist() == [1, 2, 3, 7, 8, 5, 1, 2, 3]


def test_gather_rows_empty_selection_and_empty_rows():
    lengths, values = gather_rows(TOY, np.array([], dtype=np.int64))
    assert lengths.tolist() == [] and values.tolist() == []
    lengths, values = gather_rows(TOY, np.array([1, 1]))
    assert lengths.tolist() == [0, 0] and values.tolist() == []


def test_csr_rows_indices_and_ratings():
    assert [r.tolist() for r in csr_rows(TOY_RATED, np.array([2, 1, 0]))] == [[1, 2, 3], [], [7, 8]]
    assert [r.tolist() for r in csr_rows(TOY_RATED, np.array([2, 1, 0]), 2)] == [[1, 2, 2], [], [4, 1]]
    assert csr_rows(TOY, np.array([], dtype=np.int64)) == []


def test_csr_from_mask_keeps_rows():
    # entries in order: 7, 8 | - | 1, 2, 3 | 5
    keep = np.array([True, False, False, True, True, False])
    out = csr_from_mask(TOY, keep)
    assert len(out) == 2
    assert out[0].tolist() == [0, 1, 1, 3, 3]  # 4 rows preserved, row 3 became empty
    assert rows_of(out) == [[7], [], [2, 3], []]
    # complement: the two parts partition every row
    rest = csr_from_mask(TOY, ~keep)
    assert rows_of(rest) == [[8], [], [1], [5]]


def test_csr_from_mask_keeps_ratings_aligned():
    keep = np.array([True, False, False, True, True, False])
    out = csr_from_mask(TOY_RATED, keep)
    assert len(out) == 3
    assert rows_of(out) == [[7], [], [2, 3], []]
    assert rows_of(out, 2) == [[4.0], [], [2.0, 2.0], []]
    rest = csr_from_mask(TOY_RATED, ~keep)
    assert rows_of(rest) == [[8], [], [1], [5]] and rows_of(rest, 2) == [[1.0], [], [1.0], [3.0]]


def test_rated_csr_sorted_distinct_items_last_rating_wins():
    # user 0 rates item 4 twice (5 then 2: the later 2 wins); user 2 has nothing; rows arrive unsorted
    inter = Interactions(
        user=np.array([1, 0, 0, 1, 0, 3], np.int64),
        item=np.array([6, 4, 1, 0, 4, 2], np.int64),
        rating=np.array([3, 5, 4, 1, 2, 5], np.float32),
        timestamp=np.arange(6, dtype=np.int64),
    )
    out = rated_csr(inter, 4)
    assert out[0].tolist() == [0, 2, 4, 4, 5]
    assert rows_of(out) == [[1, 4], [0, 6], [], [2]]
    assert rows_of(out, 2) == [[4.0, 2.0], [1.0, 3.0], [], [5.0]]
    assert out[0].dtype == np.int64 and out[1].dtype == np.int64 and out[2].dtype == np.float32
    # the same (indptr, indices) as the unrated CSR
    plain = user_items_csr(inter, 4, 7)
    assert out[0].tolist() == plain[0].tolist() and out[1].tolist() == plain[1].tolist()


def test_rated_csr_matches_user_items_csr_on_synthetic_data():
    ds = generate(SyntheticConfig(n_users=40, n_items=30, n_genres=4, mean_interactions_per_user=8, seed=1))
    out = rated_csr(ds.interactions, ds.n_users)
    plain = user_items_csr(ds.interactions, ds.n_users, ds.n_items)
    np.testing.assert_array_equal(out[0], plain[0])
    np.testing.assert_array_equal(out[1], plain[1])
    # every rating is the one of that (user, item) row
    rating = {(u, i): r for u, i, r in zip(ds.interactions.user.tolist(), ds.interactions.item.tolist(), ds.interactions.rating.tolist())}
    users = np.repeat(np.arange(ds.n_users), np.diff(out[0]))
    assert [rating[(u, i)] for u, i in zip(users.tolist(), out[1].tolist())] == out[2].tolist()


def test_user_features_layout_and_oov_override():
    spec = TowerSpec(n_users=4, n_items=10, n_genres=2, use_user_id=True)
    ctx = make_ctx(4, [()] * 10)
    f = user_features(spec, ctx, np.array([2, 1, 0]), TOY, CPU)
    assert f.keys() == [HISTORY, USER_ID]
    assert jagged(f, HISTORY) == [[1, 2, 3], [], [7, 8]]
    assert jagged(f, USER_ID) == [[2], [1], [0]]
    assert f.values().dtype == torch.int64
    # weighted KJT: history weights sum to 1 per user (a mean), ids weigh 1
    assert same(jagged_weights(f, HISTORY), [[1 / 3] * 3, [], [1 / 2] * 2])
    assert jagged_weights(f, USER_ID) == [[1.0], [1.0], [1.0]]
    f = user_features(spec, ctx, np.array([2, 1]), TOY, CPU, user_index=np.array([spec.user_oov_index, 1]))
    assert jagged(f, USER_ID) == [[4], [1]]  # 4 = n_users = the OOV row
    no_id = user_features(TowerSpec(n_users=4, n_items=10, n_genres=2, use_user_id=False), ctx, np.array([3]), TOY, CPU)
    assert no_id.keys() == [HISTORY] and jagged(no_id, HISTORY) == [[5]]


def test_user_features_rating_weights_only_when_rating_weighted():
    spec = TowerSpec(n_users=4, n_items=10, n_genres=2)
    users = np.array([0, 1, 2, 3])
    rated = user_features(spec, make_ctx(4, [()] * 10, rating_weighted=True), users, TOY_RATED, CPU)
    # ratings [4, 1] -> [0.8, 0.2]; [1, 2, 2] -> [0.2, 0.4, 0.4]; [3] -> [1]
    assert same(jagged_weights(rated, HISTORY), [[0.8, 0.2], [], [0.2, 0.4, 0.4], [1.0]])
    plain = user_features(spec, make_ctx(4, [()] * 10, rating_weighted=False), users, TOY_RATED, CPU)
    assert same(jagged_weights(plain, HISTORY), [[0.5, 0.5], [], [1 / 3] * 3, [1.0]])
    # a CSR without ratings gives the plain mean even for a rating-weighted context
    unrated = user_features(spec, make_ctx(4, [()] * 10, rating_weighted=True), users, TOY, CPU)
    assert same(jagged_weights(unrated, HISTORY), [[0.5, 0.5], [], [1 / 3] * 3, [1.0]])


def test_item_features_lengths_and_values():
    spec = TowerSpec(n_users=1, n_items=4, n_genres=3, use_genres=True)
    ctx = make_ctx(1, [(0,), (1, 2), (), (0, 1, 2)])
    f = item_features(spec, ctx, CPU)
    assert f.keys() == [ITEM_ID, GENRES]
    assert f[ITEM_ID].lengths().tolist() == [1, 1, 1, 1] and f[ITEM_ID].values().tolist() == [0, 1, 2, 3]
    assert f[GENRES].lengths().tolist() == [1, 2, 0, 3]
    assert f[GENRES].values().tolist() == [0, 1, 2, 0, 1, 2]
    sub = item_features(spec, ctx, CPU, items=np.array([3, 1]))
    assert jagged(sub, ITEM_ID) == [[3], [1]] and jagged(sub, GENRES) == [[0, 1, 2], [1, 2]]
    plain = item_features(TowerSpec(n_users=1, n_items=4, n_genres=3, use_genres=False), ctx, CPU)
    assert plain.keys() == [ITEM_ID] and plain.values().tolist() == [0, 1, 2, 3]


def test_item_features_oov_mask_swaps_only_the_id():
    spec = TowerSpec(n_users=1, n_items=4, n_genres=3, use_content=True, n_title=8)
    ctx = make_ctx(1, [(0,), (1, 2), (), (0, 1, 2)], year=[3, 0, 7, 5], titles=[(1, 2), (3,), (), (4, 5, 6)])
    f = item_features(spec, ctx, CPU, oov=np.array([False, True, False, True]))
    assert f.keys() == [ITEM_ID, GENRES, YEAR, TITLE]
    assert jagged(f, ITEM_ID) == [[0], [4], [2], [4]]  # 4 = n_items = item_oov_index
    assert jagged(f, GENRES) == [[0], [1, 2], [], [0, 1, 2]]  # content untouched
    assert jagged(f, YEAR) == [[3], [0], [7], [5]]
    assert jagged(f, TITLE) == [[1, 2], [3], [], [4, 5, 6]]
    sub = item_features(spec, ctx, CPU, items=np.array([3, 0]), oov=np.array([False, True]))
    assert jagged(sub, ITEM_ID) == [[3], [4]] and jagged(sub, TITLE) == [[4, 5, 6], [1, 2]]


# -- epoch batches -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic():
    ds = generate(SyntheticConfig(n_users=70, n_items=50, n_genres=4, mean_interactions_per_user=12, seed=5))
    full = rated_csr(ds.interactions, ds.n_users)
    # edge cases: users 3 and 7 lose every item (must not appear), user 5 keeps one item
    # (must still get it as a target, so its history is empty)
    rows = np.repeat(np.arange(ds.n_users), np.diff(full[0]))
    keep = ~np.isin(rows, [3, 7])
    first_of_5 = full[0][5]
    keep[(rows == 5) & (np.arange(len(rows)) != first_of_5)] = False
    return Context.from_dataset(ds), csr_from_mask(full, keep)


@pytest.fixture(scope="module")
def train_csr(synthetic):
    return synthetic[1]


SPEC = TowerSpec(n_users=70, n_items=50, n_genres=4, use_user_id=True)


def run_epoch(synthetic, seed=0, batch_size=16, history_dropout=0.3, user_id_dropout=0.0):
    ctx, train = synthetic
    return list(epoch_batches(SPEC, ctx, train, batch_size, history_dropout, user_id_dropout, np.random.default_rng(seed), CPU))


def test_every_user_with_items_appears_exactly_once(synthetic, train_csr):
    batches = run_epoch(synthetic)
    users = np.concatenate([b.users for b in batches])
    with_items = np.flatnonzero(np.diff(train_csr[0]) > 0)
    assert 3 not in users and 7 not in users and 5 in users
    assert sorted(users.tolist()) == with_items.tolist()  # each exactly once
    assert [len(b.users) for b in batches[:-1]] == [16] * (len(batches) - 1)
    assert 1 <= len(batches[-1].users) <= 16
    assert len(batches) == -(-len(with_items) // 16)
    assert not np.array_equal(users, np.sort(users))  # shuffled


def test_history_and_targets_partition_each_users_items(synthetic, train_csr):
    n_hidden = n_total = 0
    for b in run_epoch(synthetic):
        history = jagged(b.features, HISTORY)
        targets = rows_of(b.targets)
        assert b.features.keys() == [HISTORY, USER_ID]
        assert len(history) == len(targets) == len(b.users)
        assert jagged(b.features, USER_ID) == [[u] for u in b.users.tolist()]  # no id dropout
        for u, h, t, w in zip(b.users.tolist(), history, targets, jagged_weights(b.features, HISTORY)):
            indptr, indices = train_csr[:2]
            own = set(indices[indptr[u] : indptr[u + 1]].tolist())
            assert len(t) >= 1, f"user {u} has no target"
            assert set(t) <= own, f"user {u}: target not among its items"
            assert set(h) <= own
            assert not set(h) & set(t), f"user {u}: item both in history and target"
            assert set(h) | set(t) == own  # nothing lost: each item is input or target
            assert w == pytest.approx([1 / max(len(h), 1)] * len(h))  # the visible history is a plain mean
            n_hidden, n_total = n_hidden + len(t), n_total + len(own)
            if u == 5:
                assert h == [] and len(t) == 1
    # ~history_dropout = 0.3 of the items are hidden (a bit more: users forced to have one target)
    assert 0.24 < n_hidden / n_total < 0.40


def test_rating_weighted_batches_weigh_the_visible_history_by_rating(synthetic, train_csr):
    ctx, train = synthetic
    rated = Context(ctx.users, ctx.items, rating_weighted=True)
    rating = {}
    for u in range(len(train[0]) - 1):
        for i, r in zip(*(c[train[0][u] : train[0][u + 1]].tolist() for c in train[1:])):
            rating[(u, i)] = r
    checked = 0
    for b in epoch_batches(SPEC, rated, train, 16, 0.3, 0.0, np.random.default_rng(0), CPU):
        for u, h, w in zip(b.users.tolist(), jagged(b.features, HISTORY), jagged_weights(b.features, HISTORY)):
            r = np.array([rating[(u, i)] for i in h])
            assert w == pytest.approx((r / r.sum()).tolist() if len(h) else [], rel=1e-6)
            checked += len(set(r.tolist())) > 1  # users whose weights differ from the plain mean
    assert checked > 10


def test_same_seed_same_batches_other_seed_differs(synthetic):
    def signature(batches):
        return [(b.users.tolist(), b.features.values().tolist(), b.features.lengths().tolist(), rows_of(b.targets)) for b in batches]

    a, b = signature(run_epoch(synthetic, seed=11)), signature(run_epoch(synthetic, seed=11))
    assert a == b
    assert signature(run_epoch(synthetic, seed=12)) != a


def test_user_id_dropout_routes_to_oov_row(synthetic):
    all_oov = run_epoch(synthetic, user_id_dropout=1.0)
    assert all(v == [SPEC.user_oov_index] for b in all_oov for v in jagged(b.features, USER_ID))
    some = [v[0] for b in run_epoch(synthetic, user_id_dropout=0.5) for v in jagged(b.features, USER_ID)]
    share = np.mean(np.array(some) == SPEC.user_oov_index)
    assert 0.3 < share < 0.7
