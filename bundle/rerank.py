"""Diversity re-ranking of a retrieved candidate set with Maximal Marginal Relevance.

Retrieval (``bundle.topk``) ranks by relevance alone, so near-duplicates of
the best item crowd the top of the list. MMR re-ranks a small candidate set
(say the top 100) so each next pick trades relevance against similarity to
what is already picked. Serving re-ranks with it and training's report measures
the accuracy-diversity trade-off with the same function. Numpy only.
"""
from __future__ import annotations

import numpy as np


def _min_max(scores: np.ndarray) -> np.ndarray:
    """Scores rescaled to [0, 1] within the set: (s - min) / (max - min); all 0 if constant."""
    low, high = scores.min(), scores.max()
    if high == low:
        return np.zeros_like(scores)
    return (scores - low) / (high - low)


def mmr(scores: np.ndarray, candidate_vectors: np.ndarray, k: int, lam: float) -> np.ndarray:
    """Positions (into the candidates) of k items picked by MMR, in pick order; int64 (min(k, C),).

    Carbonell & Goldstein, "The use of MMR, diversity-based reranking for
    reordering documents and producing summaries", SIGIR 1998. Greedily, with
    S the positions picked so far:

        next = argmax_{i not in S} lam * rel_i - (1 - lam) * max_{j in S} sim(i, j)

    where the max over an empty S is 0 and sim(i, j) = <v_i, v_j> (the
    vectors are L2-normalized, so this is the cosine; it may be negative, and
    a candidate pointing away from everything picked earns a bonus).

    rel is `scores` min-max normalized to [0, 1] within the candidate set.
    Raw scores live on a model-specific scale (dot products, logits, ...)
    while sim is a cosine in [-1, 1]; normalizing puts relevance on a fixed
    scale so the same lam means the same trade-off for every model and query.
    Constant scores give rel = 0 everywhere (only diversity decides).

    lam = 1 is plain ranking by score (ties by lower position); lam = 0 takes
    the most relevant candidate first, then each time the one least similar
    to those picked. Ties in the objective go to the higher rel, then the
    lower position. Each step is one (C, D) @ (D,) product updating a running
    max-similarity vector: O(k * C * D) in total.

    Pass only real candidates: padded slots (``bundle.topk.PAD_INDEX`` with
    score -inf) must be dropped first; non-finite scores raise ValueError.
    """
    scores = np.asarray(scores, dtype=np.float64)
    vectors = np.asarray(candidate_vectors, dtype=np.float64)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda (lam) must be in [0, 1], got {lam}")
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D (candidates,), got shape {scores.shape}")
    if vectors.ndim != 2 or len(vectors) != len(scores):
        raise ValueError(f"candidate_vectors must have shape ({len(scores)}, D), got {vectors.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite; drop padded (-inf) candidates before re-ranking")
    n = min(k, len(scores))
    if lam == 1.0:  # no diversity term: exactly the ranking by score, ties by position
        return np.argsort(-scores, kind="stable")[:n].astype(np.int64)

    rel = _min_max(scores)
    max_sim = np.zeros(len(scores))  # max over the empty S counts as 0 for the first pick
    available = np.ones(len(scores), dtype=bool)
    picked = np.empty(n, dtype=np.int64)
    for step in range(n):
        objective = np.where(available, lam * rel - (1.0 - lam) * max_sim, -np.inf)
        best = objective == objective.max()
        pick = int(np.argmax(np.where(best, rel, -np.inf)))  # tie: higher rel, then lower position
        picked[step] = pick
        available[pick] = False
        sim = vectors @ vectors[pick]
        max_sim = sim if step == 0 else np.maximum(max_sim, sim)
    return picked
