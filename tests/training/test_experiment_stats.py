"""Experiment statistics by hand (delta method, lift, SRM, per-user totals) and on the click
simulator, whose true lift is known exactly."""
import math
import time

import numpy as np
import pytest
from scipy import stats as sps

from features.click_sim import Population, simulate_experiment
from training.experiments import stats

Z = 1.959963984540054


def test_ratio_delta_method_by_hand():
    x = np.array([1.0, 2.0, 0.0, 3.0])  # clicks per user
    y = np.array([2.0, 3.0, 1.0, 4.0])  # shown items per user
    n, mx, my = 4, 1.5, 2.5
    sxx = ((x - mx) ** 2).sum() / 3  # 5/3
    syy = ((y - my) ** 2).sum() / 3  # 5/3
    sxy = ((x - mx) * (y - my)).sum() / 3  # 5/3
    # Deng et al. 2018: Var(X̄/Ȳ) = (1/n)(sxx/my² - 2 mx sxy/my³ + mx² syy/my⁴)
    var = (sxx / my**2 - 2 * mx * sxy / my**3 + mx**2 * syy / my**4) / n
    got = stats.ratio(x, y)
    assert got.value == pytest.approx(6 / 10)
    assert got.se == pytest.approx(math.sqrt(var))
    assert (got.low, got.high) == pytest.approx((0.6 - Z * math.sqrt(var), 0.6 + Z * math.sqrt(var)))
    assert got.n == 4 and got.method == "delta"


def test_a_mean_is_the_ratio_with_denominator_one():
    conv = np.array([1, 0, 0, 1, 1], dtype=float)
    got = stats.ratio(conv)
    assert got.value == pytest.approx(0.6)
    assert got.se == pytest.approx(math.sqrt(0.3 / 5))  # sample variance 0.3 (ddof 1)


def test_bootstrap_agrees_with_delta_on_many_users_and_is_seeded():
    rng = np.random.default_rng(0)
    y = rng.integers(1, 20, 3000).astype(float)
    x = rng.binomial(y.astype(int), 0.1).astype(float)
    d = stats.ratio(x, y)
    b = stats.ratio(x, y, method="bootstrap", n_boot=1000, seed=1)
    assert b.value == d.value and b.method == "bootstrap"
    assert b.se == pytest.approx(d.se, rel=0.1)
    assert b.low == pytest.approx(d.low, abs=0.2 * d.se) and b.high == pytest.approx(d.high, abs=0.2 * d.se)
    assert stats.ratio(x, y, method="bootstrap", n_boot=1000, seed=1) == b


def test_lift_by_hand():
    t = (np.array([2.0, 1.0, 3.0]), np.array([4.0, 4.0, 4.0]))
    c = (np.array([1.0, 0.0, 2.0, 1.0]), np.array([5.0, 5.0, 5.0, 5.0]))
    rt, rc = 6 / 12, 4 / 20
    vt = np.var(t[0] / 4, ddof=1) / 3  # constant denominators: the ratio is a plain mean of x / y
    vc = np.var(c[0] / 5, ddof=1) / 4
    got = stats.lift(t, c)
    assert got.absolute.value == pytest.approx(rt - rc)
    assert got.absolute.se == pytest.approx(math.sqrt(vt + vc))
    assert got.relative.value == pytest.approx(rt / rc - 1)
    assert got.relative.se == pytest.approx(math.sqrt(vt / rc**2 + rt**2 * vc / rc**4))
    assert got.absolute.n == 7
    boot = stats.lift(t, c, method="bootstrap", n_boot=500)
    assert boot.absolute.value == pytest.approx(rt - rc) and boot.absolute.low < boot.absolute.high


def test_srm_by_hand():
    broken = stats.srm({"control": 10_400, "treatment": 9_600}, {"control": 50, "treatment": 50})
    assert broken.chi2 == pytest.approx(2 * 400**2 / 10_000)  # 32
    assert broken.p_value == pytest.approx(sps.chi2.sf(32, 1))
    assert broken.mismatch and broken.expected == {"control": 10_000.0, "treatment": 10_000.0}
    ok = stats.srm({"control": 10_050, "treatment": 9_950}, {"control": 0.5, "treatment": 0.5})
    assert ok.chi2 == pytest.approx(2 * 50**2 / 10_000) and not ok.mismatch  # 0.5
    three = stats.srm({"a": 200, "b": 100, "c": 100}, {"a": 2, "b": 1, "c": 1})
    assert three.chi2 == 0.0 and three.p_value == pytest.approx(1.0)


def test_per_user_totals_and_sticky_assignment():
    tot = stats.per_user(["u2", "u1", "u2", "u3"], ["b", "a", "b", "a"], [10, 10, 5, 10], [1, 0, 2, 3])
    assert tot.user.tolist() == ["u1", "u2", "u3"] and tot.arm.tolist() == ["a", "b", "a"]
    assert tot.exposures.tolist() == [1, 2, 1] and tot.shown.tolist() == [10, 15, 10] and tot.clicks.tolist() == [0, 3, 3]
    with pytest.raises(ValueError, match=r"users: \['u2'\] logged under more than one arm"):
        stats.per_user(["u2", "u1", "u2"], ["b", "a", "a"], [1, 1, 1], [0, 0, 0])
    with pytest.raises(ValueError, match="clicks <= shown"):
        stats.per_user(["u1"], ["a"], [1], [2])


def test_report_by_hand_with_guardrails():
    users = ["u1", "u2", "u3", "u4", "u1", "u5"]
    arms = ["c", "c", "t", "t", "c", "t"]
    lists = np.array([[0, 1], [0, 1], [2, 3], [2, 4], [0, 1], [3, -1]])
    shown = (lists >= 0).sum(axis=1)
    clicks = [1, 0, 1, 2, 0, 1]
    genres = np.array([[1, 0], [1, 0], [0, 1], [1, 1], [0, 1]], dtype=bool)
    rep = stats.report(users, arms, shown, clicks, control="c", weights={"c": 1, "t": 1}, lists=lists, n_items=5, item_pop=[10, 8, 2, 1, 1], item_genres_multi_hot=genres)
    c, t = rep["arms"]["c"], rep["arms"]["t"]
    assert (c["users"], c["exposures"], c["shown"], c["clicks"]) == (2, 3, 6, 1)
    assert (t["users"], t["exposures"], t["shown"], t["clicks"]) == (3, 3, 5, 4)
    assert c["ctr"]["value"] == pytest.approx(1 / 6) and t["ctr"]["value"] == pytest.approx(4 / 5)
    assert c["conversion"]["value"] == pytest.approx(1 / 2) and t["conversion"]["value"] == pytest.approx(1.0)
    assert c["clicks_per_exposure"]["value"] == pytest.approx(1 / 3) and t["clicks_per_exposure"]["value"] == pytest.approx(4 / 3)
    assert t["lift"]["clicks_per_exposure"]["absolute"]["value"] == pytest.approx(1.0)
    assert t["lift"]["ctr"]["absolute"]["value"] == pytest.approx(4 / 5 - 1 / 6)
    assert t["lift"]["ctr"]["relative"]["value"] == pytest.approx((4 / 5) / (1 / 6) - 1)
    assert c["guardrails"]["coverage"] == pytest.approx(2 / 5) and t["guardrails"]["coverage"] == pytest.approx(3 / 5)
    assert c["guardrails"]["popularity"] == pytest.approx(9.0)  # items 0 and 1 in every control list
    assert t["guardrails"]["popularity"] == pytest.approx(((2 + 1) / 2 + (2 + 1) / 2 + 1) / 3)
    assert c["guardrails"]["diversity"] == pytest.approx(0.0)  # both items only genre 0
    assert "lift" not in c and rep["srm"]["observed"] == {"c": 2, "t": 3} and not rep["srm"]["mismatch"]
    rep2 = stats.report(users, arms, shown, clicks, control="c", weights={"c": 1, "t": 1}, assigned={"c": 5000, "t": 5400})
    assert rep2["srm"]["mismatch"] and "guardrails" not in rep2["arms"]["c"]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: stats.ratio([1, 2], [1, 2], alpha=1.5), "alpha"),
        (lambda: stats.ratio([1, 2], [1, 2], method="jackknife"), "method"),
        (lambda: stats.ratio([1, 2, 3], [1, 2]), "one value per user"),
        (lambda: stats.ratio([1], [1]), "at least 2 users"),
        (lambda: stats.ratio([1, float("nan")], [1, 1]), "NaN"),
        (lambda: stats.lift(([1, 2], [1, 1]), ([0, 0], [1, 1])), "relative lift is undefined"),
        (lambda: stats.srm({"a": 1, "b": 2}, {"a": 1, "c": 1}), "same arms"),
        (lambda: stats.srm({"a": 1, "b": 2}, {"a": 1, "b": 0}), "weights must be finite and > 0"),
        (lambda: stats.report(["u"], ["a"], [1], [0], control="z", weights={"a": 1, "b": 1}), "control"),
        (lambda: stats.report(["u", "v"], ["a", "x"], [1, 1], [0, 0], control="a", weights={"a": 1, "b": 1}), r"arms: \['x'\]"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------- on the simulator


@pytest.fixture(scope="module")
def ab():
    pop = Population()
    everyone = np.arange(pop.n_users)
    popular = np.argsort(-pop.latent.pop_logit, kind="stable")[:10]
    personal = pop.top_k(everyone, 10, noise=1.0, rng=np.random.default_rng(7))
    arms = {"popularity": lambda u: np.tile(popular, (len(u), 1)), "personalized": lambda u: personal[u]}
    return pop, arms, {"popularity": 0.5, "personalized": 0.5}


def test_lift_ci_covers_the_true_lift_in_at_least_93_of_100_experiments(ab):
    pop, arms, weights = ab
    started = time.perf_counter()
    covered = {"absolute": 0, "relative": 0}
    for seed in range(100):
        log = simulate_experiment(pop, arms, weights, 2000, np.random.default_rng(seed))
        truth_t, truth_c = log.true_ctr["personalized"], log.true_ctr["popularity"]
        rep = stats.report(log.unit, log.arm, (log.lists >= 0).sum(axis=1), log.clicks.sum(axis=1), control="popularity", weights=weights, assigned=log.assigned)
        lift = rep["arms"]["personalized"]["lift"]["ctr"]
        covered["absolute"] += lift["absolute"]["low"] <= truth_t - truth_c <= lift["absolute"]["high"]
        covered["relative"] += lift["relative"]["low"] <= truth_t / truth_c - 1 <= lift["relative"]["high"]
    assert truth_t / truth_c - 1 > 0.05  # a real effect to measure
    print(f"95 % CI covered the true lift: {covered} of 100")
    assert covered["absolute"] >= 93 and covered["relative"] >= 93, covered
    assert time.perf_counter() - started < 60


def test_srm_fires_on_a_broken_split_and_not_on_a_correct_one(ab):
    pop, arms, weights = ab
    fine = simulate_experiment(pop, arms, weights, 20_000, np.random.default_rng(5))
    broken = simulate_experiment(pop, arms, weights, 20_000, np.random.default_rng(5), split={"popularity": 0.52, "personalized": 0.48})
    assert not stats.srm(fine.assigned, weights).mismatch
    assert stats.srm(broken.assigned, weights).mismatch
