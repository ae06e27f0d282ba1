"""DP-EASE mechanism of benchmarks/dp_ease.py: the analytic Gaussian mechanism's sigma, the noise of
the Gram release, one user's sensitivity, the PSD projection and the EASE weights (hand examples)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from tests.conftest import load_script

dp = load_script("benchmarks/dp_ease.py")


def achieved_delta(sigma: float, eps: float, sens: float = 1.0) -> float:
    """Balle & Wang 2018, Thm 8, written out independently of the script."""
    return norm.cdf(sens / (2 * sigma) - eps * sigma / sens) - math.exp(eps) * norm.cdf(-sens / (2 * sigma) - eps * sigma / sens)


# ---------------------------------------------------------------- gaussian_sigma


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0, 8.0])
@pytest.mark.parametrize("delta", [1e-3, 1.0 / 754, 1e-5])
def test_gaussian_sigma_meets_the_exact_condition_and_is_minimal(eps, delta):
    sigma = dp.gaussian_sigma(eps, delta)
    got = achieved_delta(sigma, eps)
    assert got <= delta * (1 + 1e-9)  # private at the returned sigma
    assert got == pytest.approx(delta, rel=1e-6)  # ... and tight: the condition holds with equality
    assert achieved_delta(sigma * (1 - 1e-4), eps) > delta  # a smaller sigma would not be private


def test_gaussian_sigma_known_values_and_classical_bound():
    # delta = 1/754 (the 754 members of the ML-100k privacy split); values from an independent brentq solve
    assert dp.gaussian_sigma(8.0, 1 / 754) == pytest.approx(0.4718, abs=1e-4)
    assert dp.gaussian_sigma(1.0, 1 / 754) == pytest.approx(2.4942, abs=1e-4)
    # the analytic sigma never exceeds the classical sqrt(2 ln(1.25/delta)) / eps (valid for eps < 1)
    for eps in (0.1, 0.5, 0.9):
        assert dp.gaussian_sigma(eps, 1e-5) < math.sqrt(2 * math.log(1.25 / 1e-5)) / eps


def test_gaussian_sigma_monotone_and_scales_with_sensitivity():
    eps = [0.25, 0.5, 1, 2, 4, 8, 16]
    sig = [dp.gaussian_sigma(e, 1e-4) for e in eps]
    assert all(a > b for a, b in zip(sig, sig[1:]))  # more privacy budget -> less noise
    by_delta = [dp.gaussian_sigma(1.0, d) for d in (1e-2, 1e-4, 1e-6)]
    assert all(a < b for a, b in zip(by_delta, by_delta[1:]))  # smaller delta -> more noise
    assert dp.gaussian_sigma(2.0, 1e-4, sensitivity=3.0) == pytest.approx(3 * dp.gaussian_sigma(2.0, 1e-4), rel=1e-9)


@pytest.mark.parametrize("bad", [dict(eps=0.0, delta=1e-3), dict(eps=math.inf, delta=1e-3), dict(eps=1.0, delta=0.0), dict(eps=1.0, delta=1.0)])
def test_gaussian_sigma_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        dp.gaussian_sigma(**bad)


# ---------------------------------------------------------------- noisy_gram


def test_noise_has_the_stated_per_entry_std_and_is_symmetric():
    n, sigma = 300, 2.0
    g = dp.noisy_gram(np.zeros((5, n)), sigma, np.random.default_rng(0))  # zero histories: g is the noise
    assert np.array_equal(g, g.T)
    diag, upper = np.diag(g), g[np.triu_indices(n, 1)]
    # 300 diagonal draws: sd of the sd estimate ~ 4 %; 44850 off-diagonal ones: ~ 0.3 %
    assert np.std(diag) == pytest.approx(sigma, rel=0.15)
    assert np.std(upper) == pytest.approx(sigma / math.sqrt(2), rel=0.03)  # sigma on both would be 41 % off
    assert abs(np.mean(upper)) < 0.05 and abs(np.mean(diag)) < 0.5


def test_noise_is_reproducible_from_the_rng_and_zero_sigma_adds_none():
    x = np.array([[1, 0, 1], [0, 1, 1]], dtype=float)
    a = dp.noisy_gram(x, 1.0, np.random.default_rng(7))
    b = dp.noisy_gram(x, 1.0, np.random.default_rng(7))
    assert np.array_equal(a, b)
    exact = dp.noisy_gram(x, 0.0, np.random.default_rng(7))
    # unit rows (1/sqrt 2 on each item): Gram = [[.5, 0, .5], [0, .5, .5], [.5, .5, 1]]
    np.testing.assert_allclose(exact, [[0.5, 0, 0.5], [0, 0.5, 0.5], [0.5, 0.5, 1.0]])
    assert not np.allclose(a, exact)


def test_one_users_contribution_has_frobenius_norm_one():
    # history [1, 1, 0, 1]: x^ = (1, 1, 0, 1)/sqrt 3, x^ x^T = 1/3 on the 9 cells of items {0, 1, 3}
    #   -> ||x^ x^T||_F = sqrt(9 * (1/3)^2) = 1, whatever the history length
    others = np.array([[1, 0, 1, 0], [0, 1, 1, 1]], dtype=float)
    user = np.array([[1, 1, 0, 1]], dtype=float)
    with_user = dp.noisy_gram(np.vstack([others, user]), 0.0, None)
    without = dp.noisy_gram(others, 0.0, None)
    diff = with_user - without
    expected = np.zeros((4, 4))
    expected[np.ix_([0, 1, 3], [0, 1, 3])] = 1 / 3
    np.testing.assert_allclose(diff, expected, atol=1e-12)
    assert np.linalg.norm(diff) == pytest.approx(1.0)
    # the released vector (diag, sqrt 2 * strict upper) has the same L2 norm: sensitivity 1 for sigma
    iu = np.triu_indices(4, 1)
    assert math.sqrt((np.diag(diff) ** 2).sum() + 2 * (diff[iu] ** 2).sum()) == pytest.approx(1.0)
    # a heavy user (40 items) contributes norm 1 too
    heavy = np.zeros((1, 50))
    heavy[0, :40] = 1
    assert np.linalg.norm(dp.noisy_gram(heavy, 0.0, None)) == pytest.approx(1.0)


# ---------------------------------------------------------------- psd_project, ease_weights


def test_psd_project_hand_example():
    # [[1, 2], [2, 1]]: eigenvalues 3 (v = (1, 1)/sqrt 2) and -1 -> nearest PSD = 3 v v^T = 1.5 * ones
    m = np.array([[1.0, 2.0], [2.0, 1.0]])
    np.testing.assert_allclose(dp.psd_project(m), 1.5 * np.ones((2, 2)), atol=1e-12)
    np.testing.assert_allclose(dp.psd_project(m, rank=1), 1.5 * np.ones((2, 2)), atol=1e-12)
    # diag(5, 3, -2), rank 1 keeps only the 5
    d = np.diag([3.0, 5.0, -2.0])
    np.testing.assert_allclose(dp.psd_project(d), np.diag([3.0, 5.0, 0.0]), atol=1e-12)
    np.testing.assert_allclose(dp.psd_project(d, rank=1), np.diag([0.0, 5.0, 0.0]), atol=1e-12)


def test_ease_weights_hand_example():
    # X = [[1,1,0],[0,1,1],[1,0,0]]: XᵀX = [[2,1,0],[1,2,1],[0,1,1]]; lambda = 1 -> G = [[3,1,0],[1,3,1],[0,1,2]],
    # P = G^-1 = (1/13) [[5,-2,1],[-2,6,-3],[1,-3,8]], B_ij = -P_ij / P_jj, B_jj = 0
    gram = np.array([[2.0, 1, 0], [1, 2, 1], [0, 1, 1]])
    b = dp.ease_weights(gram, 1.0)
    np.testing.assert_allclose(b, [[0, 1 / 3, -1 / 8], [2 / 5, 0, 3 / 8], [-1 / 5, 1 / 2, 0]], atol=1e-12)


def test_ease_weights_closed_form_on_a_random_psd_gram():
    rng = np.random.default_rng(3)
    x = rng.random((20, 8))
    gram, lam = x.T @ x, 2.5
    b = dp.ease_weights(gram, lam)
    p = np.linalg.inv(gram + lam * np.eye(8))
    np.testing.assert_allclose(b, np.eye(8) - p @ np.diag(1 / np.diag(p)), atol=1e-10)
    assert np.all(np.diag(b) == 0)
    with pytest.raises(ValueError):
        dp.ease_weights(gram, 0.0)


def test_fixed_lambda_is_the_noise_spectral_norm():
    assert dp.fixed_lambda(1.0, 8) == pytest.approx(4.0)
    # and it is what it claims: the spectral norm of the release noise, within a few %, at n = 400
    n, sigma = 400, 1.5
    noise = dp.noisy_gram(np.zeros((1, n)), sigma, np.random.default_rng(1))
    assert np.abs(np.linalg.eigvalsh(noise)).max() == pytest.approx(dp.fixed_lambda(sigma, n), rel=0.06)
