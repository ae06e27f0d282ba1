"""DP-EASE (privacy.mechanism gram, training/privacy/gram.py): the released statistic's sensitivity,
the noise's shape, σ of the analytic Gaussian mechanism (checked against Opacus' PRV accountant),
EASE on the noiseless release by hand, the fallback list from the release, and a real pipeline run
that exports, records its guarantee (manifest, MLflow, ledger) and serves through the unchanged
serving.recommender.Recommender."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from tests.conftest import REPO, tiny_overrides
from training import blend
from training.config import ConfigError, load_config
from training.privacy import gram

SMALL = ["data.synthetic.n_users=120", "data.synthetic.n_items=60"]


def random_history(n_users: int, n_items: int, p: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CSR of random binary histories; users 0 and 3 are empty."""
    rng = np.random.default_rng(seed)
    x = rng.random((n_users, n_items)) < p
    x[[0, 3]] = False
    m = sp.csr_matrix(x)
    return m.indptr.astype(np.int64), m.indices.astype(np.int64)


def without_user(csr, user: int):
    indptr, indices = csr
    keep = np.ones(len(indices), bool)
    keep[indptr[user] : indptr[user + 1]] = False
    lengths = np.diff(indptr)
    lengths[user] = 0
    return np.concatenate([[0], np.cumsum(lengths)]), indices[keep]


def phi(a: np.ndarray) -> np.ndarray:
    """(diag A, √2 · strict upper A): the vector the Gaussian mechanism noises."""
    return np.concatenate([np.diag(a), math.sqrt(2.0) * a[np.triu_indices(len(a), 1)]])


# --------------------------------------------------------------------------- the mechanism by hand
def test_removing_one_user_moves_the_released_statistic_by_at_most_the_clip_bound():
    n_items = 15
    csr = random_history(40, n_items, 0.3, seed=1)
    g = gram.gram_statistic(csr, n_items)
    lengths = np.diff(csr[0])
    for u in range(40):
        diff = g - gram.gram_statistic(without_user(csr, u), n_items)
        # the Frobenius norm of the change: exactly 1 for a user with a history, 0 for an empty one
        assert np.linalg.norm(diff) == pytest.approx(1.0 if lengths[u] else 0.0, abs=1e-12)
        # and the L2 norm of the noised vector phi is the same number (sensitivity 1 of phi(G))
        assert np.linalg.norm(phi(diff)) == pytest.approx(np.linalg.norm(diff), abs=1e-12)
    # the clip is what bounds it: without unit rows a user moves XᵀX by |x_u|² (here up to ~8)
    raw = blend.gram(csr, n_items)
    heavy = int(np.argmax(lengths))
    assert np.linalg.norm(raw - blend.gram(without_user(csr, heavy), n_items)) == pytest.approx(lengths[heavy])
    assert lengths[heavy] > 1


def test_the_statistic_is_the_sum_of_unit_rows_outer_products_by_hand():
    csr = (np.array([0, 2, 3, 3]), np.array([0, 2, 1]))  # users {0, 2}, {1}, {}
    want = np.array([[0.5, 0, 0.5], [0, 1, 0], [0.5, 0, 0.5]])
    np.testing.assert_allclose(gram.gram_statistic(csr, 3), want, atol=1e-15)


def test_noise_is_sigma_on_phi_and_symmetric():
    sigma, n = 2.0, 400
    noise = gram.add_noise(np.zeros((n, n)), sigma, np.random.default_rng(0))
    assert np.array_equal(noise, noise.T)
    assert np.var(np.diag(noise)) == pytest.approx(sigma**2, rel=0.2)  # 400 draws: ~7 % sampling error
    assert np.var(noise[np.triu_indices(n, 1)]) == pytest.approx(sigma**2 / 2, rel=0.03)  # ~80k draws
    assert np.std(phi(noise)) == pytest.approx(sigma, rel=0.03)
    # σ = 0: the statistic itself
    g = np.eye(3)
    assert gram.add_noise(g.copy(), 0.0, np.random.default_rng(0)).tolist() == g.tolist()


@pytest.mark.parametrize("eps,delta", [(8.0, 1 / 755), (1.0, 1e-5), (0.5, 1e-3)])
def test_sigma_is_the_tightest_analytic_gaussian_and_opacus_prv_agrees(eps, delta):
    from opacus.accountants import PRVAccountant

    sigma = gram.gaussian_sigma(eps, delta)
    assert gram.gaussian_delta(sigma, eps) <= delta < gram.gaussian_delta(sigma * (1 - 1e-6), eps)
    assert gram.gaussian_epsilon(sigma, delta) == pytest.approx(eps, rel=1e-8)
    if eps < 1:  # the classical bound (valid for eps < 1) needs more noise
        assert sigma < math.sqrt(2 * math.log(1.25 / delta)) / eps
    acc = PRVAccountant()  # one Gaussian mechanism = Poisson sampling at rate 1, one step
    acc.history = [(sigma, 1.0, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        prv = acc.get_epsilon(delta, eps_error=0.01)
    assert eps <= prv <= eps + 0.03  # PRV's upper bound within its discretisation error of the exact ε


# --------------------------------------------------------------------------- the popularity vector beside the Gram
def test_popularity_share_and_split_sigma_by_hand():
    # rho = sigma * n_items / members; f = min(0.3, max(0, (rho - 3) / 10))
    assert gram.popularity_share(1.0, 30, 10) == 0.0  # rho 3: none
    assert gram.popularity_share(1.5, 30, 10) == pytest.approx(0.15)  # rho 4.5
    assert gram.popularity_share(4.0, 30, 10) == pytest.approx(0.3)  # rho 12: capped
    assert gram.popularity_share(0.524, 3706, 4832) == 0.0  # ML-1M at eps 8 (rho 0.4): the whole budget on the Gram
    # f = 0.2 at sigma 1: 1/sigma_G^2 = 0.8, 1/sigma_v^2 = 0.2
    sg, sv = gram.split_sigma(1.0, 0.2)
    assert (sg, sv) == (pytest.approx(1 / math.sqrt(0.8)), pytest.approx(1 / math.sqrt(0.2)))
    assert 1 / sg**2 + 1 / sv**2 == pytest.approx(1.0)
    assert gram.split_sigma(0.7, 0.0) == (0.7, math.inf)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="gram_popularity_share"):
            gram.split_sigma(1.0, bad)
    with pytest.raises(ValueError, match="members"):
        gram.popularity_share(1.0, 8, 0)


def test_the_joint_release_moves_by_at_most_one_noise_unit_of_the_single_release():
    """Sensitivity of the pair (φ(G), v) in its own noise units: removing a user moves it by
    √(‖φ(ΔG)‖²/σ_G² + ‖Δv‖²/σ_v²) = √((1 − f) + f)/σ = 1/σ, the Mahalanobis distance one release at σ
    and sensitivity 1 allows; so the pair is (ε, δ)-DP for the σ of (ε, δ)."""
    n_items, sigma, share = 15, 0.8, 0.25
    csr = random_history(40, n_items, 0.3, seed=1)
    sg, sv = gram.split_sigma(sigma, share)
    g, v = gram.gram_statistic(csr, n_items), gram.popularity_statistic(csr, n_items)
    lengths = np.diff(csr[0])
    for u in range(40):
        rest = without_user(csr, u)
        dg, dv = g - gram.gram_statistic(rest, n_items), v - gram.popularity_statistic(rest, n_items)
        assert np.linalg.norm(dv) == pytest.approx(1.0 if lengths[u] else 0.0, abs=1e-12)  # one unit row
        moved = math.sqrt(np.sum(phi(dg) ** 2) / sg**2 + np.sum(dv**2) / sv**2)
        assert moved == pytest.approx(1.0 / sigma if lengths[u] else 0.0, abs=1e-12)
    # the vector by hand: users {0, 2} and {1}: (1/√2, 1, 1/√2)
    np.testing.assert_allclose(gram.popularity_statistic((np.array([0, 2, 3]), np.array([0, 2, 1])), 3), [2**-0.5, 1.0, 2**-0.5])


@pytest.mark.parametrize("eps,share", [(1.0, 0.26), (0.5, 0.3)])
def test_opacus_prv_composes_the_two_releases_to_the_single_release_epsilon(eps, share):
    """An accountant we did not write: Opacus' PRV composes the Gram at σ_G and the vector at σ_v
    (each a Gaussian mechanism at sensitivity 1, sampled at rate 1, once) to the ε of one release at σ."""
    from opacus.accountants import PRVAccountant

    delta = 1 / 754
    sigma = gram.gaussian_sigma(eps, delta)
    acc = PRVAccountant()
    acc.history = [(s, 1.0, 1) for s in gram.split_sigma(sigma, share)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        prv = acc.get_epsilon(delta, eps_error=0.01)
    assert eps - 0.01 <= prv <= eps + 0.03
    alone = PRVAccountant()
    alone.history = [(gram.split_sigma(sigma, share)[0], 1.0, 1)]  # the Gram alone is cheaper: the vector is not free
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert alone.get_epsilon(delta, eps_error=0.01) < eps - 0.05


def test_combine_popularity_by_hand():
    r, v = np.array([10.0, 4.0, -2.0]), np.array([3.0, 1.0, 0.0])
    # var_r = (3 + 1) * 1^2 / 2 = 2; c = 14 / 4 = 3.5; var_v = (3.5 * 0.5)^2 = 3.0625
    want = (r / 2 + 3.5 * v / 3.0625) / (1 / 2 + 1 / 3.0625)
    np.testing.assert_allclose(gram.combine_popularity(r, v, 1.0, 0.5), want, rtol=1e-12)
    assert want[0] == pytest.approx(10.19753, abs=1e-5)
    np.testing.assert_allclose(gram.combine_popularity(r, v, 0.0, 0.5), r)  # a noiseless side wins outright
    np.testing.assert_allclose(gram.combine_popularity(r, v, 1.0, 0.0), 3.5 * v)


def test_a_release_with_a_share_is_post_processing_of_both_noised_statistics():
    n_items, sigma, lam, mu, share = 12, 1.2, 3.0, 0.8, 0.3
    csr = random_history(40, n_items, 0.3, seed=9)
    model = gram.release(csr, n_items, sigma, lam, None, np.random.default_rng(5), mu, share)
    sg, sv = gram.split_sigma(sigma, share)
    rng = np.random.default_rng(5)
    released = gram.add_noise(gram.gram_statistic(csr, n_items), sg, rng)  # the Gram's draw first,
    vector = gram.popularity_statistic(csr, n_items) + sv * rng.standard_normal(n_items)  # then the vector's
    pop = gram.combine_popularity(released.sum(1), vector, sg, sv)
    p, q, _ = gram.ease_from_release(released + mu * gram.popularity_prior(pop), lam, None, noisy=True)
    np.testing.assert_allclose(model.scores(np.eye(n_items)), p @ q.T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.cold_scores, pop, atol=1e-12)
    assert model.popularity(5).tolist() == np.argsort(-pop, kind="stable")[:5].tolist()
    assert "popularity vector" in model.describe()["fallback"]
    # share 0 is the Gram-only release at the full sigma, drawn exactly as before the vector existed
    plain = gram.release(csr, n_items, sigma, lam, None, np.random.default_rng(5), mu, 0.0)
    again = gram.release(csr, n_items, sigma, lam, None, np.random.default_rng(5), mu)
    np.testing.assert_array_equal(plain.cold_scores, again.cold_scores)
    np.testing.assert_allclose(plain.cold_scores, gram.add_noise(gram.gram_statistic(csr, n_items), sigma, np.random.default_rng(5)).sum(1), atol=1e-12)


# --------------------------------------------------------------------------- popularity-weighted histories
def test_weight_power_rule_and_item_weights_by_hand():
    # rho = sigma * n_items / members; beta = 0.25 where rho >= 2
    assert gram.weight_power(1.0, 20, 10) == 0.25  # rho 2
    assert gram.weight_power(0.9, 20, 10) == 0.0  # rho 1.8
    assert gram.weight_power(0.524, 3706, 4832) == 0.0  # ML-1M at eps 8 (rho 0.4)
    assert gram.weight_power(3.0, 3706, 4832) == 0.25  # ML-1M at eps 1 (rho 2.3)
    # w = clip(v / max v, 0.01, 1) ** beta: (4, 1, -3, 0.02) / 4 -> (1, 0.25, 0.01, 0.01); beta 0.5 -> (1, 0.5, 0.1, 0.1)
    np.testing.assert_allclose(gram.item_weights(np.array([4.0, 1.0, -3.0, 0.02]), 0.5), [1.0, 0.5, 0.1, 0.1])
    np.testing.assert_array_equal(gram.item_weights(np.array([4.0, 1.0]), 0.0), [1.0, 1.0])
    np.testing.assert_array_equal(gram.item_weights(np.array([-1.0, 0.0]), 0.5), [1.0, 1.0])  # nothing positive: unweighted
    with pytest.raises(ValueError, match="members"):
        gram.weight_power(1.0, 8, 0)


def test_the_rules_give_a_weighted_release_its_vector_and_refuse_what_cannot_be():
    from training.config import PrivacyConfig

    base = dict(mode="dp", mechanism="gram")
    r = gram.release_rules(PrivacyConfig(**base), 1.0, 25, 10)  # rho 2.5: weighted; the share rule gives 0 -> the least share
    assert (r.power, r.power_rule, r.share) == (0.25, gram.WEIGHT_TEXT, gram.WEIGHT_SHARE) and "least a weighted release" in r.share_rule
    assert r.block()["weight_power"] == 0.25 and r.block()["popularity_share"] == gram.WEIGHT_SHARE
    assert r.sigma_gram == pytest.approx(1 / math.sqrt(1 - gram.WEIGHT_SHARE)) and r.lam == pytest.approx(gram.release_lambda(r.sigma_gram, 25, 10))
    r = gram.release_rules(PrivacyConfig(**base), 2.0, 25, 10)  # rho 5: the share rule's own 0.2 is above the least
    assert (r.power, r.share) == (0.25, pytest.approx(0.2))
    r = gram.release_rules(PrivacyConfig(**base), 0.5, 25, 10)  # rho 1.25: unweighted, no vector
    assert (r.power, r.share) == (0.0, 0.0)
    r = gram.release_rules(PrivacyConfig(**base, gram_popularity_share=0), 1.0, 25, 10)  # no vector: nothing to weigh by
    assert (r.power, r.share) == (0.0, 0.0)
    r = gram.release_rules(PrivacyConfig(**base, gram_weight_power=0.5, gram_popularity_share=0.1), 0.5, 25, 10)  # set: taken as set
    assert (r.power, r.power_rule, r.share) == (0.5, "privacy.gram_weight_power", 0.1)
    with pytest.raises(ConfigError, match=r"privacy\.gram_weight_power"):
        gram.release_rules(PrivacyConfig(**base, gram_weight_power=0.5, gram_popularity_share=0), 0.5, 25, 10)
    with pytest.raises(ConfigError, match=r"privacy\.gram_weight_power"):  # federated: the clients cannot weigh
        gram.release_rules(PrivacyConfig(**base, gram_weight_power=0.5), 0.5, 25, 10, weighted=False)
    r = gram.release_rules(PrivacyConfig(**base), 1.0, 25, 10, weighted=False)  # the rule there: unweighted, and no share floor
    assert (r.power, r.share) == (0.0, 0.0) and "no item weights" in r.power_rule


def test_a_weighted_release_draws_the_vector_first_and_reads_its_weights_off_it():
    """By hand: ṽ = v + σ_v·z (the first draw), w = item_weights(ṽ, β), the Gram of the weighted unit rows
    released at σ_G (the next draws), EASE with the prior of combine(row sums, w ∘ ṽ), and the served
    user vector (w ∘ x) P."""
    n_items, sigma, lam, mu, share, beta = 12, 1.2, 3.0, 0.8, 0.3, 0.5
    csr = random_history(40, n_items, 0.3, seed=9)
    model = gram.release(csr, n_items, sigma, lam, None, np.random.default_rng(5), mu, share, beta)
    sg, sv = gram.split_sigma(sigma, share)
    rng = np.random.default_rng(5)
    vector = gram.popularity_statistic(csr, n_items) + sv * rng.standard_normal(n_items)
    w = np.clip(vector / vector.max(), 0.01, 1.0) ** beta
    x = blend.binary_rows(csr, np.arange(40), n_items)
    xw = x * w
    xw = xw / np.where((n := np.linalg.norm(xw, axis=1, keepdims=True)) > 0, n, 1)
    g = xw.T @ xw
    np.testing.assert_allclose(gram.gram_statistic(csr, n_items, w), g, atol=1e-12)
    released = gram.add_noise(g.copy(), sg, rng)
    pop = gram.combine_popularity(released.sum(1), w * vector, sg, sv)
    p, q, _ = gram.ease_from_release(released + mu * gram.popularity_prior(pop), lam, None, noisy=True)
    np.testing.assert_allclose(model.scores(x), (x * w) @ p @ q.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.cold_scores, pop, atol=1e-12)
    assert "popularity-weighted" in model.statistic
    with pytest.raises(ValueError, match="gram_weight_power"):
        gram.release(csr, n_items, sigma, lam, None, np.random.default_rng(5), mu, 0.0, beta)


def test_with_weights_fixed_one_user_still_moves_the_gram_by_exactly_one():
    """The weights are a function of the earlier release only; given them, each member's row (w ∘ x)/‖w ∘ x‖ has
    unit norm, so removing a user moves φ(G_w) by exactly 1 (0 for an empty history): the Gram release is the
    Gaussian mechanism at sensitivity 1 as before, and the two releases compose adaptively (Gaussian DP) to
    the single release at σ."""
    n_items = 15
    csr = random_history(40, n_items, 0.3, seed=4)
    w = gram.item_weights(np.random.default_rng(0).uniform(-1, 10, n_items), 0.25)
    g = gram.gram_statistic(csr, n_items, w)
    lengths = np.diff(csr[0])
    for u in range(40):
        moved = np.linalg.norm(phi(g - gram.gram_statistic(without_user(csr, u), n_items, w)))
        assert moved == pytest.approx(1.0 if lengths[u] else 0.0, abs=1e-12)


def test_no_noise_is_ease_on_the_released_gram_and_plain_ease_at_equal_lengths():
    n_items, lam = 12, 0.7
    csr = random_history(50, n_items, 0.3, seed=2)
    model = gram.release(csr, n_items, 0.0, lam, None, np.random.default_rng(0))
    x = blend.binary_rows(csr, np.arange(50), n_items)
    want = x @ blend.ease_matrix(gram.gram_statistic(csr, n_items), lam)
    np.testing.assert_allclose(model.scores(x), want, atol=1e-5)
    # every user with L items: X̂ᵀX̂ = XᵀX / L, so EASE(X̂ᵀX̂, λ) = EASE(XᵀX, λL), plain EASE
    rng = np.random.default_rng(3)
    rows = [np.sort(rng.choice(n_items, 4, replace=False)) for _ in range(30)]
    same = (np.arange(0, 121, 4), np.concatenate(rows))
    model = gram.release(same, n_items, 0.0, lam, None, np.random.default_rng(0))
    x = blend.binary_rows(same, np.arange(30), n_items)
    np.testing.assert_allclose(model.scores(x), x @ blend.ease_matrix(blend.gram(same, n_items), lam * 4), atol=1e-5)


def test_the_fallback_is_the_released_gram_row_sums():
    n_items = 10
    csr = random_history(30, n_items, 0.4, seed=4)
    counts = np.bincount(csr[1], minlength=n_items)
    clean = gram.release(csr, n_items, 0.0, 1.0, None, np.random.default_rng(0))
    np.testing.assert_allclose(clean.cold_scores, counts, atol=1e-12)  # before noise: the item user counts
    noisy = gram.release(csr, n_items, 0.5, 1.0, None, np.random.default_rng(7))
    released = gram.add_noise(gram.gram_statistic(csr, n_items), 0.5, np.random.default_rng(7))
    np.testing.assert_allclose(noisy.cold_scores, released.sum(1), atol=1e-12)
    assert noisy.popularity(4).tolist() == np.argsort(-released.sum(1), kind="stable")[:4].tolist()


def test_a_served_rank_factors_b_by_its_own_subspace():
    n_items = 20
    csr = random_history(60, n_items, 0.3, seed=5)
    exact = gram.release(csr, n_items, 0.3, 2.0, None, np.random.default_rng(1))
    low = gram.release(csr, n_items, 0.3, 2.0, 8, np.random.default_rng(1))
    assert low.rank == 8 and low.user_factors.shape == low.item_factors.shape == (n_items, 8)
    x = np.eye(n_items)  # x B: B itself; its best rank-8 approximation is what the factors hold
    b = exact.scores(x)
    s = np.linalg.svd(b, compute_uv=False)
    assert np.linalg.norm(low.scores(x) - b) == pytest.approx(np.sqrt((s[8:] ** 2).sum()), rel=1e-3)


def test_release_lambda_rules_by_hand():
    # sigma 0.5, 8 items: the noise matrix's spectral norm sigma * sqrt(2 * 8) = 0.5 * 4 = 2
    assert gram.noise_lambda(0.5, 8) == pytest.approx(2.0)
    assert gram.release_lambda(0.5, 8, 100, "noise", 1.0, 0.0) == pytest.approx(2.0)  # the old default (no floor)
    assert gram.release_lambda(0.5, 8, 100, "noise", 3.0, 0.0) == pytest.approx(6.0)  # members not read
    # noise_snr: factor * rho * sigma * sqrt(2n), rho = sigma * n_items / members
    # sigma 0.5, 8 items, 4 members: rho = 0.5 * 8 / 4 = 1, lambda = 2.5 * 1 * 2 = 5
    assert gram.release_lambda(0.5, 8, 4, "noise_snr", 2.5) == pytest.approx(5.0)
    # sigma 3, 18 items, 27 members: rho = 3 * 18 / 27 = 2, sigma * sqrt(36) = 18, lambda = 2 * 2 * 18 = 72
    assert gram.release_lambda(3.0, 18, 27, "noise_snr", 2.0) == pytest.approx(72.0)
    assert gram.release_lambda(3.0, 18, 27) == pytest.approx(2.7 * 2 * 18)  # the defaults: noise_snr, factor 2.7
    # the floor: floor * members / n_items, the noiseless Gram's scale. 100 members on 8 items: 8 * 100 / 8 = 100
    assert gram.release_lambda(0.5, 8, 100, "noise", 1.0) == pytest.approx(100.0)  # default floor 8 binds
    assert gram.release_lambda(0.5, 8, 100, "noise", 1.0, 0.5) == pytest.approx(6.25)
    # a large user base: sigma 0.5, 1,000 items, 40,000 members: rho 0.0125, the rule gives 2.7 * 0.0125 * 0.5 * sqrt(2000)
    # = 0.75, far under EASE's own need; the floor gives 8 * 40 = 320
    assert gram.release_lambda(0.5, 1000, 40000, floor=0.0) == pytest.approx(2.7 * 0.0125 * 0.5 * math.sqrt(2000))
    assert gram.release_lambda(0.5, 1000, 40000) == pytest.approx(320.0)
    assert gram.lambda_text("noise_snr", 2.7, 8.0).startswith("max(2.7 * (sigma * n_items / members)") and "8 * members / n_items" in gram.lambda_text("noise", 1.0, 8.0)
    # the diagonal's mean really is members / n_items before noise (each unit row adds 1 to the trace)
    csr = random_history(30, 9, 0.4, seed=8)
    members = int((np.diff(csr[0]) > 0).sum())
    assert np.trace(gram.gram_statistic(csr, 9)) == pytest.approx(members)
    with pytest.raises(ValueError, match=r"privacy\.gram_lambda_rule"):
        gram.release_lambda(1.0, 8, 4, "spectral", 1.0)
    with pytest.raises(ValueError, match=r"privacy\.gram_lambda_factor"):
        gram.release_lambda(1.0, 8, 4, "noise", 0.0)
    with pytest.raises(ValueError, match=r"privacy\.gram_lambda_floor"):
        gram.release_lambda(1.0, 8, 4, "noise", 1.0, -1.0)


def test_the_release_uses_the_configured_lambda_rule(tmp_path):
    """fit_gram's λ is release_lambda of the run's σ and n_items (no data read), and the model is the
    release with that λ; gram_lambda, when given, wins."""
    from training.pipeline import prepare
    from training.tracking import Tracker

    for extra, rule, factor in (([], "noise_snr", 2.7), (["privacy.gram_lambda_rule=noise", "privacy.gram_lambda_factor=2"], "noise", 2.0)):
        cfg = load_config(REPO / "configs" / "ease_dp.yaml", tiny_overrides(tmp_path) + SMALL + ["privacy.target_epsilon=2", *extra])
        data = prepare(cfg)
        model, fit = gram.fit_gram(cfg, data, Tracker(False, "", ""))
        n = int((np.diff(data.seen[0]) > 0).sum())
        sigma = gram.gaussian_sigma(2.0, 1.0 / n)
        lam = factor * sigma * math.sqrt(2 * data.dataset.n_items) * (sigma * data.dataset.n_items / n if rule == "noise_snr" else 1.0)
        lam = max(lam, 8.0 * n / data.dataset.n_items)  # the default floor
        assert fit.privacy["lambda"] == pytest.approx(lam) and model.lam == pytest.approx(lam)
        assert fit.privacy["lambda_rule"].startswith(f"max({factor:g} * ")
        mu = gram.prior_weight(sigma, data.dataset.n_items, n)
        assert fit.privacy["prior_weight"] == pytest.approx(mu) and model.prior == pytest.approx(mu)
        want = gram.release(data.seen, data.dataset.n_items, sigma, lam, None, np.random.default_rng(cfg.trainer.seed), mu)
        np.testing.assert_array_equal(model.item_factors, want.item_factors)
    cfg = load_config(REPO / "configs" / "ease_dp.yaml", tiny_overrides(tmp_path) + SMALL + ["privacy.gram_lambda=3.5"])
    model, fit = gram.fit_gram(cfg, prepare(cfg), Tracker(False, "", ""))
    assert model.lam == 3.5 and fit.privacy["lambda_rule"] == "privacy.gram_lambda"


def test_prior_weight_and_popularity_prior_by_hand():
    # rho = sigma * n_items / members: 2 * 30 / 10 = 6 -> mu = (6 - 3) / 2 = 1.5; rho 3 or below -> 0
    assert gram.prior_weight(2.0, 30, 10) == pytest.approx(1.5)
    assert gram.prior_weight(1.0, 30, 10) == 0.0 and gram.prior_weight(0.0, 30, 10) == 0.0
    assert gram.prior_weight(0.5, 1682, 754) == 0.0  # ML-100k at eps 8 (sigma ~0.47): no prior
    # r = (2, 1, -1 -> 0): r r^T / 3, whose row sums are r again
    prior = gram.popularity_prior(np.array([2.0, 1.0, -1.0]))
    np.testing.assert_allclose(prior, np.array([[4, 2, 0], [2, 1, 0], [0, 0, 0]]) / 3.0)
    np.testing.assert_allclose(prior.sum(1), [2.0, 1.0, 0.0])
    assert not gram.popularity_prior(np.array([-1.0, -2.0])).any()
    with pytest.raises(ValueError, match="members"):
        gram.prior_weight(1.0, 8, 0)


def test_the_prior_is_post_processing_of_the_release():
    """release(prior=μ) is EASE on released + μ·r rᵀ/Σr, r the released row sums: nothing else is read,
    and the fallback stays the released row sums (the prior does not touch what is reported)."""
    n_items, sigma, lam, mu = 12, 0.8, 3.0, 1.5
    csr = random_history(40, n_items, 0.3, seed=9)
    model = gram.release(csr, n_items, sigma, lam, None, np.random.default_rng(5), mu)
    released = gram.add_noise(gram.gram_statistic(csr, n_items), sigma, np.random.default_rng(5))
    r = released.sum(1)
    p, q, _ = gram.ease_from_release(released + mu * np.outer(np.clip(r, 0, None), np.clip(r, 0, None)) / np.clip(r, 0, None).sum(), lam, None, noisy=True)
    np.testing.assert_allclose(model.scores(np.eye(n_items)), p @ q.T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.cold_scores, r, atol=1e-12)
    plain = gram.release(csr, n_items, sigma, lam, None, np.random.default_rng(5))
    assert model.prior == mu and plain.prior == 0.0
    assert not np.allclose(model.scores(np.eye(n_items)), plain.scores(np.eye(n_items)), atol=1e-4)  # the prior moves B


def test_a_small_epsilon_turns_the_prior_on_and_the_config_can_turn_it_off(tmp_path):
    from training.pipeline import prepare
    from training.tracking import Tracker

    cfg = load_config(REPO / "configs" / "ease_dp.yaml", tiny_overrides(tmp_path) + SMALL + ["privacy.target_epsilon=0.2"])
    data = prepare(cfg)
    n = int((np.diff(data.seen[0]) > 0).sum())
    sigma = gram.gaussian_sigma(0.2, 1.0 / n)
    sigma_gram = gram.split_sigma(sigma, gram.popularity_share(sigma, data.dataset.n_items, n))[0]  # the rules read the Gram's sigma
    mu = gram.prior_weight(sigma_gram, data.dataset.n_items, n)
    assert mu > 0  # rho > 3 on this small user base at eps 0.2
    model, fit = gram.fit_gram(cfg, data, Tracker(False, "", ""))
    assert model.prior == pytest.approx(mu) and fit.privacy["prior_rule"] == gram.PRIOR_TEXT
    cfg = load_config(REPO / "configs" / "ease_dp.yaml", tiny_overrides(tmp_path) + SMALL + ["privacy.target_epsilon=0.2", "privacy.gram_prior_weight=0"])
    model, fit = gram.fit_gram(cfg, prepare(cfg), Tracker(False, "", ""))
    assert model.prior == 0.0 and fit.privacy["prior_rule"] == "privacy.gram_prior_weight"


def test_a_small_epsilon_releases_the_popularity_vector_and_the_config_can_turn_it_off(tmp_path):
    from training.pipeline import prepare
    from training.tracking import Tracker

    cfg = load_config(REPO / "configs" / "ease_dp.yaml", tiny_overrides(tmp_path) + SMALL + ["privacy.target_epsilon=0.2"])
    data = prepare(cfg)
    n, n_items = int((np.diff(data.seen[0]) > 0).sum()), data.dataset.n_items
    sigma = gram.gaussian_sigma(0.2, 1.0 / n)
    share = gram.popularity_share(sigma, n_items, n)
    assert share > 0
    sg, sv = gram.split_sigma(sigma, share)
    model, fit = gram.fit_gram(cfg, data, Tracker(False, "", ""))
    priv = fit.privacy
    assert priv["popularity_share"] == pytest.approx(share) and priv["popularity_rule"] == gram.SHARE_TEXT
    assert priv["sigma"] == pytest.approx(sigma) and priv["epsilon"] == pytest.approx(0.2, rel=1e-6)  # the guarantee is the single release's
    assert (priv["sigma_gram"], priv["sigma_popularity"]) == (pytest.approx(sg), pytest.approx(sv))
    assert priv["lambda"] == pytest.approx(gram.release_lambda(sg, n_items, n)) and model.prior == pytest.approx(gram.prior_weight(sg, n_items, n))
    assert priv["weight_power"] == 0.25 and priv["weight_rule"] == gram.WEIGHT_TEXT  # rho >= 2: popularity-weighted histories
    want = gram.release(data.seen, n_items, sigma, priv["lambda"], None, np.random.default_rng(cfg.trainer.seed), model.prior, share, 0.25)
    np.testing.assert_array_equal(model.cold_scores, want.cold_scores)
    assert priv["fallback"] == model.fallback and "popularity vector" in model.fallback
    cfg = load_config(REPO / "configs" / "ease_dp.yaml", tiny_overrides(tmp_path) + SMALL + ["privacy.target_epsilon=0.2", "privacy.gram_popularity_share=0"])
    model, fit = gram.fit_gram(cfg, prepare(cfg), Tracker(False, "", ""))
    assert fit.privacy["sigma_popularity"] is None and fit.privacy["sigma_gram"] == pytest.approx(sigma)
    assert fit.privacy["popularity_rule"] == "privacy.gram_popularity_share" and model.fallback == "row sums of the released Gram"
    assert fit.privacy["weight_power"] == 0 and "gram_popularity_share is 0" in fit.privacy["weight_rule"]  # no vector: no weights


def test_config_refusals_name_the_key(tmp_path):
    cases = (
        ("two_tower.yaml", ["privacy.mechanism=gram"], "privacy.mechanism"),  # mode none
        ("ease_dp.yaml", ["privacy.target_epsilon=.inf"], "privacy.target_epsilon"),
        ("ease_dp.yaml", ["privacy.target_epsilon=null", "privacy.noise_multiplier=0"], "privacy.noise_multiplier"),
        ("ease_dp.yaml", ["privacy.gram_rank=0"], "privacy.gram_rank"),
        ("ease_dp.yaml", ["privacy.gram_lambda=-1"], "privacy.gram_lambda"),
        ("ease_dp.yaml", ["privacy.gram_lambda_factor=0"], "privacy.gram_lambda_factor"),
        ("ease_dp.yaml", ["privacy.gram_lambda_floor=-1"], "privacy.gram_lambda_floor"),
        ("ease_dp.yaml", ["privacy.gram_lambda_rule=spectral"], "privacy.gram_lambda_rule"),
        ("ease_dp.yaml", ["privacy.gram_prior_weight=-1"], "privacy.gram_prior_weight"),
        ("ease_dp.yaml", ["privacy.gram_popularity_share=1"], "privacy.gram_popularity_share"),
        ("ease_dp.yaml", ["privacy.gram_popularity_share=-0.1"], "privacy.gram_popularity_share"),
    )
    for config, extra, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(REPO / "configs" / config, tiny_overrides(tmp_path) + extra)
    assert load_config(None, []).privacy.mechanism == "dp_sgd"  # DP-SGD stays the default
    assert load_config(REPO / "configs" / "ease_dp.yaml", []).privacy.mechanism == "gram"


# --------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def gram_run(tmp_path_factory):
    from training.pipeline import train

    root = tmp_path_factory.mktemp("gram_run")
    cfg = load_config(REPO / "configs" / "ease_dp.yaml", tiny_overrides(root) + SMALL + [
        "privacy.target_epsilon=2", "privacy.audit_holdout=0.25", "tracking.register_model=true", "tracking.alias=champion",
        "privacy.gram_popularity_share=0.2",  # the rule gives 0 at this rho; the bundle carries the two-statistic release end to end
        "privacy.gram_weight_power=0.25",  # and the weighted histories (w folded into the served user factors)
    ])  # fmt: skip
    return cfg, train(cfg)


def refit(cfg):
    """The release again from the same config and seed: the same noise, the same model."""
    from training.pipeline import prepare

    data = prepare(cfg)
    p = cfg.privacy
    n = int((np.diff(data.seen[0]) > 0).sum())
    n_items = data.dataset.n_items
    sigma = gram.gaussian_sigma(p.target_epsilon, 1.0 / n)
    r = gram.release_rules(p, sigma, n_items, n)
    return data, n, sigma, gram.release(data.seen, n_items, sigma, r.lam, None, np.random.default_rng(cfg.trainer.seed), r.mu, r.share, r.power)


def test_gram_run_records_its_guarantee_in_manifest_mlflow_and_ledger(gram_run):
    from mlflow import MlflowClient

    cfg, result = gram_run
    manifest = json.loads((result.artifact_dir / "manifest.json").read_text())
    _, n, sigma, _ = refit(cfg)
    assert n == 90  # 120 users less the audit's quarter
    privacy = manifest["provenance"]["privacy"]
    assert privacy["mode"] == "dp" and privacy["unit"] == "user" and privacy["training_users"] == n
    assert privacy["mechanism"] == gram.MECHANISM and privacy["accountant"] == "analytic gaussian (Balle & Wang 2018)"
    assert privacy["epsilon"] == pytest.approx(2.0, rel=1e-8) and privacy["delta"] == pytest.approx(1 / n)
    sg = sigma / math.sqrt(0.8)  # 20 % of the budget went to the popularity vector: 1/sg^2 = 0.8/sigma^2
    assert privacy["sigma"] == pytest.approx(sigma) and privacy["lambda"] == pytest.approx(2.7 * (sg * 60 / 90) * sg * math.sqrt(2 * 60))  # noise_snr, factor 2.7
    assert privacy["sigma_gram"] == pytest.approx(sg) and privacy["sigma_popularity"] == pytest.approx(sigma / math.sqrt(0.2))
    assert privacy["popularity_share"] == 0.2 and "popularity vector" in privacy["fallback"] and "popularity vector" in manifest["ease"]["fallback"]
    assert privacy["weight_power"] == 0.25 and privacy["weight_rule"] == "privacy.gram_weight_power"
    assert "unit L2 norm" in privacy["clipping"]
    assert privacy["ledger"]["cumulative_epsilon"] == pytest.approx(2.0) and privacy["ledger"]["releases"] == 1
    assert manifest["model"]["kind"] == "ease_dp" and manifest["features"]["user"] == ["history"]
    assert max(manifest["parity"].values()) <= cfg.export.parity_atol
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(result.run_id)
    assert run.data.metrics["privacy/epsilon"] == pytest.approx(privacy["epsilon"])
    assert run.data.metrics["privacy/sigma"] == pytest.approx(sigma) and run.data.metrics["privacy/sigma_gram"] == pytest.approx(sg)
    assert run.data.metrics["privacy/popularity_share"] == pytest.approx(0.2) and run.data.params["privacy.gram_popularity_share"] == "0.2"
    assert run.data.tags["privacy.mechanism"] == gram.MECHANISM and run.data.tags["privacy.accountant"] == gram.ACCOUNTANT
    assert run.data.tags["model"] == "ease_dp" and run.info.run_name == "ease_dp-synthetic-dp-eps2-s0"
    assert result.model_version == "1"  # registered like any model
    from features.privacy_ledger import entries
    from features.store import FeatureStore

    store = FeatureStore(cfg.store.url)
    try:
        (entry,) = entries(store)
    finally:
        store.close()
    assert entry["mechanism"] == gram.MECHANISM and entry["accountant"] == gram.ACCOUNTANT
    assert entry["epsilon"] == pytest.approx(2.0) and entry["delta"] == pytest.approx(1 / n)


def test_gram_bundle_serves_the_release_unchanged(gram_run):
    """The ONNX tower the Recommender runs gives x P of the refitted release; a known user's list is
    the top of x B without their history; an unknown user gets the release's own popularity ranking
    (here the row sums and the popularity vector combined)."""
    from features.store import FeatureStore
    from serving.recommender import Recommender, UserState

    cfg, result = gram_run
    data, _, _, model = refit(cfg)
    manifest = json.loads((result.artifact_dir / "manifest.json").read_text())
    ds = data.dataset
    assert manifest["popularity"] == ds.item_vocab.decode(model.popularity(cfg.export.popularity_top_n))
    np.testing.assert_allclose(np.load(result.artifact_dir / "item_embeddings.npy"), model.item_factors)

    store = FeatureStore(cfg.store.url)
    try:
        rec = Recommender.from_dir(result.artifact_dir, store=store)
        users = np.flatnonzero(np.diff(data.seen[0]) > 0)[:5]
        hist = [np.unique(data.seen[1][data.seen[0][u] : data.seen[0][u + 1]]) for u in users]
        states = [UserState(h, np.ones(len(h), np.float32), None) for h in hist]
        served = rec.user_vectors(states, [int(u) for u in users])
        x = blend.binary_rows(data.seen, users, ds.n_items)
        np.testing.assert_allclose(served, model.user_vectors(x), atol=cfg.export.parity_atol)
        user = ds.user_vocab.ids[int(users[0])]
        got = [r["item_id"] for r in rec.recommend(user, k=5)["items"]]
        store_items = [i for i, _ in store.user_interactions(user)]
        avoided = set((store.user_profile(user) or {}).get("avoided_genres") or [])  # serving drops those items
        seen = set(store_items) | {it["item_id"] for it in rec.items if avoided & set(it["genres"])}
        scores = model.scores(blend.binary_rows((np.array([0, len(store_items)]), ds.item_vocab.encode(store_items)), np.array([0]), ds.n_items))[0]
        order = [ds.item_vocab.ids[i] for i in np.argsort(-scores, kind="stable") if ds.item_vocab.ids[i] not in seen]
        assert got == order[:5]
        cold = rec.recommend("nobody-knows-me", k=5)
        assert [r["item_id"] for r in cold["items"]] == manifest["popularity"][:5]
    finally:
        store.close()


def test_trustrec_evaluate_of_the_gram_bundle_reproduces_its_test_metrics(gram_run):
    """`trustrec evaluate` scores the exported bundle through ONNX Runtime as serving does: the same
    figures as the run computed before export."""
    from training.offline import evaluate_bundle

    cfg, result = gram_run
    again = evaluate_bundle(cfg, str(result.artifact_dir))
    for key in ("test/ndcg_at_10", "test/recall_at_10"):
        assert again[key] == pytest.approx(result.metrics[key], abs=1e-6), key


# --------------------------------------------------------------------------- the membership audit of a gram bundle
def test_log_inverse_rank_by_hand():
    from training.privacy.audit import log_inverse_rank

    # user 0 sees item 0: pool {1, 2, 3} (n_pool 3); scores 1, 2, 2 -> items 2 and 3 share ranks 1-2 (mid-rank
    # 1.5), item 1 is last (rank 3): log(3/1.5) = log 2, log(3/3) = 0. User 1 sees nothing: pool of 4,
    # scores 0, 5, 1, 3 -> ranks 4, 1, 3, 2 -> log(4/4), log(4/1), log(4/3), log(4/2)
    scores = np.array([[3.0, 1.0, 2.0, 2.0], [0.0, 5.0, 1.0, 3.0]])
    visible = (np.array([0, 1, 1]), np.array([0]))
    got = log_inverse_rank(scores, visible, np.array([0, 1]))
    np.testing.assert_allclose(got[0, 1:], [0.0, math.log(2), math.log(2)])
    np.testing.assert_allclose(got[1], [0.0, math.log(4), math.log(4 / 3), math.log(2)])
    # a strictly increasing transform of a row leaves it unchanged: no temperature to choose
    np.testing.assert_allclose(log_inverse_rank(np.exp(scores) * 7.0, visible, np.array([0, 1])), got)


def test_audit_of_a_gram_bundle_uses_ranks_and_is_blind_to_the_score_scale(gram_run, tmp_path):
    """`trustrec audit privacy` on a DP-EASE bundle: its manifest spec is {"kind": "ease", ...} (no
    TowerSpec, no temperature); the attacks run on log inverse ranks, so multiplying every item vector
    by 1000 (the scores by 1000, as a 1000x smaller lambda would roughly do) changes nothing."""
    import shutil

    from cli.main import main
    from training.privacy.audit import audit_bundle

    cfg, result = gram_run
    audit = audit_bundle(result.artifact_dir, cfg, n_boot=200)
    assert audit.statistic == "rank" and audit.privacy["mechanism"] == gram.MECHANISM
    assert (audit.n_members, audit.n_non_members) == (90, 30)  # 120 users, audit_holdout 0.25
    for r in audit.results.values():
        assert 0.0 <= r.ci_low <= r.auc <= r.ci_high <= 1.0
    scaled = tmp_path / "scaled"
    shutil.copytree(result.artifact_dir, scaled)
    np.save(scaled / "item_embeddings.npy", np.load(scaled / "item_embeddings.npy") * 1000.0)
    again = audit_bundle(scaled, cfg, n_boot=200)
    for name, r in audit.results.items():
        assert again.results[name].auc == pytest.approx(r.auc, abs=1e-12), name
    rc = main(["audit", "privacy", result.run_id, "--tracking-uri", cfg.tracking.tracking_uri, "--out", str(tmp_path / "cli"), "--bootstrap", "100"])
    assert rc == 0
    summary = json.loads((tmp_path / "cli" / "audit.json").read_text())
    assert summary["statistic"] == "rank" and summary["n_non_members"] == 30
    assert summary["attacks"]["calibrated"]["auc"] == pytest.approx(audit.results["calibrated"].auc)


def test_rank_audit_finds_a_gram_release_that_memorized_its_users(gram_run, tmp_path):
    """The attack can fail the model: a noiseless release at a tiny lambda on fewer users than items
    interpolates its members' co-occurrences, and the calibrated rank attack tells them apart (AUC
    0.99 when written; the noised releases of these 40 members score 0.6-0.8: eps 2-8 on 40 users
    bounds little)."""
    from training.export import write_ease_artifacts
    from training.pipeline import prepare
    from training.privacy.audit import audit_bundle

    root = tmp_path / "memorize"
    cfg = load_config(REPO / "configs" / "ease_dp.yaml", tiny_overrides(root) + [
        "data.synthetic.n_users=80", "data.synthetic.n_items=200", "privacy.audit_holdout=0.5", "privacy.ledger=false"])  # fmt: skip
    data = prepare(cfg)
    model = gram.release(data.seen, data.dataset.n_items, 0.0, 1e-3, None, np.random.default_rng(0))  # sigma 0: not private
    write_ease_artifacts(model, data.dataset, data.seen, root / "bundle", {}, {"privacy": {"mode": "none"}}, [], 1e-3)
    audit = audit_bundle(root / "bundle", cfg, n_boot=200)
    assert audit.n_non_members == 40
    assert audit.results["calibrated"].ci_low > 0.6, audit.results


def _ml1m() -> tuple[object, str]:
    from features.sources import DatasetNotFound, named_path

    try:
        return named_path("ml1m-implicit"), ""
    except DatasetNotFound as e:
        return None, f"skipped: {e}"


ML1M, ML1M_ABSENT = _ml1m()


@pytest.mark.skipif(ML1M is None, reason=ML1M_ABSENT)
def test_the_ml1m_recipe_covers_the_given_split_less_the_audit_holdout():
    """configs/ease_dp_ml1m.yaml on the real data: 6,040 users, 3,695 items with a train interaction,
    the audit's 20 % held out, delta = 1 / the 4,832 users the release covers, sigma at eps 8 and 1."""
    from training.pipeline import prepare

    cfg = load_config(REPO / "configs" / "ease_dp_ml1m.yaml", ["store.load=false", "privacy.ledger=false", "tracking.enabled=false"])
    assert (cfg.split.protocol, cfg.privacy.mechanism, cfg.privacy.target_epsilon) == ("given", "gram", 8.0)
    data = prepare(cfg)
    members = int((np.diff(data.seen[0]) > 0).sum())
    assert (data.dataset.n_users, data.dataset.n_items, members) == (6040, 3695, 4832)
    assert gram.gaussian_sigma(8.0, 1 / members) == pytest.approx(0.5239, abs=1e-4)  # the run's logged sigma
    assert gram.gaussian_delta(gram.gaussian_sigma(1.0, 1 / members), 1.0) == pytest.approx(1 / members, rel=1e-6)
