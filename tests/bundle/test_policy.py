"""The logging policy's propensities (bundle/policy.py) by hand, and against the frequencies of
many seeded draws."""
import numpy as np
import pytest

from bundle.policy import explore_slate, in_support, pool_size, propensity

RANKED = np.array([5, 3, 9, 1, 7])


def test_propensities_by_hand():
    # k 2, epsilon 0.2, pool 4: N = 4, so each pool item gets 0.2 / 4 = 0.05 at each position
    assert propensity(5, 0, RANKED, 2, 0.2, 4) == pytest.approx(0.8 + 0.05)  # the model's first, at position 0
    assert propensity(3, 0, RANKED, 2, 0.2, 4) == pytest.approx(0.05)  # a pool item elsewhere
    assert propensity(3, 1, RANKED, 2, 0.2, 4) == pytest.approx(0.85)
    assert propensity(7, 0, RANKED, 2, 0.2, 4) == 0.0  # outside the pool: never shown
    assert propensity(5, 2, RANKED, 2, 0.2, 4) == 0.0  # past k
    for j in range(2):  # a distribution over the pool at each position
        assert sum(propensity(int(i), j, RANKED, 2, 0.2, 4) for i in RANKED) == pytest.approx(1.0)
    assert pool_size(5, 2, 1) == 2 and pool_size(5, 2, 50) == 5 and pool_size(1, 2, 4) == 1


def test_deterministic_arm_logs_propensity_one():
    slate = explore_slate(RANKED, 3, 0.0, 4, np.random.default_rng(0))
    assert slate.items.tolist() == [5, 3, 9] and slate.propensities.tolist() == [1.0, 1.0, 1.0] and not slate.explored
    assert propensity(5, 0, RANKED, 3, 0.0, 4) == 1.0 and propensity(3, 0, RANKED, 3, 0.0, 4) == 0.0


def test_logged_propensities_are_the_marginal_frequencies_of_many_draws():
    rng, n = np.random.default_rng(7), 40_000
    counts, logged = {}, {}
    for _ in range(n):
        slate = explore_slate(RANKED, 2, 0.3, 4, rng)
        for j, (i, p) in enumerate(zip(slate.items.tolist(), slate.propensities.tolist())):
            counts[(i, j)] = counts.get((i, j), 0) + 1
            assert logged.setdefault((i, j), p) == p  # one propensity per (item, position), whatever the branch
    for (i, j), c in counts.items():
        mu = propensity(i, j, RANKED, 2, 0.3, 4)
        assert logged[(i, j)] == pytest.approx(mu)
        assert abs(c / n - mu) < 4 * np.sqrt(mu * (1 - mu) / n) + 1e-12  # within 4 standard errors
    assert set(counts) == {(i, j) for i in (5, 3, 9, 1) for j in (0, 1)}  # every pool item at every position, nothing else


def test_support_and_bad_epsilon():
    assert in_support(np.array([3, 5]), RANKED, 2, 0.1, 4).tolist() == [True, True]
    assert in_support(np.array([7, 5]), RANKED, 2, 0.1, 4).tolist() == [False, True]  # 7 is outside the pool
    assert in_support(np.array([3, 5]), RANKED, 2, 0.0, 4).tolist() == [False, False]  # a deterministic log covers only itself
    with pytest.raises(ValueError, match="epsilon"):
        explore_slate(RANKED, 2, 1.5, 4, np.random.default_rng(0))
