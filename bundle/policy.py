"""The logging policy of a served list and its propensities: the contract between serving (which
samples lists and logs them) and training's off-policy evaluation (which reweights the logs).

`explore_slate` is an epsilon-mixture over the logging model's ranking:

    with probability 1 - epsilon: the model's top-k, in its order;
    with probability epsilon:     a uniformly random ordered k-subset of its top-N ("the pool").

So the marginal probability that item i is shown at position j (0-based) is exact and cheap:

    mu(i at j) = (1 - epsilon) * [i == ranked[j]] + epsilon * [i in pool] / N,     N = pool size,

because a uniformly random k-permutation of N items puts each of them at each position with
probability 1/N. That is what each shown item logs as its propensity; a deterministic arm
(epsilon 0) logs 1 for every shown item. Off-policy estimators that assume a click depends on the
item and its position only (item-position / position-based click models: Li et al. 2018,
"Offline Evaluation of Ranking Policies with Click Models") are unbiased for any target list whose
items lie in the pool (`in_support`); outside it no estimator can see them and the logs say so.

Plackett-Luce sampling was the alternative: its per-position marginals have no closed form (they
sum over the orderings of the items above), so its logs would carry only conditional probabilities,
which item-position estimators cannot use. Numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Slate:
    items: np.ndarray  # (k,) candidate indices shown, position 0 first
    propensities: np.ndarray  # (k,) mu(items[j] at j) under the logging policy
    explored: bool  # True when the uniformly random branch drew this list


def pool_size(n_ranked: int, k: int, pool: int) -> int:
    """N: the pool is the top-`pool` of the ranking, never fewer than k items nor more than exist."""
    return max(min(pool, n_ranked), min(k, n_ranked))


def propensity(item: int, position: int, ranked: np.ndarray, k: int, epsilon: float, pool: int) -> float:
    """mu(item at position) under `explore_slate(ranked, k, epsilon, pool)`; 0 outside the pool or past k."""
    n = pool_size(len(ranked), k, pool)
    if position >= min(k, len(ranked)) or item not in ranked[:n]:
        return 0.0
    return (1.0 - epsilon) * float(ranked[position] == item) + epsilon / n


def explore_slate(ranked: np.ndarray, k: int, epsilon: float, pool: int, rng: np.random.Generator) -> Slate:
    """Sample the list shown, with each shown item's exact propensity (see the module docstring).

    `ranked`: candidate indices in the logging model's order (at least k of them, more when the
    pool is larger); `epsilon` in [0, 1]; `pool` >= k. One uniform draw decides the branch, so a
    seeded generator gives the same list again."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    ranked = np.asarray(ranked, dtype=np.int64)
    k = min(k, len(ranked))
    n = pool_size(len(ranked), k, pool)
    explored = epsilon > 0.0 and rng.random() < epsilon
    items = rng.permutation(ranked[:n])[:k] if explored else ranked[:k].copy()
    probs = (1.0 - epsilon) * (items == ranked[:k]) + (epsilon / n if epsilon > 0.0 else 0.0)
    return Slate(items, probs.astype(np.float64), bool(explored))


def in_support(target: np.ndarray, ranked: np.ndarray, k: int, epsilon: float, pool: int) -> np.ndarray:
    """Per position of a target list: whether the logging policy could have shown that item there."""
    return np.array([propensity(int(i), j, ranked, k, epsilon, pool) > 0.0 for j, i in enumerate(np.asarray(target)[:k])], dtype=bool)
