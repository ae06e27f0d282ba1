"""Split protocols: hand-worked small cases, determinism, and row conservation."""
import numpy as np
import pytest

from features.config import SplitConfig, SyntheticConfig
from features.schema import Interactions
from features.splits import given_split, leave_last_n, split, stratified_split, user_items_csr
from features.synthetic import generate


def make(user, item, ts=None):
    n = len(user)
    ts = np.arange(n) if ts is None else ts
    return Interactions(np.array(user, np.int64), np.array(item, np.int64), np.ones(n, np.float32), np.array(ts, np.int64))


def rows(inter):
    """Multiset of rows as sorted tuples, to check nothing is lost or duplicated."""
    return sorted(zip(inter.user.tolist(), inter.item.tolist(), inter.timestamp.tolist()))


@pytest.fixture(scope="module")
def synth():
    return generate(SyntheticConfig(n_users=300, n_items=200, seed=1)).interactions


def test_stratified_counts_per_group_hand_worked():
    # item groups of size 1, 2, 3, 4, 6; ratio 0.75 -> round(0.75, 1.5, 2.25, 3, 4.5) = 1, 2, 2, 3, 4
    # (round half to even, as Python's round in the Recommenders implementation), at least 1 each.
    sizes = [1, 2, 3, 4, 6]
    items = np.repeat(np.arange(5), sizes)
    inter = make(np.arange(len(items)), items)
    train, test = stratified_split(inter, ratio=0.75, by="item", seed=42)
    assert np.bincount(train.item, minlength=5).tolist() == [1, 2, 2, 3, 4]
    assert np.bincount(test.item, minlength=5).tolist() == [0, 0, 1, 1, 2]
    assert rows(Interactions.concat([train, test])) == rows(inter)
    assert np.all(np.diff(train.user) > 0) and np.all(np.diff(test.user) > 0)  # original row order kept
    train, test = stratified_split(inter, ratio=0.3, by="item", seed=0)  # round(0.3) = 0 -> still 1
    assert np.bincount(train.item, minlength=5).tolist() == [1, 1, 1, 1, 2]


def test_stratified_by_user_and_item_on_synthetic(synth):
    for by, key in (("item", "item"), ("user", "user")):
        train, test = stratified_split(synth, ratio=0.75, by=by, seed=42)
        sizes = np.bincount(getattr(synth, key))
        expected = np.where(sizes > 0, np.maximum(1, np.round(0.75 * sizes)), 0)
        assert np.array_equal(np.bincount(getattr(train, key), minlength=len(sizes)), expected)
        assert rows(Interactions.concat([train, test])) == rows(synth)
    share = len(train) / len(synth)
    assert 0.73 < share < 0.77


def test_stratified_deterministic_by_seed(synth):
    a, _ = stratified_split(synth, seed=7)
    b, _ = stratified_split(synth, seed=7)
    c, _ = stratified_split(synth, seed=8)
    assert rows(a) == rows(b) and rows(a) != rows(c)


def test_leave_last_n_hand_worked():
    # user 0: ts 5, 1, 3 -> newest is row 0; user 1: one row -> stays in train;
    # user 2: two rows tied at ts 7 -> the later row (5) is the newest.
    inter = make([0, 0, 0, 1, 2, 2], [10, 11, 12, 13, 14, 15], ts=[5, 1, 3, 9, 7, 7])
    train, test = leave_last_n(inter, n=1)
    assert test.item.tolist() == [10, 15]
    assert train.item.tolist() == [11, 12, 13, 14]
    train, test = leave_last_n(inter, n=2)
    assert sorted(test.item.tolist()) == [10, 12]  # user 2 has only 2 rows: all stay in train
    assert sorted(train.item.tolist()) == [11, 13, 14, 15]


def test_leave_last_n_picks_latest_on_synthetic(synth):
    train, test = leave_last_n(synth, n=2)
    assert len(test) == 2 * len(np.unique(synth.user))  # every synthetic user has >= 5 rows
    for u in (0, 17, 123):
        last_train = train.timestamp[train.user == u].max()
        assert np.all(test.timestamp[test.user == u] > last_train)
    assert rows(Interactions.concat([train, test])) == rows(synth)


def test_split_stratified_with_validation(synth):
    s = split(synth, SplitConfig(protocol="stratified", ratio=0.75, by="item", seed=3, val_fraction=0.2))
    assert rows(Interactions.concat([s.train, s.val, s.test])) == rows(synth)
    sizes = np.bincount(synth.item, minlength=200)
    full = np.where(sizes > 0, np.maximum(1, np.round(0.75 * sizes)), 0)
    kept = np.where(full > 0, np.maximum(1, np.round(0.8 * full)), 0)
    assert np.array_equal(np.bincount(s.train.item, minlength=200), kept)
    assert np.array_equal(np.bincount(s.val.item, minlength=200), full - kept)
    again = split(synth, SplitConfig(protocol="stratified", ratio=0.75, by="item", seed=3, val_fraction=0.2))
    assert rows(again.val) == rows(s.val)
    assert split(synth, SplitConfig(val_fraction=0)).val is None


def test_split_leave_last_n_with_validation(synth):
    s = split(synth, SplitConfig(protocol="leave_last_n", n=1, val_fraction=0.1))
    assert rows(Interactions.concat([s.train, s.val, s.test])) == rows(synth)
    n_users = len(np.unique(synth.user))
    assert len(s.test) == n_users and len(s.val) == n_users
    for u in (0, 50, 299):
        assert s.train.timestamp[s.train.user == u].max() < s.val.timestamp[s.val.user == u][0]
        assert s.val.timestamp[s.val.user == u][0] < s.test.timestamp[s.test.user == u][0]


def test_user_items_csr_hand_worked():
    inter = make([2, 0, 2, 2, 0], [3, 1, 0, 3, 1])
    indptr, indices = user_items_csr(inter, n_users=4, n_items=5)
    assert indptr.tolist() == [0, 1, 1, 3, 3]
    assert indices.tolist() == [1, 0, 3]
    with pytest.raises(ValueError, match="out of range"):
        user_items_csr(inter, n_users=2, n_items=5)


def test_given_split_hand_worked():
    # timestamps 0 = the data's train part, 1 = its test part (features/lines.py marks them so)
    inter = make([0, 0, 1, 1, 2, 2], [10, 11, 12, 13, 14, 15], ts=[0, 1, 0, 0, 1, 0])
    train, test = given_split(inter)
    assert train.item.tolist() == [10, 12, 13, 15] and test.item.tolist() == [11, 14]
    s = split(inter, SplitConfig(protocol="given", val_fraction=0))
    assert rows(s.train) == rows(train) and rows(s.test) == rows(test) and s.val is None


def test_given_split_carves_validation_like_stratified(synth):
    marked = Interactions(synth.user, synth.item, synth.rating, (np.arange(len(synth)) % 4 == 0).astype(np.int64))  # every 4th row: test
    s = split(marked, SplitConfig(protocol="given", val_fraction=0.2, seed=3))
    assert rows(s.test) == rows(marked.take(marked.timestamp == 1))
    train, val = stratified_split(marked.take(marked.timestamp == 0), 0.8, "item", 4)
    assert rows(s.train) == rows(train) and rows(s.val) == rows(val)
    assert rows(Interactions.concat([s.train, s.val, s.test])) == rows(marked)


def test_given_split_refuses_data_without_a_fixed_test_part(synth):
    for inter in (synth, make([0, 1], [1, 2], ts=[0, 0])):  # real timestamps; no test row
        with pytest.raises(ValueError, match="split.protocol: 'given' needs data published with a fixed test part"):
            split(inter, SplitConfig(protocol="given"))
