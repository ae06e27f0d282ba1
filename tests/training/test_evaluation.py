"""Full-ranking evaluation: hand-worked metric values, exclusion, ties, batching."""
from __future__ import annotations

import math

import numpy as np
import pytest

from features.content import to_csr
from training.evaluation import (
    as_csr,
    csr_from_pairs,
    evaluate_scores,
    popularity_scores,
    ranking_metrics,
    relevance_matrix,
    topk_from_scores,
)

log2 = math.log2
csr = to_csr  # CSR (indptr, indices) from a list of item lists, one per user




# Two users, five items, k = 3.
# user 0 scores -> ranking [3, 1, 4, 0, 2]; truth {0, 3}: top 3 = [3, 1, 4], hits at rank 1
# user 1 scores -> ranking [0, 1, 2, 3, 4]; truth {0, 2}: top 3 = [0, 1, 2], hits at ranks 1, 3
SCORES = np.array(
    [
        [0.2, 0.8, 0.1, 0.9, 0.5],
        [0.5, 0.4, 0.3, 0.2, 0.1],
    ],
    dtype=np.float32,
)
TRUTH = csr([[0, 3], [0, 2]])


def test_topk_orders_by_descending_score():
    top = topk_from_scores(SCORES, 3)
    assert top.dtype == np.int64
    np.testing.assert_array_equal(top, [[3, 1, 4], [0, 1, 2]])


def test_hand_worked_metrics():
    top = topk_from_scores(SCORES, 3)
    m = ranking_metrics(top, TRUTH, users=np.array([0, 1]), k=3, n_items=5)
    assert set(m) == {"ndcg@3", "precision@3", "recall@3", "map@3", "coverage"}

    # precision: user 0 = 1/3, user 1 = 2/3
    assert m["precision@3"] == pytest.approx((1 / 3 + 2 / 3) / 2)  # 0.5
    # recall: user 0 = 1/2, user 1 = 2/2
    assert m["recall@3"] == pytest.approx((1 / 2 + 2 / 2) / 2)  # 0.75
    # ndcg: |truth| = 2 for both, so IDCG = 1/log2(2) + 1/log2(3)
    idcg = 1 / log2(2) + 1 / log2(3)
    ndcg_u0 = (1 / log2(2)) / idcg  # hit at rank 1
    ndcg_u1 = (1 / log2(2) + 1 / log2(4)) / idcg  # hits at ranks 1 and 3
    assert m["ndcg@3"] == pytest.approx((ndcg_u0 + ndcg_u1) / 2)
    # map: user 0 = (P@1) / 2 = (1/1) / 2; user 1 = (P@1 + P@3) / 2 = (1/1 + 2/3) / 2
    assert m["map@3"] == pytest.approx((1 / 2 + (1 + 2 / 3) / 2) / 2)  # 2/3
    # coverage: lists {3, 1, 4} and {0, 1, 2} cover all 5 items
    assert m["coverage"] == pytest.approx(5 / 5)


def test_map_divides_by_number_of_relevant_items_and_ndcg_ideal_is_capped_at_k():
    # one user, truth {0, 1, 2, 3} (4 items), k = 2, top 2 = [0, 1]: both hits
    top = np.array([[0, 1]])
    m = ranking_metrics(top, csr([[0, 1, 2, 3]]), users=np.array([0]), k=2, n_items=6)
    assert m["map@2"] == pytest.approx((1 / 1 + 2 / 2) / 4)  # 0.5, not 1.0
    # IDCG over min(|truth|, k) = 2 ideal hits, which is exactly what we got
    assert m["ndcg@2"] == pytest.approx((1 / log2(2) + 1 / log2(3)) / (1 / log2(2) + 1 / log2(3)))
    assert m["recall@2"] == pytest.approx(2 / 4)
    assert m["precision@2"] == pytest.approx(2 / 2)
    assert m["coverage"] == pytest.approx(2 / 6)


def test_miss_everywhere_gives_zero():
    top = np.array([[4, 1, 3]])
    m = ranking_metrics(top, csr([[0, 2]]), users=np.array([0]), k=3, n_items=5)
    assert m["ndcg@3"] == m["precision@3"] == m["recall@3"] == m["map@3"] == 0.0


def test_users_without_truth_are_skipped():
    # user 2 has no truth item; adding its list changes nothing, coverage included
    truth = csr([[0, 3], [0, 2], []])
    with_empty = ranking_metrics(
        np.array([[3, 1, 4], [0, 1, 2], [7, 8, 9]]), truth, users=np.array([0, 1, 2]), k=3, n_items=10
    )
    without = ranking_metrics(np.array([[3, 1, 4], [0, 1, 2]]), truth, users=np.array([0, 1]), k=3, n_items=10)
    assert with_empty == without
    assert with_empty["precision@3"] == pytest.approx(0.5)  # (1/3 + 2/3) / 2, not / 3
    assert with_empty["coverage"] == pytest.approx(5 / 10)  # {0..4}; user 2's {7, 8, 9} not counted


def test_no_user_with_truth_raises():
    with pytest.raises(ValueError, match="no evaluated user"):
        ranking_metrics(np.array([[0, 1]]), csr([[]]), users=np.array([0]), k=2, n_items=3)


def test_users_map_topk_rows_to_truth_rows():
    # topk rows belong to users [1, 0] (reversed order)
    top = topk_from_scores(SCORES[::-1], 3)  # rows: user 1 ranking, then user 0 ranking
    m = ranking_metrics(top, TRUTH, users=np.array([1, 0]), k=3, n_items=5)
    assert m["precision@3"] == pytest.approx(0.5)
    assert m["map@3"] == pytest.approx(2 / 3)


def test_exclusion_removes_train_items():
    # user 0 saw item 3 (its best) and item 1 in training; user 1 saw item 0
    train = csr([[3, 1], [0]])
    top = topk_from_scores(SCORES, 3, exclude=train)
    # user 0 ranking [3, 1, 4, 0, 2] minus {3, 1} -> [4, 0, 2]; user 1 minus {0} -> [1, 2, 3]
    np.testing.assert_array_equal(top, [[4, 0, 2], [1, 2, 3]])
    assert not np.isin(top[0], [3, 1]).any()


def test_exclusion_does_not_modify_scores():
    before = SCORES.copy()
    topk_from_scores(SCORES, 2, exclude=csr([[3], [0]]))
    np.testing.assert_array_equal(SCORES, before)


def test_exclude_rows_maps_score_rows_to_users():
    # CSR over 3 users; the score rows are users [2, 0]
    train = csr([[3], [], [0, 1]])
    top = topk_from_scores(SCORES[[1, 0]], 2, exclude=train, exclude_rows=np.array([2, 0]))
    # row 0 (user 2): ranking [0, 1, 2, 3, 4] minus {0, 1} -> [2, 3]
    # row 1 (user 0): ranking [3, 1, 4, 0, 2] minus {3} -> [1, 4]
    np.testing.assert_array_equal(top, [[2, 3], [1, 4]])


def test_fewer_candidates_than_k_pads_with_minus_one():
    train = csr([[0, 1, 2]])
    top = topk_from_scores(np.array([[3.0, 2.0, 1.0, 0.5]]), 3, exclude=train)
    np.testing.assert_array_equal(top, [[3, -1, -1]])  # excluded items never come back


def test_ties_broken_by_lower_item_index():
    scores = np.array(
        [
            [1.0, 5.0, 1.0, 1.0, 5.0],  # two tied at the top, three tied across the k boundary
            [2.0, 2.0, 2.0, 2.0, 2.0],  # all tied (e.g. popularity of unseen items)
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(topk_from_scores(scores, 3), [[1, 4, 0], [0, 1, 2]])


def test_ties_match_full_lexicographic_sort():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(200, 50)).astype(np.float32)  # very many ties
    items = np.broadcast_to(np.arange(50), scores.shape)
    reference = np.lexsort((items, -scores), axis=1)[:, :7]  # by score desc, then index asc
    np.testing.assert_array_equal(topk_from_scores(scores, 7), reference)


def test_nan_scores_rank_last():
    top = topk_from_scores(np.array([[np.nan, 1.0, 0.0]]), 2)
    np.testing.assert_array_equal(top, [[1, 2]])


def test_k_out_of_range_raises():
    with pytest.raises(ValueError, match="k must be"):
        topk_from_scores(SCORES, 6)
    with pytest.raises(ValueError, match="k must be"):
        topk_from_scores(SCORES, 0)


def test_relevance_matrix_and_padding_never_hits():
    top = np.array([[3, 1, -1], [2, 0, 4]])
    hits = relevance_matrix(top, *TRUTH, rows=np.array([0, 1]))
    np.testing.assert_array_equal(hits, [[True, False, False], [True, True, False]])


def test_coverage_counts_distinct_items_across_lists():
    top = np.array([[0, 1], [1, 0], [0, 2]])  # distinct {0, 1, 2}
    m = ranking_metrics(top, csr([[0], [1], [2]]), users=np.array([0, 1, 2]), k=2, n_items=10)
    assert m["coverage"] == pytest.approx(3 / 10)


def test_coverage_ignores_padding():
    top = np.array([[3, -1, -1]])
    m = ranking_metrics(top, csr([[3]]), users=np.array([0]), k=3, n_items=4)
    assert m["coverage"] == pytest.approx(1 / 4)
    assert m["precision@3"] == pytest.approx(1 / 3)  # still divided by k


def _random_split(rng, n_users, n_items, n_train, n_test):
    train = csr_from_pairs(rng.integers(0, n_users, n_train), rng.integers(0, n_items, n_train), n_users)
    test = csr_from_pairs(rng.integers(0, n_users, n_test), rng.integers(0, n_items, n_test), n_users)
    return train, test


@pytest.mark.parametrize("batch_size", [1, 7, 64, 1024])
def test_batched_evaluation_equals_unbatched(batch_size):
    rng = np.random.default_rng(42)
    n_users, n_items, k = 60, 40, 5
    train, test = _random_split(rng, n_users, n_items, 600, 150)
    all_scores = rng.normal(size=(n_users, n_items)).astype(np.float32)
    users = np.arange(n_users)
    assert (np.diff(test[0]) == 0).any()  # some users have no test item

    seen_batches = []

    def score_fn(batch):
        seen_batches.append(batch.copy())
        return all_scores[batch]

    batched = evaluate_scores(score_fn, users, train, test, n_items, k=k, batch_size=batch_size)
    top = topk_from_scores(all_scores, k, exclude=train)
    unbatched = ranking_metrics(top, test, users, k=k, n_items=n_items)
    assert batched == unbatched  # identical, not just close
    assert max(len(b) for b in seen_batches) <= batch_size
    scored = np.concatenate(seen_batches)
    assert (np.diff(test[0])[scored] > 0).all()  # users without test items are never scored


def test_evaluate_scores_rejects_wrong_score_shape():
    with pytest.raises(ValueError, match="score_fn returned shape"):
        evaluate_scores(lambda u: np.zeros((len(u), 3)), np.array([0]), csr([[]]), csr([[1]]), n_items=5, k=2)


def test_popularity_baseline():
    # item counts over 3 training users: item 0 x3, item 2 x2, item 1 x1, items 3 and 4 x0
    train = csr([[0, 2], [0, 1, 2], [0]])
    pop = popularity_scores(train, n_items=5)
    assert pop.dtype == np.float32
    np.testing.assert_array_equal(pop, [3, 1, 2, 0, 0])

    test = csr([[1, 4], [3], [1]])
    score_fn = lambda users: np.broadcast_to(pop, (len(users), len(pop)))  # noqa: E731
    m = evaluate_scores(score_fn, np.arange(3), train, test, n_items=5, k=2)
    # user 0: ranking [0, 2, 1, 3, 4] minus {0, 2} -> [1, 3]: hit at rank 1, |truth| = 2
    # user 1: minus {0, 1, 2} -> [3, 4]: hit at rank 1, |truth| = 1
    # user 2: minus {0} -> [2, 1]: hit at rank 2, |truth| = 1
    assert m["precision@2"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 2) / 3)
    assert m["recall@2"] == pytest.approx((1 / 2 + 1 / 1 + 1 / 1) / 3)
    assert m["map@2"] == pytest.approx((1 / 2 + 1 / 1 + (1 / 2) / 1) / 3)
    ndcg_u0 = (1 / log2(2)) / (1 / log2(2) + 1 / log2(3))  # IDCG over min(2, 2) hits
    ndcg_u1 = (1 / log2(2)) / (1 / log2(2))
    ndcg_u2 = (1 / log2(3)) / (1 / log2(2))
    assert m["ndcg@2"] == pytest.approx((ndcg_u0 + ndcg_u1 + ndcg_u2) / 3)
    assert m["coverage"] == pytest.approx(4 / 5)  # {1, 3, 4, 2}


def test_csr_from_pairs_drops_duplicates_and_sorts():
    indptr, indices = csr_from_pairs(np.array([1, 0, 1, 1]), np.array([4, 2, 0, 4]), n_rows=3)
    np.testing.assert_array_equal(indptr, [0, 1, 3, 3])
    np.testing.assert_array_equal(indices, [2, 0, 4])


def test_accepts_scipy_csr():
    sparse = pytest.importorskip("scipy.sparse")
    matrix = sparse.csr_matrix(np.array([[1, 0, 0, 1, 0], [1, 0, 1, 0, 0]]))
    indptr, indices = as_csr(matrix)
    np.testing.assert_array_equal(indptr, TRUTH[0])
    np.testing.assert_array_equal(indices, TRUTH[1])
    m = ranking_metrics(topk_from_scores(SCORES, 3), matrix, users=np.array([0, 1]), k=3, n_items=5)
    assert m["map@3"] == pytest.approx(2 / 3)
