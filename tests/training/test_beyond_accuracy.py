"""Beyond-accuracy / fairness metrics: every expected value is worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from features.content import to_csr
from training.beyond import (
    age_bucket,
    average_popularity,
    beyond_accuracy_report,
    coverage,
    exposure_by_popularity_decile,
    exposure_gini,
    genre_calibration_kl,
    genres_multi_hot,
    group_ndcg,
    intra_list_diversity_embeddings,
    intra_list_diversity_genres,
    novelty,
    per_user_ndcg,
)
from training.evaluation import ranking_metrics, topk_from_scores

log2 = math.log2
csr = to_csr  # CSR (indptr, indices) from a list of item lists, one per user




# Five items, two lists of k = 3; the second list has one padded slot.
TOPK = np.array([[0, 1, 2], [0, 3, -1]])
N_ITEMS = 5
ITEM_POP = np.array([4, 2, 1, 0, 3])  # users per item, out of N_USERS
N_USERS = 4
# genres: item 0 {0}, item 1 {0, 1}, item 2 {2}, item 3 {} (none), item 4 {1, 2}
GENRES = [(0,), (0, 1), (2,), (), (1, 2)]
HOT = genres_multi_hot(GENRES, 3)
# unit vectors in 2-D
VECTORS = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0], [0.8, 0.6]])


def test_genres_multi_hot():
    expected = np.array(
        [[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=bool
    )
    np.testing.assert_array_equal(HOT, expected)


def test_coverage_counts_distinct_items_and_ignores_padding():
    # distinct recommended {0, 1, 2, 3} (0 twice, -1 ignored) -> 4 / 5
    assert coverage(TOPK, N_ITEMS) == pytest.approx(0.8)
    # refuses items outside the catalogue
    with pytest.raises(ValueError):
        coverage(np.array([[5]]), N_ITEMS)


def test_novelty_self_information_with_zero_pop_smoothing():
    # slots 0, 1, 2, 0, 3 -> p = 4/4, 2/4, 1/4, 4/4, (pop 0 -> 1/(4+1))
    # -log2 p = 0, 1, 2, 0, log2(5); mean = (3 + log2 5) / 5 ≈ 1.0644
    expected = (0 + 1 + 2 + 0 + log2(5)) / 5
    assert novelty(TOPK, ITEM_POP, N_USERS) == pytest.approx(expected)
    # the smoothed unseen item is more novel than an item seen once (log2 5 > log2 4)
    assert novelty(np.array([[3]]), ITEM_POP, N_USERS) > novelty(np.array([[2]]), ITEM_POP, N_USERS)
    with pytest.raises(ValueError):
        novelty(TOPK, ITEM_POP, n_users=3)  # item 0 has 4 users out of 3


def test_average_popularity_means_per_list_then_over_lists():
    # list 0: (4 + 2 + 1) / 3 = 7/3; list 1: (4 + 0) / 2 = 2 (padding not counted)
    # ARP = (7/3 + 2) / 2 = 13/6 ≈ 2.1667 (a flat mean of the 5 slots would be 11/5)
    assert average_popularity(TOPK, ITEM_POP) == pytest.approx(13 / 6)


def test_exposure_gini_over_all_items():
    # exposure counts: item 0: 2, items 1, 2, 3: 1, item 4: 0 -> sorted x = [0, 1, 1, 1, 2]
    # n = 5, sum x = 5, weights 2i - n - 1 = -4, -2, 0, 2, 4
    # G = (0 - 2 + 0 + 2 + 8) / (5 * 5) = 8 / 25 = 0.32
    assert exposure_gini(TOPK, N_ITEMS) == pytest.approx(0.32)
    # every item shown once -> 0; one item takes all slots of 4 items -> (4 - 1) / 4
    assert exposure_gini(np.array([[0, 1], [2, 3]]), 4) == pytest.approx(0.0)
    assert exposure_gini(np.array([[2, -1], [2, -1]]), 4) == pytest.approx(0.75)


def test_ild_genres_jaccard_distance():
    # list 0 [0, 1, 2]: {0}-{0,1}: J = 1/2 -> 0.5; {0}-{2}: 1; {0,1}-{2}: 1 -> mean 2.5/3
    # list 1 [0, 3]: {0}-{}: |∩| = 0, |∪| = 1, J = 0 -> 1 -> mean 1
    # ILD = (2.5/3 + 1) / 2 = 11/12
    assert intra_list_diversity_genres(TOPK, HOT) == pytest.approx(11 / 12)


def test_ild_genres_both_empty_is_distance_zero_and_short_lists_skipped():
    hot = np.array([[False, False], [False, False], [True, False]])
    # list [0, 1, 2]: {}-{}: 0 (same); {}-{0}: 1; {}-{0}: 1 -> 2/3
    # list [2, -1, -1] has no pair and is left out of the mean
    topk = np.array([[0, 1, 2], [2, -1, -1]])
    assert intra_list_diversity_genres(topk, hot) == pytest.approx(2 / 3)
    assert math.isnan(intra_list_diversity_genres(np.array([[2, -1]]), hot))


def test_ild_embeddings_cosine_distance():
    # list 0 [0, 1, 2]: cos(0,1) = 0 -> 1; cos(0,2) = 0.6 -> 0.4; cos(1,2) = 0.8 -> 0.2 -> 1.6/3
    # list 1 [0, 3]: cos = -1 -> 2
    # ILD = (1.6/3 + 2) / 2 = 19/15 ≈ 1.2667
    assert intra_list_diversity_embeddings(TOPK, VECTORS) == pytest.approx(19 / 15)


# Calibration: three users; user 2's history has no genre and is skipped.
CAL_TOPK = np.array([[0, 1, 2], [0, 3, -1], [1, 2, 4]])
CAL_HISTORY = [[0, 1], [2, 4], [3]]
# user 0: p from {0}, {0,1}: g0 = 1 + 0.5, g1 = 0.5 -> p = [0.75, 0.25, 0]
#         q from {0}, {0,1}, {2}: [1.5, 0.5, 1] / 3 = [1/2, 1/6, 1/3]
#         q~ = 0.99 q + 0.01 p = [0.495 + 0.0075, 0.165 + 0.0025, 0.33] = [0.5025, 0.1675, 0.33]
#         KL = 0.75 ln(0.75/0.5025) + 0.25 ln(0.25/0.1675); both ratios = 1.49254 -> ln(0.75/0.5025)
# user 1: p from {2}, {1,2}: g1 = 0.5, g2 = 1.5 -> p = [0, 0.25, 0.75]
#         q from {0}, {} (item 3 adds nothing): [1, 0, 0]
#         q~ = [0.99, 0.0025, 0.0075] -> KL = 0.25 ln(100) + 0.75 ln(100) = ln(1/alpha) = ln 100
CAL_EXPECTED = (math.log(0.75 / 0.5025) + math.log(100)) / 2  # ≈ 2.5028


def test_genre_calibration_kl_steck():
    history = csr(CAL_HISTORY)
    assert genre_calibration_kl(CAL_TOPK, history, HOT, alpha=0.01) == pytest.approx(CAL_EXPECTED)


def test_genre_calibration_kl_maps_rows_to_users():
    # same lists, history rows stored in another order: user u is now CSR row perm[u]
    perm = np.array([2, 0, 1])
    rows = [None] * 3
    for u, r in enumerate(perm):
        rows[r] = CAL_HISTORY[u]
    got = genre_calibration_kl(CAL_TOPK, csr(rows), HOT, users=perm, alpha=0.01)
    assert got == pytest.approx(CAL_EXPECTED)


def test_genre_calibration_kl_perfect_list_is_zero_and_alpha_checked():
    # list genres == history genres -> q = p -> q~ = p -> KL = 0
    assert genre_calibration_kl(np.array([[0, 1]]), csr([[1, 0]]), HOT) == pytest.approx(0.0)
    # only genre-less histories -> undefined
    assert math.isnan(genre_calibration_kl(np.array([[0, 1]]), csr([[3]]), HOT))
    with pytest.raises(ValueError):
        genre_calibration_kl(CAL_TOPK, csr(CAL_HISTORY), HOT, alpha=0.0)


# NDCG per user, same data as test_evaluation: k = 3
# user 0: top [3, 1, 4], truth {0, 3}: DCG = 1, IDCG = 1 + 1/log2 3 -> 1 / 1.63093 ≈ 0.61315
# user 1: top [0, 1, 2], truth {0, 2}: DCG = 1 + 1/log2 4 = 1.5 -> 1.5 / 1.63093 ≈ 0.91972
# user 2: no truth -> NaN
NDCG_TOPK = np.array([[3, 1, 4], [0, 1, 2], [0, 1, 2]])
NDCG_TRUTH = csr([[0, 3], [0, 2], []])
IDCG2 = 1 + 1 / log2(3)
NDCG0, NDCG1 = 1 / IDCG2, 1.5 / IDCG2


def test_per_user_ndcg_hand_values():
    got = per_user_ndcg(NDCG_TOPK, NDCG_TRUTH, np.array([0, 1, 2]), k=3)
    np.testing.assert_allclose(got[:2], [NDCG0, NDCG1])
    assert math.isnan(got[2])


def test_per_user_ndcg_mean_equals_ranking_metrics():
    rng = np.random.default_rng(0)
    n_users, n_items, k = 40, 30, 5
    scores = rng.normal(size=(n_users, n_items))
    train_items = [rng.choice(n_items, size=rng.integers(0, 27), replace=False) for _ in range(n_users)]
    train = csr([sorted(t.tolist()) for t in train_items])
    test = csr([sorted(rng.choice(n_items, size=rng.integers(0, 4), replace=False).tolist()) for _ in range(n_users)])
    users = rng.permutation(n_users)
    topk = topk_from_scores(scores[users], k, exclude=train, exclude_rows=users)  # some rows padded with -1
    assert (topk == -1).any() and (np.diff(test[0]) == 0).any()  # the edge cases are exercised
    ndcg = per_user_ndcg(topk, test, users, k)
    expected = ranking_metrics(topk, test, users, k, n_items)[f"ndcg@{k}"]
    assert np.nanmean(ndcg) == pytest.approx(expected, rel=1e-12)
    assert np.isnan(ndcg).sum() == (np.diff(test[0])[users] == 0).sum()


def test_group_ndcg_means_and_gap():
    per_user = np.array([1.0, 0.5, 0.0, np.nan])
    groups = np.array(["F", "M", "M", "F"])
    # F: mean(1.0) = 1.0 (NaN dropped); M: (0.5 + 0) / 2 = 0.25; gap = 0.75
    by_group, gap = group_ndcg(per_user, groups)
    assert by_group == pytest.approx({"F": 1.0, "M": 0.25})
    assert gap == pytest.approx(0.75)
    # a single group has no gap
    assert group_ndcg(per_user, np.array(["x"] * 4))[1] == 0.0


def test_exposure_by_popularity_decile_ordered_by_popularity():
    # 20 items, item i has popularity 19 - i -> ascending order 19, 18, ..., 0, two per decile:
    # item 19 -> decile 0, item 2 (rank 17) -> decile 8, items 0, 1 -> decile 9
    item_pop = 19 - np.arange(20)
    topk = np.array([[0, 1, 19], [2, -1, -1]])  # 4 real slots
    expected = np.zeros(10)
    expected[[0, 8, 9]] = [1 / 4, 1 / 4, 2 / 4]
    np.testing.assert_allclose(exposure_by_popularity_decile(topk, item_pop), expected)


def test_exposure_by_popularity_decile_ties_by_index_and_uneven_split():
    # 12 equally popular items: order by index; array_split -> sizes 2, 2, 1, 1, ..., 1
    # deciles: items {0,1} -> 0, {2,3} -> 1, {4} -> 2, ..., {11} -> 9
    item_pop = np.zeros(12)
    topk = np.array([[0, 1, 2, 4, 11]])  # deciles 0, 0, 1, 2, 9
    expected = np.zeros(10)
    expected[[0, 1, 2, 9]] = [2 / 5, 1 / 5, 1 / 5, 1 / 5]
    shares = exposure_by_popularity_decile(topk, item_pop)
    np.testing.assert_allclose(shares, expected)
    assert shares.sum() == pytest.approx(1.0)


def test_age_bucket_movielens_1m():
    ages = np.array([-1, 1, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 80])
    expected = [
        "unknown", "<18", "<18", "18-24", "18-24", "25-34", "25-34", "35-44", "35-44",
        "45-49", "45-49", "50-55", "50-55", "56+", "56+",
    ]
    assert age_bucket(ages).tolist() == expected


def test_beyond_accuracy_report_keys_and_group_labels_at_user_rows():
    # row 0 is user 1, row 1 is user 0 (swapped on purpose)
    topk = np.array([[3, 1, 4], [0, 1, 2]])
    users = np.array([1, 0])
    truth = csr([[0, 2], [0, 3]])  # row 0 (user 1): truth {0, 3} -> NDCG0; row 1 (user 0): {0, 2} -> NDCG1
    history = csr([[4], [2], [], []])  # 2 of 4 users have a history -> novelty's n_users = 2
    item_pop = np.array([2, 1, 1, 0, 2])
    gender = np.array(["F", "M", "F", "M"])  # user 0: F, user 1: M
    age = age_bucket(np.array([20, 40, -1, 60]))
    report = beyond_accuracy_report(
        topk, users, history, truth, 3, item_pop, HOT, VECTORS, {"gender": gender, "age": age}
    )
    expected_keys = {
        "coverage", "novelty", "ild_genre", "ild_embedding", "arp", "exposure_gini", "calibration_kl",
        "ndcg@3/gender=F", "ndcg@3/gender=M", "ndcg@3/gender_max_gap",
        "ndcg@3/age=18-24", "ndcg@3/age=35-44", "ndcg@3/age_max_gap",
        *(f"exposure_decile_{d}" for d in range(10)),
    }
    assert set(report) == expected_keys
    assert all(isinstance(v, float) for v in report.values())
    # labels are read at groups[users]: user 0 (row 1) is F and 18-24, user 1 (row 0) is M and 35-44
    assert report["ndcg@3/gender=F"] == pytest.approx(NDCG1)
    assert report["ndcg@3/gender=M"] == pytest.approx(NDCG0)
    assert report["ndcg@3/age=18-24"] == pytest.approx(NDCG1)
    assert report["ndcg@3/gender_max_gap"] == pytest.approx(NDCG1 - NDCG0)
    # distinct {0, 1, 2, 3, 4} -> 1.0; items 3 and 4 recommended: decile shares sum to 1
    assert report["coverage"] == 1.0
    # slots 3, 1, 4, 0, 1, 2 with pop 0, 1, 2, 2, 1, 1 out of n_users = 2:
    # -log2 p = log2 3 (smoothed 1/3), 1, 0, 0, 1, 1 -> (3 + log2 3) / 6
    assert report["novelty"] == pytest.approx((3 + log2(3)) / 6)
    assert report["ild_embedding"] == pytest.approx(intra_list_diversity_embeddings(topk, VECTORS))
    assert report["calibration_kl"] == pytest.approx(genre_calibration_kl(topk, history, HOT, users=users))
    assert sum(report[f"exposure_decile_{d}"] for d in range(10)) == pytest.approx(1.0)
    # without vectors or groups those keys are absent
    bare = beyond_accuracy_report(topk, users, history, truth, 3, item_pop, HOT)
    assert "ild_embedding" not in bare and not any(key.startswith("ndcg@") for key in bare)


def test_report_uses_first_k_columns():
    topk = np.array([[0, 1, 2, 3]])
    item_pop = np.array([1, 0, 0, 0, 1])  # one user with a history, who saw item 4 (and 0)
    report = beyond_accuracy_report(topk, np.array([0]), csr([[0, 4]]), csr([[0]]), 2, item_pop, HOT)
    assert report["coverage"] == pytest.approx(2 / 5)  # items 0, 1 only
