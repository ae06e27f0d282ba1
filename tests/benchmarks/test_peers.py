"""Peer recommenders of benchmarks/peers.py on a tiny synthetic set (fast settings), the EASE
closed form against hand arithmetic, the validation tuner, and cold users."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from features.config import SplitConfig, SyntheticConfig
from features.schema import Dataset, Interactions
from features.splits import split, user_items_csr
from features.synthetic import generate
from training.evaluation import evaluate_scores
from tests.conftest import load_script



def _load_peers():
    return load_script("benchmarks/peers.py")


peers = _load_peers()
NAMES = ("popularity", "ease", "bpr", "bivae", "als")
K = 10


@dataclass
class Prep:
    """The part of training.pipeline.Prepared the peers use."""

    dataset: Dataset
    train: tuple
    val: tuple
    seen: tuple
    test: tuple


@pytest.fixture(scope="module")
def tiny() -> Prep:
    ds = generate(SyntheticConfig(n_users=200, n_items=150))
    parts = split(ds.interactions, SplitConfig())
    csr = lambda rows: user_items_csr(rows, ds.n_users, ds.n_items)  # noqa: E731
    return Prep(ds, csr(parts.train), csr(parts.val), csr(Interactions.concat([parts.train, parts.val])), csr(parts.test))


@pytest.fixture(scope="module")
def fast_results(tiny):
    return peers.run_peers(tiny, k=K, names=NAMES, fast=True)


def _fast_peer(name: str):
    factory, _, _ = peers.PEERS[name]
    fixed, grid = peers.FAST[name]
    return factory(**{**fixed, **(grid[0] if grid else {})})


def _test_users(prep: Prep) -> np.ndarray:
    return np.flatnonzero(np.diff(prep.test[0]) > 0)


# ---------------------------------------------------------------- every peer runs and is sane

COLD_USER, DROPPED_ITEM = 3, 0


def _drop(csr, user=None, item=None):
    """The CSR without `user`'s row entries and without `item` anywhere (rows kept)."""
    indptr, indices = csr
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    keep = (rows != user) & (indices != item)
    counts = np.bincount(rows[keep], minlength=len(indptr) - 1)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), indices[keep]


@pytest.fixture(scope="module")
def fitted(tiny):
    """Each peer (fast settings) fitted once on `seen` minus user 3's history and minus item 0."""
    train = _drop(tiny.seen, user=COLD_USER, item=DROPPED_ITEM)
    out = {}
    for name in NAMES:
        peer = _fast_peer(name)
        peer.fit(train, tiny.dataset.n_users, tiny.dataset.n_items)
        out[name] = peer
    return train, out


@pytest.mark.parametrize("name", NAMES)
def test_peer_scores_shape_dtype_finite(tiny, fitted, name):
    peer = fitted[1][name]
    users = np.array([0, 5, 17, 199])
    s = peer.scores(users)
    assert s.shape == (len(users), tiny.dataset.n_items)
    assert s.dtype == np.float32
    assert np.isfinite(s).all()
    assert peer.name == name
    assert callable(peer.fit) and callable(peer.scores)  # the Peer protocol


def test_run_peers_result_keys(tiny, fast_results):
    assert list(fast_results) == list(NAMES)
    for name, r in fast_results.items():
        for key in (f"ndcg@{K}", f"precision@{K}", f"recall@{K}", f"map@{K}", "coverage", "fit_s", "params"):
            assert key in r, (name, key)
        assert r["fit_s"] >= 0 and 0 <= r[f"ndcg@{K}"] <= 1
        tuned = peers.FAST[name][1] is not None
        assert (f"val_ndcg@{K}" in r) == tuned
        if tuned:  # the refitted params are one of the grid points
            assert any(all(r["params"][k] == v for k, v in point.items()) for point in peers.FAST[name][1])


def test_learned_peers_beat_random(tiny, fast_results):
    n_items = tiny.dataset.n_items
    rng = np.random.default_rng(0)
    random_ndcg = np.mean([
        evaluate_scores(lambda b: rng.random((len(b), n_items), dtype=np.float32), _test_users(tiny), tiny.seen, tiny.test, n_items, k=K)[f"ndcg@{K}"]
        for _ in range(3)
    ])
    ndcg = {name: r[f"ndcg@{K}"] for name, r in fast_results.items()}
    for name in ("ease", "als", "bpr"):
        assert ndcg[name] > 2 * random_ndcg and ndcg[name] > random_ndcg + 0.1, (name, ndcg, random_ndcg)
    assert ndcg["popularity"] > random_ndcg  # the synthetic data has a Zipf popularity prior
    assert ndcg["bivae"] > random_ndcg + 0.05  # 30 quick epochs: learns something, no strong claim


# ---------------------------------------------------------------- EASE closed form, by hand


def test_ease_matches_hand_computed_3x3():
    # 4 users x 3 items, user 3 has no history:
    #   X = [[1,1,0],
    #        [0,1,1],
    #        [1,0,0],
    #        [0,0,0]]
    # XᵀX = [[2,1,0],[1,2,1],[0,1,1]];  λ = 1  ->  G = [[3,1,0],[1,3,1],[0,1,2]]
    # det G = 3(3·2 - 1·1) - 1(1·2 - 1·0) + 0 = 15 - 2 = 13
    # cofactors (G symmetric): C00 = 5, C01 = -2, C02 = 1, C11 = 6, C12 = -3, C22 = 8
    #   -> P = G⁻¹ = (1/13)·[[5,-2,1],[-2,6,-3],[1,-3,8]],  diag(P) = (5, 6, 8)/13
    # B_ij = -P_ij / P_jj (the 1/13 cancels), B_jj = 0:
    #   B = [[   0,  2/6, -1/8],        = [[   0, 1/3, -1/8],
    #        [ 2/5,    0,  3/8],           [ 2/5,   0,  3/8],
    #        [-1/5,  3/6,    0]]           [-1/5, 1/2,    0]]
    # scores = X B:
    #   user 0 = row0 + row1 = [2/5, 1/3, -1/8 + 3/8] = [0.4, 1/3, 0.25]
    #   user 1 = row1 + row2 = [2/5 - 1/5, 1/2, 3/8]  = [0.2, 0.5, 0.375]
    #   user 2 = row0         = [0, 1/3, -1/8]
    #   user 3 = 0 (cold)
    train = (np.array([0, 2, 4, 5, 5]), np.array([0, 1, 1, 2, 0]))
    ease = peers.EASE(lam=1.0)
    ease.fit(train, n_users=4, n_items=3)
    expected_b = np.array([[0, 1 / 3, -1 / 8], [2 / 5, 0, 3 / 8], [-1 / 5, 1 / 2, 0]])
    np.testing.assert_allclose(ease.B, expected_b, rtol=1e-6, atol=1e-7)
    expected = np.array([[0.4, 1 / 3, 0.25], [0.2, 0.5, 0.375], [0, 1 / 3, -1 / 8], [0, 0, 0]])
    np.testing.assert_allclose(ease.scores(np.arange(4)), expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- tuner


class OraclePeer:
    """Deterministic fake: puts the first `hits` validation items of every user on top, so the
    validation NDCG grows strictly with `hits`. Records what it was fitted on."""

    name = "oracle"
    fitted_on: list = []

    def __init__(self, val, hits: int, tag: str = ""):
        self.val, self.hits, self.tag = val, hits, tag

    def fit(self, train, n_users, n_items):
        OraclePeer.fitted_on.append(train)
        self.n_items = n_items

    def scores(self, users):
        indptr, indices = self.val
        s = np.zeros((len(users), self.n_items), dtype=np.float32)
        for row, u in enumerate(users):
            s[row, indices[indptr[u] : indptr[u + 1]][: self.hits]] = 1.0
        return s


def test_tune_picks_best_val_ndcg_and_fits_on_train(tiny):
    OraclePeer.fitted_on.clear()
    grid = [{"hits": 1}, {"hits": 3}, {"hits": 0}, {"hits": 2}]
    best, best_ndcg, table = peers.tune(lambda **p: OraclePeer(tiny.val, **p), grid, tiny, k=K)
    assert best == {"hits": 3}
    assert [row["params"] for row in table] == grid
    ndcgs = [row[f"ndcg@{K}"] for row in table]
    assert best_ndcg == max(ndcgs) == ndcgs[1]
    assert ndcgs[2] < ndcgs[0] < ndcgs[3] < ndcgs[1]  # strictly monotone in hits
    assert len(OraclePeer.fitted_on) == len(grid)
    for fitted in OraclePeer.fitted_on:  # tuned on train, never on seen / val
        np.testing.assert_array_equal(fitted[0], tiny.train[0])
        np.testing.assert_array_equal(fitted[1], tiny.train[1])


def test_tune_ties_keep_the_first_grid_point(tiny):
    grid = [{"hits": 2, "tag": "a"}, {"hits": 2, "tag": "b"}]
    best, _, _ = peers.tune(lambda **p: OraclePeer(tiny.val, **p), grid, tiny, k=K)
    assert best["tag"] == "a"


def test_tune_rejects_empty_grid(tiny):
    with pytest.raises(ValueError):
        peers.tune(peers.EASE, [], tiny)


def test_rated_triples_are_accepted(tiny):
    # training.pipeline may hand (indptr, indices, ratings); peers use the binary pair
    n_users, n_items = tiny.dataset.n_users, tiny.dataset.n_items
    rated = (*tiny.seen, np.full(len(tiny.seen[1]), 4.0, dtype=np.float32))
    a, b = peers.EASE(lam=50.0), peers.EASE(lam=50.0)
    a.fit(tiny.seen, n_users, n_items)
    b.fit(rated, n_users, n_items)
    np.testing.assert_array_equal(a.scores(np.arange(10)), b.scores(np.arange(10)))


# ---------------------------------------------------------------- cold users / unseen items


@pytest.mark.parametrize("name", [n for n in NAMES if n != "popularity"])
def test_cold_and_unknown_users_get_zeros(tiny, fitted, name):
    n_users, n_items = tiny.dataset.n_users, tiny.dataset.n_items
    s = fitted[1][name].scores(np.array([COLD_USER, 4, n_users + 7, -1]))
    assert s.shape == (4, n_items)
    assert not s[[0, 2, 3]].any()  # cold (no history) and out-of-range users: zeros, no error
    assert np.isfinite(s[1]).all() and s[1].std() > 0  # a warm user still gets a ranking


def test_popularity_scores_cold_users_with_the_global_counts(tiny, fitted):
    train, peers_ = fitted
    s = peers_["popularity"].scores(np.array([COLD_USER, 4]))
    np.testing.assert_array_equal(s[0], s[1])
    np.testing.assert_array_equal(s[0], np.bincount(train[1], minlength=tiny.dataset.n_items))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "popularity"])
def test_items_without_training_data_rank_last(fitted, name):
    train, peers_ = fitted
    users = np.arange(20)
    warm = np.diff(train[0])[users] > 0
    s = peers_[name].scores(users)[warm]
    assert (s[:, DROPPED_ITEM] < np.delete(s, DROPPED_ITEM, axis=1).min(axis=1)).all()


def test_cornac_indices_are_our_indices(tiny):
    n_users, n_items = tiny.dataset.n_users, tiny.dataset.n_items
    ds = peers.cornac_dataset(tiny.seen, n_users, n_items)
    assert (ds.num_users, ds.num_items) == (n_users, n_items)
    assert all(ds.uid_map[u] == u for u in range(n_users)) and all(ds.iid_map[i] == i for i in range(n_items))
    m = ds.matrix.tocsr()
    m.sort_indices()
    np.testing.assert_array_equal(m.indptr, tiny.seen[0])
    np.testing.assert_array_equal(m.indices, tiny.seen[1])
    # BPR's score(u) is row u of its factors, i.e. our user u
    bpr = _fast_peer("bpr")
    bpr.fit(tiny.seen, n_users, n_items)
    u = 11
    expected = bpr.model.u_factors[u] @ bpr.model.i_factors.T + bpr.model.i_biases
    np.testing.assert_allclose(bpr.scores(np.array([u]))[0], expected, rtol=1e-5, atol=1e-6)


def test_run_peers_seed_reaches_seeded_peers_only(tiny):
    """`seed` replaces the default seed of peers that take one; deterministic peers ignore it."""
    out = peers.run_peers(tiny, k=K, names=["popularity", "als"], fast=True, seed=7)
    assert out["als"]["params"]["seed"] == 7
    assert "seed" not in out["popularity"]["params"]
    default = peers.run_peers(tiny, k=K, names=["als"], fast=True)
    assert default["als"]["params"]["seed"] == peers.SEED


# ---------------------------------------------------------------- main: --data for any dataset


def test_main_takes_any_dataset_and_writes_its_own_json_with_params(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(peers.harness, "RESULTS", tmp_path / "results")
    rng = np.random.default_rng(0)
    lines = tmp_path / "shop" / "baskets.txt"
    lines.parent.mkdir()
    lines.write_text("".join(f"u{u} " + " ".join(f"i{i}" for i in rng.choice(25, size=8, replace=False)) + "\n" for u in range(30)))
    assert peers.main(["--data", f"lines:{lines}", "--names", "popularity,ease", "--fast"]) == 0
    report = json.loads((tmp_path / "results" / "peers_lines-shop-baskets_stratified_fast.json").read_text())
    assert report["dataset"] == "lines-shop-baskets" and report["data"]["spec"] == f"lines:{lines}" and report["protocol"] == "stratified"
    assert (report["data"]["users"], report["data"]["items"]) == (30, 25)
    assert report["peers"]["ease"]["params"]["lam"] in (10.0, 100.0) and report["peers"]["popularity"]["params"] == {}


def test_main_data_errors_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        peers.main(["--data", f"lines:{tmp_path / 'nope.txt'}"])
    assert e.value.code == 2 and f"--data lines:{tmp_path / 'nope.txt'}: file not found" in capsys.readouterr().err
