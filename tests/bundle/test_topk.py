"""Exact top-k retrieval against a hand-made item matrix."""
from __future__ import annotations

import numpy as np
import pytest

from bundle.topk import ExactTopK, TopK, build_index

# 4 items in 2-D. For the query [1, 0] the scores are the first coordinates:
# item 0: 1.0, item 1: 3.0, item 2: -1.0, item 3: 2.0  -> ranking [1, 3, 0, 2]
# For the query [0, 1] the scores are the second coordinates:
# item 0: 0.5, item 1: 0.0, item 2: 4.0, item 3: -2.0  -> ranking [2, 0, 1, 3]
ITEMS = np.array([[1.0, 0.5], [3.0, 0.0], [-1.0, 4.0], [2.0, -2.0]], dtype=np.float32)
Q_X = [1.0, 0.0]
Q_Y = [0.0, 1.0]


def test_build_index_returns_a_topk():
    index = build_index(ITEMS)
    assert isinstance(index, ExactTopK)
    assert len(index) == 4
    _: TopK = index  # satisfies the protocol (checked by type checkers)


def test_unknown_kind_names_it():
    with pytest.raises(ValueError, match="'annoy'"):
        build_index(ITEMS, kind="annoy")


def test_ordering_and_scores():
    scores, items = build_index(ITEMS).search(np.array([Q_X]), k=3)
    assert scores.dtype == np.float32 and items.dtype == np.int64
    np.testing.assert_array_equal(items, [[1, 3, 0]])
    np.testing.assert_allclose(scores, [[3.0, 2.0, 1.0]])


def test_batch_of_queries():
    # third query [1, 1]: sums 1.5, 3.0, 3.0, 0.0 -> ranking [1, 2, 0, 3] (tie 1/2 -> lower index first)
    scores, items = build_index(ITEMS).search(np.array([Q_X, Q_Y, [1.0, 1.0]]), k=2)
    np.testing.assert_array_equal(items, [[1, 3], [2, 0], [1, 2]])
    np.testing.assert_allclose(scores, [[3.0, 2.0], [4.0, 0.5], [3.0, 3.0]])


def test_exclusion_per_query():
    index = build_index(ITEMS)
    scores, items = index.search(np.array([Q_X, Q_Y]), k=2, exclude=[np.array([1]), np.array([], dtype=np.int64)])
    np.testing.assert_array_equal(items, [[3, 0], [2, 0]])  # item 1 gone for query 0 only
    np.testing.assert_allclose(scores, [[2.0, 1.0], [4.0, 0.5]])


def test_exclusion_leaving_fewer_than_k_pads():
    scores, items = build_index(ITEMS).search(np.array([Q_X]), k=3, exclude=[np.array([0, 1, 3])])
    np.testing.assert_array_equal(items, [[2, -1, -1]])
    assert scores[0, 0] == pytest.approx(-1.0)
    assert np.isneginf(scores[0, 1:]).all()


def test_k_larger_than_item_count_pads():
    scores, items = build_index(ITEMS).search(np.array([Q_Y]), k=6)
    assert items.shape == scores.shape == (1, 6)
    np.testing.assert_array_equal(items, [[2, 0, 1, 3, -1, -1]])
    np.testing.assert_allclose(scores[0, :4], [4.0, 0.5, 0.0, -2.0])
    assert np.isneginf(scores[0, 4:]).all()


def test_matches_brute_force_sort_on_random_data():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(8, 16)).astype(np.float32)
    scores, top = build_index(items).search(queries, k=10)
    full = queries @ items.T
    np.testing.assert_array_equal(top, np.argsort(-full, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(full, top, axis=1))


def test_invalid_inputs():
    index = build_index(ITEMS)
    with pytest.raises(ValueError, match="queries must have shape"):
        index.search(np.array([1.0, 0.0]), k=1)  # 1-D
    with pytest.raises(ValueError, match="queries must have shape"):
        index.search(np.zeros((1, 3)), k=1)  # wrong dim
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.array([Q_X]), k=0)
    with pytest.raises(ValueError, match="outside"):
        index.search(np.array([Q_X]), k=1, exclude=[np.array([-1])])
    with pytest.raises(ValueError, match="entries for 1 queries"):
        index.search(np.array([Q_X]), k=1, exclude=[np.array([0]), np.array([1])])


def test_empty_batch():
    scores, items = build_index(ITEMS).search(np.zeros((0, 2), dtype=np.float32), k=2)
    assert scores.shape == items.shape == (0, 2)


def test_one_query_takes_the_1d_path_with_the_batched_answer():
    """A batch of one (the usual one at moderate load) is answered in 1-D: same items, same scores
    (bit for bit) as the batched path, exclusions, padding and ties included."""
    rng = np.random.default_rng(3)
    items = rng.normal(size=(300, 8)).astype(np.float32)
    items[10] = items[11]  # a tie: the lower index first on both paths
    index = ExactTopK(items)
    for trial in range(200):
        query = rng.normal(size=(1, 8)).astype(np.float32)
        exclude = [rng.choice(300, int(rng.integers(0, 300)), replace=False)]
        k = int(rng.integers(1, 40))
        one = index.search(query, k, exclude)
        many = index._search_many(query, k, exclude)
        assert np.array_equal(one[0], many[0]) and np.array_equal(one[1], many[1]), trial
    with pytest.raises(ValueError, match="outside"):
        index.search(query, 3, [np.array([300])])
