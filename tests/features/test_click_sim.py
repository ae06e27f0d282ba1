"""The click simulator: its preferences are the synthetic generator's, its click model is the
position-based one by hand, its exact values match many seeded draws."""
import numpy as np
import pytest

from features.click_sim import Population, latent, rank, simulate_experiment
from features.config import SyntheticConfig
from features.synthetic import generate

SMALL = SyntheticConfig(n_users=120, n_items=90, seed=3)


@pytest.fixture(scope="module")
def pop():
    return Population(SMALL)


def test_latent_structure_is_the_generators():
    ds = generate(SMALL)
    lat = latent(SMALL)
    genres = [tuple(int(g) for g in np.flatnonzero(row)) for row in lat.item_genre_mean > 0]
    assert genres == ds.items.genres
    order = np.argsort(-lat.taste, axis=1, kind="stable")
    assert [tuple(int(g) for g in r[:2]) for r in order] == ds.users.liked_genres
    assert [(int(r[-1]),) for r in order] == ds.users.avoided_genres
    assert Population(SMALL).user_vocab == ds.user_vocab and Population(SMALL).item_vocab == ds.item_vocab


def test_relevance_and_click_probability_by_hand(pop):
    lat, c = pop.latent, SMALL
    util = lat.pop_logit[None, :] + c.taste_strength * lat.taste @ lat.item_genre_mean.T + c.factor_strength * lat.p @ lat.q.T
    m, s = util.mean(), util.std()
    u, i, j = 7, 42, 2
    rel = 1.0 / (1.0 + np.exp(-(-3.0 + (util[u, i] - m) / s)))
    assert pop.relevance([u], [[i]])[0, 0] == pytest.approx(rel, rel=1e-10)
    assert pop.relevance_matrix([u])[0, i] == pytest.approx(rel, rel=1e-10)
    lists = np.array([[5, 6, i, -1]])
    probs = pop.click_probabilities([u], lists)[0]
    assert probs[j] == pytest.approx(rel / 3.0)  # theta_2 = 1 / 3
    assert probs[3] == 0.0  # empty slot
    assert pop.expected_clicks([u], lists)[0] == pytest.approx(probs.sum())
    assert pop.expected_ctr([u], lists) == pytest.approx(probs.sum() / 3)  # 3 shown items, not 4


def test_theta_is_decreasing_and_documented():
    assert Population(SMALL).theta(4) == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    assert Population(SMALL, eta=0.5).theta(3) == pytest.approx([1, 2**-0.5, 3**-0.5])
    assert Population(SMALL, eta=0.0).theta(3).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="eta"):
        Population(SMALL, eta=-1)


def test_sampled_clicks_match_the_exact_probabilities(pop):
    users = np.array([0, 1, 2])
    lists = pop.top_k(users, 5)
    probs = pop.click_probabilities(users, lists)
    rng, n = np.random.default_rng(0), 20_000
    freq = np.mean([pop.sample_clicks(users, lists, rng) for _ in range(n)], axis=0)
    assert np.all(np.abs(freq - probs) < 4 * np.sqrt(probs * (1 - probs) / n) + 1e-12)
    assert not pop.sample_clicks(users, np.full((3, 2), -1), rng).any()


def test_the_oracle_beats_a_noisy_model_beats_popularity_beats_random():
    pop = Population()
    users = np.arange(pop.n_users)
    oracle = pop.expected_ctr(users, pop.top_k(users, 10))
    noisy = pop.expected_ctr(users, pop.top_k(users, 10, noise=1.0, rng=np.random.default_rng(0)))
    popular = pop.expected_ctr(users, np.tile(np.argsort(-pop.latent.pop_logit)[:10], (pop.n_users, 1)))
    rnd = pop.expected_ctr(users, np.random.default_rng(0).integers(0, pop.n_items, (pop.n_users, 10)))
    assert oracle > noisy > popular > 2 * rnd
    assert 0.01 < rnd < 0.05 and oracle < 0.3  # plausible click-through rates


def test_top_k_is_the_best_first_ranking(pop):
    z = pop.scores([4])[0]
    assert pop.top_k([4], 6)[0].tolist() == np.argsort(-z, kind="stable")[:6].tolist()
    assert rank(np.array([[0.1, 0.9, 0.5, 0.9]]), 3).tolist() == [[1, 3, 2]]
    with pytest.raises(ValueError, match="rng"):
        pop.top_k([4], 3, noise=1.0)


def test_clicks_for_raw_ids_is_the_same_model(pop):
    ids = ["i3", "i10", "i1"]
    got = pop.clicks_for("u5", ids, np.random.default_rng(9))
    want = pop.sample_clicks([4], [[2, 9, 0]], np.random.default_rng(9))[0]
    assert got == want.tolist() and all(isinstance(c, bool) for c in got)
    assert pop.clicks_for("u5", [], np.random.default_rng(0)) == []
    with pytest.raises(ValueError, match="user_id"):
        pop.clicks_for("u999", ids, np.random.default_rng(0))
    with pytest.raises(ValueError, match="item_ids.*'i0'"):
        pop.clicks_for("u5", ["i0", "i1"], np.random.default_rng(0))


def test_bad_lists_and_users_are_named(pop):
    with pytest.raises(ValueError, match="lists holds item indices outside"):
        pop.relevance([0], [[90]])
    with pytest.raises(ValueError, match="users holds indices outside"):
        pop.relevance([120], [[1]])
    with pytest.raises(ValueError, match="one row each"):
        pop.relevance([0, 1], [[1]])
    with pytest.raises(ValueError, match="lists must be a 2-D integer"):
        pop.relevance([0], [[1.5]])
    with pytest.raises(ValueError, match="undefined"):
        pop.expected_ctr([0], [[-1, -1]])


def test_simulated_experiment_truth_and_assignment(pop):
    everyone = np.arange(pop.n_users)
    best = pop.top_k(everyone, 4)
    arms = {"a": lambda u: np.tile([0, 1, 2, 3], (len(u), 1)), "b": lambda u: best[u]}
    log = simulate_experiment(pop, arms, {"a": 1, "b": 1}, 3000, np.random.default_rng(1))
    assert log.true_ctr["b"] == pytest.approx(pop.expected_ctr(everyone, best))
    assert log.true_ctr["a"] == pytest.approx(pop.expected_ctr(everyone, np.tile([0, 1, 2, 3], (pop.n_users, 1))))
    assert sum(log.assigned.values()) == 3000 and abs(log.assigned["a"] - 1500) < 4 * np.sqrt(750)
    assert len(np.unique(log.unit)) == 3000 and log.lists.shape == (len(log.unit), 4)
    b_rows = log.arm == "b"
    assert (log.lists[b_rows] == best[log.user[b_rows]]).all()
    # every participant sees one arm; mean exposures ~ 3
    assert all(len(set(log.arm[log.unit == u])) == 1 for u in range(50))
    assert 2.8 < len(log.unit) / 3000 < 3.2
    broken = simulate_experiment(pop, arms, {"a": 1, "b": 1}, 20_000, np.random.default_rng(1), split={"a": 0.52, "b": 0.48})
    assert broken.assigned["a"] > 10_200
    with pytest.raises(ValueError, match="weights must name exactly the arms"):
        simulate_experiment(pop, arms, {"a": 1}, 10, np.random.default_rng(0))
