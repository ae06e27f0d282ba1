"""CSR helpers and the KJT batching of training/data.py, on hand-made CSRs and a tiny synthetic set."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from features.config import SyntheticConfig
from features.splits import user_items_csr
from features.synthetic import generate
from training.data import csr_from_mask, csr_union, epoch_batches, gather_rows, item_features, user_features
from training.model import GENRES, HISTORY, ITEM_ID, USER_ID, TowerSpec

CPU = torch.device("cpu")


def csr(rows: list[list[int]]):
    indptr = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    return indptr, np.array([i for r in rows for i in r], dtype=np.int64)


def rows_of(c) -> list[list[int]]:
    indptr, indices = c
    return [indices[indptr[u] : indptr[u + 1]].tolist() for u in range(len(indptr) - 1)]


def jagged(kjt, key: str) -> list[list[int]]:
    return [t.tolist() for t in kjt[key].to_dense()]


# rows: 0 -> [7, 8], 1 -> [], 2 -> [1, 2, 3], 3 -> [5]
TOY = csr([[7, 8], [], [1, 2, 3], [5]])


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


def test_csr_from_mask_keeps_rows():
    # entries in order: 7, 8 | - | 1, 2, 3 | 5
    keep = np.array([True, False, False, True, True, False])
    out = csr_from_mask(TOY, keep)
    assert out[0].tolist() == [0, 1, 1, 3, 3]  # 4 rows preserved, row 3 became empty
    assert rows_of(out) == [[7], [], [2, 3], []]
    # complement: the two parts partition every row
    rest = csr_from_mask(TOY, ~keep)
    assert rows_of(rest) == [[8], [], [1], [5]]


def test_csr_union_rowwise_with_duplicates_once():
    a = csr([[1, 3], [], [2], []])
    b = csr([[3, 4], [5], [], []])
    out = csr_union(a, b)
    assert out[0].tolist() == [0, 3, 4, 5, 5]
    assert rows_of(out) == [[1, 3, 4], [5], [2], []]
    assert out[0].dtype == np.int64 and out[1].dtype == np.int64


def test_csr_union_of_empty_matrices():
    empty = csr([[], []])
    out = csr_union(empty, empty)
    assert out[0].tolist() == [0, 0, 0] and out[1].tolist() == []


# -- feature KJTs ----------------------------------------------------------------------------
def test_user_features_layout_and_oov_override():
    spec = TowerSpec(n_users=4, n_items=10, n_genres=2, use_user_id=True)
    f = user_features(spec, np.array([2, 1, 0]), TOY, CPU)
    assert f.keys() == [HISTORY, USER_ID]
    assert jagged(f, HISTORY) == [[1, 2, 3], [], [7, 8]]
    assert jagged(f, USER_ID) == [[2], [1], [0]]
    assert f.values().dtype == torch.int64
    f = user_features(spec, np.array([2, 1]), TOY, CPU, user_index=np.array([spec.user_oov_index, 1]))
    assert jagged(f, USER_ID) == [[4], [1]]  # 4 = n_users = the OOV row
    no_id = user_features(TowerSpec(n_users=4, n_items=10, n_genres=2, use_user_id=False), np.array([3]), TOY, CPU)
    assert no_id.keys() == [HISTORY] and jagged(no_id, HISTORY) == [[5]]


def test_item_features_lengths_and_values():
    spec = TowerSpec(n_users=1, n_items=4, n_genres=3, use_genres=True)
    genres = [(0,), (1, 2), (), (0, 1, 2)]
    f = item_features(spec, genres, CPU)
    assert f.keys() == [ITEM_ID, GENRES]
    assert f[ITEM_ID].lengths().tolist() == [1, 1, 1, 1] and f[ITEM_ID].values().tolist() == [0, 1, 2, 3]
    assert f[GENRES].lengths().tolist() == [1, 2, 0, 3]
    assert f[GENRES].values().tolist() == [0, 1, 2, 0, 1, 2]
    sub = item_features(spec, genres, CPU, items=np.array([3, 1]))
    assert jagged(sub, ITEM_ID) == [[3], [1]] and jagged(sub, GENRES) == [[0, 1, 2], [1, 2]]
    plain = item_features(TowerSpec(n_users=1, n_items=4, n_genres=3, use_genres=False), genres, CPU)
    assert plain.keys() == [ITEM_ID] and plain.values().tolist() == [0, 1, 2, 3]


# -- epoch batches -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_csr():
    ds = generate(SyntheticConfig(n_users=70, n_items=50, n_genres=4, mean_interactions_per_user=12, seed=5))
    full = user_items_csr(ds.interactions, ds.n_users, ds.n_items)
    # edge cases: users 3 and 7 lose every item (must not appear), user 5 keeps one item
    # (must still get it as a target, so its history is empty)
    rows = np.repeat(np.arange(ds.n_users), np.diff(full[0]))
    keep = ~np.isin(rows, [3, 7])
    first_of_5 = full[0][5]
    keep[(rows == 5) & (np.arange(len(rows)) != first_of_5)] = False
    return csr_from_mask(full, keep)


SPEC = TowerSpec(n_users=70, n_items=50, n_genres=4, use_user_id=True)


def run_epoch(train, seed=0, batch_size=16, history_dropout=0.3, user_id_dropout=0.0):
    return list(epoch_batches(SPEC, train, batch_size, history_dropout, user_id_dropout, np.random.default_rng(seed), CPU))


def test_every_user_with_items_appears_exactly_once(train_csr):
    batches = run_epoch(train_csr)
    users = np.concatenate([b.users for b in batches])
    with_items = np.flatnonzero(np.diff(train_csr[0]) > 0)
    assert 3 not in users and 7 not in users and 5 in users
    assert sorted(users.tolist()) == with_items.tolist()  # each exactly once
    assert [len(b.users) for b in batches[:-1]] == [16] * (len(batches) - 1)
    assert 1 <= len(batches[-1].users) <= 16
    assert len(batches) == -(-len(with_items) // 16)
    assert not np.array_equal(users, np.sort(users))  # shuffled


def test_history_and_targets_partition_each_users_items(train_csr):
    n_hidden = n_total = 0
    for b in run_epoch(train_csr):
        history = jagged(b.features, HISTORY)
        targets = rows_of(b.targets)
        assert len(history) == len(targets) == len(b.users)
        assert jagged(b.features, USER_ID) == [[u] for u in b.users.tolist()]  # no id dropout
        for u, h, t in zip(b.users.tolist(), history, targets):
            indptr, indices = train_csr
            own = set(indices[indptr[u] : indptr[u + 1]].tolist())
            assert len(t) >= 1, f"user {u} has no target"
            assert set(t) <= own, f"user {u}: target not among its items"
            assert set(h) <= own
            assert not set(h) & set(t), f"user {u}: item both in history and target"
            assert set(h) | set(t) == own  # nothing lost: each item is input or target
            n_hidden, n_total = n_hidden + len(t), n_total + len(own)
            if u == 5:
                assert h == [] and len(t) == 1
    # ~history_dropout = 0.3 of the items are hidden (a bit more: users forced to have one target)
    assert 0.24 < n_hidden / n_total < 0.40


def test_same_seed_same_batches_other_seed_differs(train_csr):
    def signature(batches):
        return [(b.users.tolist(), b.features.values().tolist(), b.features.lengths().tolist(), rows_of(b.targets)) for b in batches]

    a, b = signature(run_epoch(train_csr, seed=11)), signature(run_epoch(train_csr, seed=11))
    assert a == b
    assert signature(run_epoch(train_csr, seed=12)) != a


def test_user_id_dropout_routes_to_oov_row(train_csr):
    all_oov = run_epoch(train_csr, user_id_dropout=1.0)
    assert all(v == [SPEC.user_oov_index] for b in all_oov for v in jagged(b.features, USER_ID))
    some = [v[0] for b in run_epoch(train_csr, user_id_dropout=0.5) for v in jagged(b.features, USER_ID)]
    share = np.mean(np.array(some) == SPEC.user_oov_index)
    assert 0.3 < share < 0.7
