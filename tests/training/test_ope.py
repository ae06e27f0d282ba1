"""Off-policy estimators by hand, in exact expectation over bundle.policy's slate distribution, on the
click simulator, and against an independent implementation (vw-estimators) when one is installed."""
import itertools
import json
import math
import os
import subprocess

import numpy as np
import pytest

from bundle.policy import explore_slate, in_support, propensity
from features.click_sim import Population, rank
from training.experiments import ope

Z = 1.959963984540054

# A tiny log by hand: 4 lists of 2 slots, one target for every list.
LOGGED = np.array([[0, 1], [1, 0], [2, 0], [0, 2]])
MU = np.array([[0.8, 0.5], [0.25, 0.2], [0.1, 0.2], [0.8, 0.1]])
CLICKS = np.array([[1, 0], [1, 1], [0, 1], [0, 1]], dtype=float)
TARGET = np.array([[0, 2]] * 4)
# weights [logged == target] / mu: list 0 slot 0: 1/0.8 = 1.25; list 3: 1.25 and 1/0.1 = 10; the rest 0


def test_ips_by_hand():
    y = np.array([1.25 * 1, 0.0, 0.0, 1.25 * 0 + 10 * 1])  # per-list sum_j w c
    got = ope.ips(LOGGED, CLICKS, MU, TARGET)
    assert got.clicks_per_list == pytest.approx(11.25 / 4)
    assert got.se == pytest.approx(y.std(ddof=1) / 2)
    assert (got.low, got.high) == pytest.approx((2.8125 - Z * got.se, 2.8125 + Z * got.se))
    assert got.ctr == pytest.approx(2.8125 / 2) and got.ctr_high == pytest.approx(got.high / 2)  # 2 target items per list
    assert got.n == 4 and got.estimator == "ips"


def test_snips_by_hand():
    # position 0: sum w c = 1.25, sum w = 2.5 -> 0.5; position 1: 10 / 10 -> 1.0
    got = ope.snips(LOGGED, CLICKS, MU, TARGET)
    assert got.clicks_per_list == pytest.approx(1.5)
    # delta method: psi_r = sum_j (a_rj - R_j b_rj) / mean(b_j), mean(b) = (0.625, 2.5):
    # list 0: (1.25 - 0.5 * 1.25) / 0.625 = 1; list 3: (0 - 0.5 * 1.25) / 0.625 + (10 - 10) / 2.5 = -1
    assert got.se == pytest.approx(np.std([1, 0, 0, -1], ddof=1) / 2)


def test_doubly_robust_by_hand():
    q = np.array([[0.4, 0.3]] * 4)
    # per list: 0.4 + 0.3 + sum_j w (c - q): 0.7 + 1.25 * 0.6 = 1.45; 0.7; 0.7; 0.7 + 1.25 * -0.4 + 10 * 0.7 = 7.2
    y = np.array([1.45, 0.7, 0.7, 7.2])
    got = ope.doubly_robust(LOGGED, CLICKS, MU, TARGET, q)
    assert got.clicks_per_list == pytest.approx(y.mean()) and got.se == pytest.approx(y.std(ddof=1) / 2)


def test_replay_by_hand():
    explored = np.array([False, True, True, True])
    # explored lists 1-3; only list 3 matches the target, at both positions: clicks 0 and 1
    got = ope.replay(LOGGED, CLICKS, TARGET, explored)
    assert got.clicks_per_list == pytest.approx(0.0 + 1.0) and got.se == pytest.approx(0.0) and got.n == 3
    explored2 = np.array([True, True, True, True])  # now list 0 matches at position 0 too, clicked
    assert ope.replay(LOGGED, CLICKS, TARGET, explored2).clicks_per_list == pytest.approx((1 + 0) / 2 + 1.0)


def test_padding_target_and_log():
    logged = np.array([[3, -1], [3, 4]])
    mu = np.array([[0.5, 0.0], [0.5, 0.25]])  # an empty slot's propensity is never read
    clicks = np.array([[1, 0], [0, 1]], dtype=float)
    target = np.array([[3, 4], [3, -1]])
    got = ope.ips(logged, clicks, mu, target)
    assert got.clicks_per_list == pytest.approx((2.0 + 0.0) / 2)  # the second list's item 4 is not the target's
    assert got.ctr == pytest.approx(1.0 / 1.5)  # 3 target items over 2 lists
    # SNIPS: position 0 ratio 2 / 4 = 0.5 for every list; position 1 filled in half the lists, no weight there
    assert math.isnan(ope.snips(logged, clicks, mu, target).clicks_per_list)
    assert ope.snips(logged, clicks, mu, target[:, :1]).clicks_per_list == pytest.approx(0.5)


def test_target_equal_to_a_deterministic_logging_policy_gives_the_on_policy_mean():
    rng = np.random.default_rng(0)
    logged = np.stack([rng.permutation(20)[:3] for _ in range(50)])
    clicks = (rng.random((50, 3)) < 0.3).astype(float)
    ones = np.ones((50, 3))
    on_policy = clicks.sum(axis=1)
    for est in (ope.ips(logged, clicks, ones, logged), ope.snips(logged, clicks, ones, logged), ope.doubly_robust(logged, clicks, ones, logged, rng.random((50, 3)))):
        assert est.clicks_per_list == pytest.approx(on_policy.mean())
        assert est.se == pytest.approx(on_policy.std(ddof=1) / math.sqrt(50))


def test_doubly_robust_with_a_perfect_reward_model_has_zero_variance():
    # clicks are a deterministic function of (item, position) and q̂ is that function
    reward = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])  # item x position
    logged = np.array([[0, 1], [1, 2], [2, 0], [1, 0]])
    clicks = reward[logged, [0, 1]]
    mu = np.full((4, 2), 0.5)
    target = np.array([[2, 1]] * 4)
    got = ope.doubly_robust(logged, clicks, mu, target, reward[target, [0, 1]])
    assert got.clicks_per_list == pytest.approx(1.0 + 0.0) and got.se == 0.0
    assert ope.ips(logged, clicks, mu, target).se > 0  # IPS is not


def _slate_distribution(ranked, k, eps, pool):
    """Every list bundle.policy.explore_slate can serve, with its probability."""
    n = min(pool, len(ranked))
    dist = {tuple(ranked[:k]): 1 - eps}
    for perm in itertools.permutations(ranked[:n], k):
        dist[perm] = dist.get(perm, 0.0) + eps / math.perm(n, k)
    return dist


@pytest.mark.parametrize("target", [[9, 5], [3, 5], [5, 3], [1, 9]])
def test_ips_dr_and_replay_are_unbiased_in_exact_expectation(target):
    ranked, k, eps, pool = np.array([5, 3, 9, 1]), 2, 0.4, 3
    p = {(i, j): 0.05 + 0.1 * ((i * 7 + j * 3) % 5) for i in ranked for j in range(k)}  # P(click | item, position)
    q_hat = {(i, j): 0.2 for i in ranked for j in range(k)}  # a poor reward model
    dist = _slate_distribution(ranked, k, eps, pool)
    assert sum(dist.values()) == pytest.approx(1.0)
    e_ips = e_dr = 0.0
    e_match = np.zeros(k)
    e_match_click = np.zeros(k)
    for slate, prob in dist.items():
        mu = [propensity(i, j, ranked, k, eps, pool) for j, i in enumerate(slate)]
        w = [float(i == t) / m for i, t, m in zip(slate, target, mu)]
        e_ips += prob * sum(wj * p[(i, j)] for j, (i, wj) in enumerate(zip(slate, w)))  # E[click] = p
        e_dr += prob * sum(q_hat[(t, j)] + wj * (p[(i, j)] - q_hat[(t, j)]) for j, (i, t, wj) in enumerate(zip(slate, target, w)))
        if slate != tuple(ranked[:k]) or prob < 1 - eps:  # the explored branch, conditioned on
            pe = eps / math.perm(pool, k)
            for j, (i, t) in enumerate(zip(slate, target)):
                e_match[j] += pe * (i == t)
                e_match_click[j] += pe * (i == t) * p[(i, j)]
    truth = sum(p[(t, j)] if t in ranked[:pool] else 0.0 for j, t in enumerate(target))
    if all(t in ranked[:pool] for t in target):
        assert e_ips == pytest.approx(truth) and e_dr == pytest.approx(truth)
        assert (e_match_click / e_match).sum() == pytest.approx(truth)  # replay's ratio of expectations
    else:  # item 1 is outside the pool: never shown, so no estimator can credit it
        assert not in_support(np.array(target), ranked, k, eps, pool).all()
        assert e_ips == pytest.approx(truth) and truth < sum(p[(t, j)] for j, t in enumerate(target))


def test_support_and_logging_propensities_follow_bundle_policy():
    rankings = np.array([[5, 3, 9, 1, 7], [1, 2, 3, 4, 5]])
    target = np.array([[5, 9, -1], [7, 1, 2]])
    mu = ope.logging_propensities(target, rankings, 3, 0.2, 4)
    for r in range(2):
        for j in range(3):
            want = propensity(int(target[r, j]), j, rankings[r], 3, 0.2, 4) if target[r, j] >= 0 else 0.0
            assert mu[r, j] == want
    assert mu[0].tolist() == pytest.approx([0.8 + 0.05, 0.05, 0.0]) and mu[1].tolist() == pytest.approx([0.0, 0.05, 0.05])  # 7: outside the pool
    assert ope.support(target, mu) == pytest.approx(4 / 5)
    assert in_support(target[1], rankings[1], 3, 0.2, 4).tolist() == (mu[1] > 0).tolist()


def test_item_position_model_recovers_a_position_based_model():
    rng = np.random.default_rng(3)
    gamma = rng.uniform(0.05, 0.6, 30)
    theta = np.array([1.0, 0.6, 0.4, 0.3])
    logged = np.stack([rng.permutation(30)[:4] for _ in range(40_000)])
    clicks = (rng.random(logged.shape) < gamma[logged] * theta).astype(float)
    q = ope.item_position_model(logged, clicks, 32, smoothing=1.0)
    assert q.shape == (32, 4)
    assert q[:30] == pytest.approx(gamma[:, None] * theta, abs=0.03)
    theta_hat = q[30] / q[30, 0]  # items 30, 31 never shown: the pooled rate g at the fitted theta
    assert theta_hat == pytest.approx(theta, abs=0.03) and (q[31] == q[30]).all()
    assert q[30, 0] == pytest.approx(clicks.sum() / (theta_hat * len(logged)).sum())
    # cross-fitted: a list's own clicks never enter its q̂
    target = np.tile([1, 2, 3, 4], (len(logged), 1))
    a = ope.crossfit_q_target(logged, clicks, target, 32, seed=0)
    fold = np.random.default_rng(0).permutation(len(logged)) % 2
    row = int(np.flatnonzero(fold == 0)[0])
    changed = clicks.copy()
    changed[row] = 1 - changed[row]
    b = ope.crossfit_q_target(logged, changed, target, 32, seed=0)
    assert (a[row] == b[row]).all() and not (a[fold == 1] == b[fold == 1]).all()


@pytest.fixture(scope="module")
def simulated_log():
    """20k lists served by bundle.policy's epsilon-mixture (eps 0.5, pool 20) on the simulator; the
    candidate re-ranks the logging model's top-20 by better scores."""
    pop = Population()
    users_all = np.arange(pop.n_users)
    z = pop.scores(users_all)
    rng = np.random.default_rng(11)
    noise = rng.normal(size=z.shape)
    logging = rank(z + noise, 20)
    better = z + 0.5 * noise
    cand = np.take_along_axis(logging, rank(np.take_along_axis(better, logging, axis=1), 5), axis=1)
    user = rng.integers(0, pop.n_users, 20_000)
    slates = [explore_slate(logging[u], 5, 0.5, 20, rng) for u in user]
    items = np.stack([s.items for s in slates])
    log = {"items": items, "mu": np.stack([s.propensities for s in slates]), "explored": np.array([s.explored for s in slates]),
           "clicks": pop.sample_clicks(user, items, rng).astype(float), "target": cand[user]}  # fmt: skip
    truth = pop.expected_clicks(users_all, cand).mean()
    target_mu = ope.logging_propensities(cand, logging, 5, 0.5, 20)[user]  # per user, then per list
    return log, truth, target_mu, pop.expected_clicks(users_all, logging[:, :5]).mean()


def test_estimators_find_the_truth_on_the_simulator(simulated_log):
    log, truth, target_mu, logging_value = simulated_log
    res = ope.evaluate(log["items"], log["clicks"], log["mu"], log["target"], explored=log["explored"], n_items=800, target_propensities=target_mu)
    assert res["support"] == 1.0 and set(res["estimates"]) == {"ips", "snips", "dr", "replay"}
    assert truth > 1.05 * logging_value  # the candidate is better than what was logged
    for name, e in res["estimates"].items():
        assert e["low"] <= truth <= e["high"], (name, e, truth)
        assert abs(e["clicks_per_list"] / truth - 1) < 0.1, (name, e, truth)
    assert res["estimates"]["dr"]["se"] < res["estimates"]["ips"]["se"]  # the reward model removes variance


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ope.ips(LOGGED, CLICKS, MU, TARGET[:3]), "target must have one row per logged list"),
        (lambda: ope.ips(LOGGED, CLICKS, MU, np.zeros((4, 3), dtype=int)), "at most the log's 2 positions"),
        (lambda: ope.ips(LOGGED, CLICKS[:, :1], MU, TARGET), "clicks must have shape"),
        (lambda: ope.ips(LOGGED, CLICKS, np.where(MU == 0.8, 0.0, MU), TARGET), "propensities of shown items must be in"),
        (lambda: ope.ips(LOGGED.astype(float), CLICKS, MU, TARGET), "logged must be a 2-D integer array"),
        (lambda: ope.ips(np.array([[0, -1], [1, 2]]), np.array([[0, 1], [0, 0]]), np.ones((2, 2)), TARGET[:2]), "click on an empty slot"),
        (lambda: ope.ips(LOGGED, -CLICKS, MU, TARGET), "clicks must be >= 0"),
        (lambda: ope.ips(LOGGED, CLICKS, MU, TARGET, alpha=0), "alpha"),
        (lambda: ope.replay(LOGGED, CLICKS, TARGET, np.array([1, 0, 1, 1])), "explored must be a bool array"),
        (lambda: ope.replay(LOGGED, CLICKS, TARGET, np.array([True, False, False, False])), "at least 2 explored"),
        (lambda: ope.doubly_robust(LOGGED, CLICKS, MU, TARGET, np.zeros((4, 3))), "q_target must have shape"),
        (lambda: ope.ips(LOGGED[:1], CLICKS[:1], MU[:1], TARGET[:1]), "at least 2 lists"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------- an independent implementation

REFERENCE = os.environ.get("TRUSTREC_OPE_REFERENCE_PYTHON")  # e.g. /tmp/ope-venv/bin/python with vw-estimators installed
_REFERENCE_SCRIPT = """
import json, sys
from estimators.bandits import gaussian, ips, snips
d = json.load(sys.stdin)
out = []
for j in range(len(d["mu"][0])):
    e_ips, e_snips, interval = ips.Estimator(), snips.Estimator(), gaussian.Interval()
    for r in range(len(d["mu"])):
        args = (d["mu"][r][j], d["clicks"][r][j], 1.0 if d["logged"][r][j] == d["target"][r][j] else 0.0)
        e_ips.add_example(*args); e_snips.add_example(*args); interval.add_example(*args)
    out.append({"ips": e_ips.get(), "snips": e_snips.get(), "interval": interval.get(0.05)})
print(json.dumps(out))
"""


def _reference(logged, clicks, mu, target) -> list[dict]:
    payload = json.dumps({"logged": logged.tolist(), "clicks": clicks.tolist(), "mu": mu.tolist(), "target": target.tolist()})
    done = subprocess.run([REFERENCE, "-c", _REFERENCE_SCRIPT], input=payload, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not REFERENCE, reason="set TRUSTREC_OPE_REFERENCE_PYTHON to a python with vw-estimators installed "
                    "(python3.11 -m venv /tmp/ope-venv && /tmp/ope-venv/bin/pip install vw-estimators) to compare with it")  # fmt: skip
def test_matches_vw_estimators_on_the_same_arrays(simulated_log):
    log, _, _, _ = simulated_log
    n = 5000
    logged, clicks, mu, target = log["items"][:n], log["clicks"][:n], log["mu"][:n], log["target"][:n]
    ref = _reference(logged, clicks, mu, target)  # one contextual-bandit event per (list, position)
    # item-position IPS / SNIPS are the per-position bandit estimates summed over positions
    assert ope.ips(logged, clicks, mu, target).clicks_per_list == pytest.approx(sum(r["ips"] for r in ref), rel=1e-12)
    assert ope.snips(logged, clicks, mu, target).clicks_per_list == pytest.approx(sum(r["snips"] for r in ref), rel=1e-12)
    # with one position the list is the event, so the normal intervals coincide too
    one = ope.ips(logged[:, :1], clicks[:, :1], mu[:, :1], target[:, :1])
    assert [one.low, one.high] == pytest.approx(ref[0]["interval"], rel=1e-9)
