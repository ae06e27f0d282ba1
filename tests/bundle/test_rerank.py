"""MMR re-ranking: limits of lambda, hand-worked toy cases, and a diversity gain."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bundle.rerank import mmr
from training.beyond import intra_list_diversity_genres

S = math.sqrt(0.5)  # cos 45°


def test_lambda_one_is_plain_ranking_by_score():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.normal(size=30)
        vectors = rng.normal(size=(30, 8))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        np.testing.assert_array_equal(mmr(scores, vectors, 10, 1.0), np.argsort(-scores)[:10])
    # ties keep the lower position first
    tied = np.array([1.0, 3.0, 1.0, 3.0])
    np.testing.assert_array_equal(mmr(tied, np.eye(4), 4, 1.0), [1, 3, 0, 2])


def test_near_duplicate_of_top_item_is_skipped():
    # scores 5, 4.6, 3, 1 -> rel = (s - 1) / 4 = 1, 0.9, 0.5, 0
    # candidate 1 is an exact duplicate of candidate 0; 2 is orthogonal; 3 is at 45°
    scores = np.array([5.0, 4.6, 3.0, 1.0])
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [S, S]])
    # lam = 0.5, step 1 (S empty): 0.5 * rel -> pick 0
    # step 2: max sim to {0} = 1, 1, 0, .7071
    #   c1: 0.45 - 0.5 = -0.05;  c2: 0.25 - 0 = 0.25;  c3: 0 - 0.3536 = -0.3536 -> pick 2
    # step 3: max sim to {0, 2} = 1, 1, 1, .7071 -> c1: -0.05 > c3: -0.3536 -> pick 1
    # (with raw, un-normalized scores c1 would win step 2: 2.3 - 0.5 = 1.8 > 1.5)
    np.testing.assert_array_equal(mmr(scores, vectors, 3, 0.5), [0, 2, 1])
    np.testing.assert_array_equal(mmr(scores, vectors, 4, 0.5), [0, 2, 1, 3])


def test_lambda_zero_takes_most_relevant_then_maximizes_diversity():
    # rel = 1, 2/3, 1/3, 0; candidate 1 parallel to 0, 2 at 45°, 3 orthogonal
    scores = np.array([4.0, 3.0, 2.0, 1.0])
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [S, S], [0.0, 1.0]])
    # step 1: objective 0 for all -> tie broken by rel -> 0
    # step 2: -max sim = -1, -1, -.7071, 0 -> 3 (orthogonal)
    # step 3: max sim to {0, 3} = 1 (c1), .7071 (c2) -> 2; then 1
    np.testing.assert_array_equal(mmr(scores, vectors, 4, 0.0), [0, 3, 2, 1])
    # reversed scores: rel = 0, 1/3, 2/3, 1 -> the most relevant (3) first, though not at position 0;
    # step 2: sims to 3 = (0, 1) are 0, 0, .7071 -> tie between 0 and 1, broken by rel (1/3 > 0) -> 1
    np.testing.assert_array_equal(mmr(scores[::-1].copy(), vectors, 2, 0.0), [3, 1])


def test_negative_similarity_is_a_bonus_not_clipped():
    # rel = 1, 0, 0.5; candidate 1 points away from candidate 0, candidate 2 is orthogonal
    scores = np.array([1.0, 0.0, 0.5])
    vectors = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    # lam = 0.5, after picking 0: c1: 0 - 0.5 * (-1) = 0.5;  c2: 0.25 - 0 = 0.25 -> pick 1
    # (a max-similarity clipped at 0 would give c1: 0 and pick 2)
    np.testing.assert_array_equal(mmr(scores, vectors, 2, 0.5), [0, 1])


def test_k_larger_than_candidates_returns_all():
    scores = np.array([0.2, 0.9, 0.5])
    out = mmr(scores, np.eye(3), 10, 0.7)
    assert out.dtype == np.int64 and len(out) == 3
    assert sorted(out.tolist()) == [0, 1, 2]
    assert out[0] == 1  # most relevant first


def test_constant_scores_rank_by_diversity_only():
    # rel = 0 everywhere: first pick position 0, then the item least similar to it
    vectors = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(mmr(np.full(3, 7.0), vectors, 2, 0.5), [0, 2])


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_invalid_lambda_raises(lam):
    with pytest.raises(ValueError, match="lambda"):
        mmr(np.zeros(3), np.eye(3), 2, lam)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        mmr(np.zeros(3), np.eye(4), 2, 0.5)  # vectors for 4 candidates, 3 scores
    with pytest.raises(ValueError):
        mmr(np.array([1.0, -np.inf, 0.0]), np.eye(3), 2, 0.5)  # padded slot left in
    with pytest.raises(ValueError):
        mmr(np.zeros(3), np.eye(3), 0, 0.5)


def test_mmr_raises_genre_diversity_of_the_list():
    rng = np.random.default_rng(7)
    n_cand, n_genres, k = 60, 8, 10
    hot = rng.random((n_cand, n_genres)) < 0.25
    hot[np.arange(n_cand), rng.integers(0, n_genres, n_cand)] = True  # >= 1 genre each
    vectors = hot / np.linalg.norm(hot, axis=1, keepdims=True)
    scores = rng.normal(size=n_cand)
    plain = np.argsort(-scores)[:k]
    reranked = mmr(scores, vectors, k, 0.5)
    ild_plain = intra_list_diversity_genres(plain[None, :], hot)
    ild_mmr = intra_list_diversity_genres(reranked[None, :], hot)
    assert ild_mmr > ild_plain  # strictly: the re-ranking changed the list towards diversity
