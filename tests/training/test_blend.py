"""blend.ease: EASE's closed form by hand, the blend's dot product equals its formula, and a real
pipeline run exports a bundle whose ONNX tower serves the blend (offline evaluation reproduces the
run's test metrics, serving compares items on the towers' coordinates only)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import REPO
from training import blend
from training.config import ConfigError, load_config

TRAIN = (np.array([0, 2, 4, 5]), np.array([0, 1, 1, 2, 0]))  # users {0,1}, {1,2}, {0}; 3 items


def test_gram_counts_co_occurrences_once():
    dup = (np.array([0, 3]), np.array([0, 0, 1]))  # one user rated item 0 twice: it counts once
    np.testing.assert_array_equal(blend.gram(TRAIN, 3), [[2, 1, 0], [1, 2, 1], [0, 1, 1]])
    np.testing.assert_array_equal(blend.gram(dup, 2), [[1, 1], [1, 1]])


def test_binary_rows_picks_the_asked_users():
    np.testing.assert_array_equal(blend.binary_rows(TRAIN, np.array([2, 0]), 3), [[1, 0, 0], [1, 1, 0]])
    assert blend.binary_rows(TRAIN, np.zeros(0, np.int64), 3).shape == (0, 3)


def test_ease_matrix_by_hand():
    g = blend.gram(TRAIN, 3).astype(float)
    lam = 1.0
    p = np.linalg.inv(g + lam * np.eye(3))
    b = blend.ease_matrix(g, lam)
    assert np.allclose(np.diag(b), 0)
    # off the diagonal B_ij = -P_ij / P_jj (Steck 2019)
    for i in range(3):
        for j in range(3):
            if i != j:
                assert b[i, j] == pytest.approx(-p[i, j] / p[j, j])
    # it solves min ||X - XB||² + λ||B||² with diag(B) = 0: column j's gradient vanishes off the diagonal
    x = blend.binary_rows(TRAIN, np.arange(3), 3)
    grad = x.T @ (x @ b - x) + lam * b
    grad[np.diag_indices(3)] = 0
    assert np.abs(grad).max() < 1e-12


def test_ease_inplace_equals_the_formula_in_the_same_memory():
    rng = np.random.default_rng(3)
    x = (rng.random((40, 9)) < 0.3).astype(float)
    g = x.T @ x
    work = g.copy()
    b = blend.ease_inplace(work, 2.5, block=4)  # blocks of 4: the mirroring crosses block edges
    assert np.shares_memory(b, work)
    np.testing.assert_allclose(b, blend.ease_matrix(g, 2.5), atol=1e-12)


def test_head_items_are_the_most_popular_ties_to_the_lower_index():
    # users {0,1}, {1,2}, {0}, {1}: item 1 has 3 users, item 0 has 2, item 2 has 1
    train = (np.array([0, 2, 4, 5, 6]), np.array([0, 1, 1, 2, 0, 1]))
    np.testing.assert_array_equal(blend.head_items(train, 3, 1), [1])
    np.testing.assert_array_equal(blend.head_items(train, 3, 2), [0, 1])
    np.testing.assert_array_equal(blend.head_items(train, 4, 3), [0, 1, 2])  # item 3: nobody; item 2 before it
    np.testing.assert_array_equal(blend.head_items(train, 3, 10), [0, 1, 2])


def _random_csr(rng, n_users, n_items, mean=6):
    """Users with 1..2·mean distinct items each (as the data loaders give them)."""
    rows = [rng.choice(n_items, min(int(n), n_items), replace=False) for n in rng.integers(1, 2 * mean, n_users)]
    return (np.concatenate([[0], np.cumsum([len(r) for r in rows])]), np.concatenate(rows))


def test_blend_dot_product_equals_its_formula():
    rng = np.random.default_rng(0)
    n_items, users = 12, np.arange(6)
    train = (np.array([0, 3, 5, 9, 9, 11, 12]), rng.integers(0, n_items, 12))
    tower_items, tower_users = rng.normal(size=(n_items, 4)), rng.normal(size=(6, 4))
    fitted = blend.fit(0.3, 2.0, None, train, tower_items, head_size=100)
    x = blend.binary_rows(train, users, n_items)
    got = fitted.user_vectors(tower_users, x) @ fitted.item_vectors(tower_items).T
    expected = blend.blend_scores(tower_users @ tower_items.T, x @ blend.ease_matrix(blend.gram(train, n_items), 2.0), 0.3)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not fitted.user_vectors(tower_users, x)[3, 4:].any()  # user 3 has no history: no EASE half
    np.testing.assert_allclose(fitted.user_vectors(tower_users, blend.binary_matrix(train, users, n_items)), fitted.user_vectors(tower_users, x))
    # a truncated B ranks by its rank-k approximation
    low = blend.fit(0.3, 2.0, 3, train, tower_items, head_size=100)
    assert low.rank == 3 and low.item_vectors(tower_items).shape == (n_items, 4 + 3)


def test_head_and_tail_against_an_explicit_dense_computation():
    """EASE on the 5 most popular of 9 items, exact: the dense B is EASE of the head's Gram on the head
    block and 0 elsewhere, and the per-user std runs over all 9 items (the tail's zeros included)."""
    rng = np.random.default_rng(4)
    n_items, n_users, head_size, a, lam = 9, 30, 5, 0.4, 3.0
    train = _random_csr(rng, n_users, n_items, mean=3)
    tower_items, tower_users = rng.normal(size=(n_items, 3)), rng.normal(size=(n_users, 3))
    x = blend.binary_rows(train, np.arange(n_users), n_items)
    counts = x.sum(0)
    head = np.sort(np.argsort(-counts, kind="stable")[:head_size])
    dense = np.zeros((n_items, n_items))
    dense[np.ix_(head, head)] = blend.ease_matrix(x[:, head].T @ x[:, head], lam)
    ease = x @ dense
    assert not ease[:, np.setdiff1d(np.arange(n_items), head)].any()  # the tail: no EASE score
    t = tower_users @ tower_items.T
    by_hand = a * t / t.std(1, keepdims=True) + (1 - a) * ease / np.where(ease.std(1, keepdims=True) > 0, ease.std(1, keepdims=True), np.inf)

    fitted = blend.fit(a, lam, None, train, tower_items, head_size)
    np.testing.assert_array_equal(fitted.head, head)
    assert fitted.user_factors.shape == (head_size, head_size) and fitted.item_factors.shape == (head_size, head_size)
    items = fitted.item_vectors(tower_items)
    assert not items[np.setdiff1d(np.arange(n_items), head), 3:].any()
    np.testing.assert_allclose(fitted.user_vectors(tower_users, x) @ items.T, by_hand, atol=1e-5)

    # rank 2: the head's B projected on the top-2 right singular subspace of X_head B_head
    low = blend.fit(a, lam, 2, train, tower_items, head_size)
    b_head = blend.ease_matrix(x[:, head].T @ x[:, head], lam)
    v = np.linalg.svd(x[:, head] @ b_head)[2][:2].T
    dense_low = np.zeros((n_items, n_items))
    dense_low[np.ix_(head, head)] = b_head @ v @ v.T
    np.testing.assert_allclose(low.user_vectors(tower_users, x) @ low.item_vectors(tower_items).T, blend.blend_scores(t, x @ dense_low, a), atol=1e-4)


def test_genre_matrix_and_collective_gram_by_hand():
    f = blend.genre_matrix([(0, 2), (), (1,), (2, 2)], 3)  # item 3 lists genre 2 twice: it counts once
    np.testing.assert_array_equal(f.toarray(), [[1, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert blend.genre_matrix([(), ()], 4) is None  # no item has a genre
    g = np.arange(16.0).reshape(4, 4)
    # α² F Fᵀ: items 0 and 3 share genre 2, item 0 has two genres; added in row blocks of 3
    expected = g + 4.0 * np.array([[2, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]])
    np.testing.assert_array_equal(blend.add_genres(g.copy(), f, 2.0, block=3), expected)
    np.testing.assert_array_equal(blend.add_genres(g.copy(), f, 0.0), g)  # α 0: plain EASE
    np.testing.assert_array_equal(blend.add_genres(g.copy(), None, 2.0), g)


def test_a_genre_weighted_blend_is_ease_of_the_collective_gram_on_the_head():
    """Collective EASE (each genre a pseudo-user of weight α) on the 5-item head of 9, exact: the
    served dot product equals the formula with B = EASE(X_headᵀX_head + α² F_head F_headᵀ)."""
    rng = np.random.default_rng(7)
    n_items, n_users, head_size, a, lam, alpha = 9, 30, 5, 0.4, 3.0, 1.5
    train = _random_csr(rng, n_users, n_items, mean=3)
    genres = [tuple(rng.choice(4, rng.integers(0, 3), replace=False)) for _ in range(n_items)]
    f = blend.genre_matrix(genres, 4)
    tower_items, tower_users = rng.normal(size=(n_items, 3)), rng.normal(size=(n_users, 3))
    x = blend.binary_rows(train, np.arange(n_users), n_items)
    head = np.sort(np.argsort(-x.sum(0), kind="stable")[:head_size])
    fh = f.toarray()[head]
    dense = np.zeros((n_items, n_items))
    dense[np.ix_(head, head)] = blend.ease_matrix(x[:, head].T @ x[:, head] + alpha**2 * fh @ fh.T, lam)
    fitted = blend.fit(a, lam, None, train, tower_items, head_size, f, alpha)
    got = fitted.user_vectors(tower_users, x) @ fitted.item_vectors(tower_items).T
    np.testing.assert_allclose(got, blend.blend_scores(tower_users @ tower_items.T, x @ dense, a), atol=1e-5)
    assert fitted.describe()["genre_weight"] == alpha
    assert blend.fit(a, lam, None, train, tower_items, head_size, None, alpha).genre_weight == 0.0  # no genres: plain EASE


def test_choose_picks_the_genre_weight_on_validation_and_only_0_without_genres():
    """Validation items follow the genre of each user's history, which co-occurrence alone barely
    shows (one train item each): the genre-weighted EASE must win; without genres the grid is [0]."""
    rng = np.random.default_rng(8)
    n_items, n_users = 40, 120
    genre_of = np.arange(n_items) % 4
    genres = [(int(g),) for g in genre_of]
    train_rows, val_rows = [], []
    for u in range(n_users):
        g = u % 4
        items = rng.permutation(np.flatnonzero(genre_of == g))
        train_rows.append(np.sort(items[:1]))
        val_rows.append(np.sort(items[1:4]))
    csr = lambda rows: (np.concatenate([[0], np.cumsum([len(r) for r in rows])]), np.concatenate(rows))  # noqa: E731
    train, val = csr(train_rows), csr(val_rows)
    users = np.arange(n_users)
    user_vec, item_vec = rng.normal(size=(n_users, 2)), rng.normal(size=(n_items, 2))  # an uninformative tower
    f = blend.genre_matrix(genres, 4)
    a, lam, alpha, ndcg = blend.choose([10.0], [0.0], 5, user_vec, item_vec, train, val, users, 100, None, genres=f, genre_weights=[0.0, 3.0])
    plain = blend.choose([10.0], [0.0], 5, user_vec, item_vec, train, val, users, 100, None, genres=f, genre_weights=[0.0])
    assert alpha == 3.0 and ndcg > plain[3] + 0.1
    assert blend.choose([10.0], [0.0], 5, user_vec, item_vec, train, val, users, 100, None, genres=None, genre_weights=[0.0, 3.0])[2] == 0.0


def test_factorize_reaches_the_best_rank_k_fit_of_the_users_scores():
    rng = np.random.default_rng(5)
    x = (rng.random((60, 20)) < 0.25).astype(float)
    b = blend.ease_matrix(x.T @ x, 4.0)
    s = np.linalg.svd(x @ b, compute_uv=False)
    p, q, k = blend.factorize(b.copy(), __import__("scipy.sparse", fromlist=["x"]).csr_matrix(x), 4)
    assert k == 4 and p.shape == q.shape == (20, 4)
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-10)
    np.testing.assert_allclose(p, b @ q, atol=1e-10)
    assert np.linalg.norm(x @ b - x @ p @ q.T) == pytest.approx(np.sqrt((s[4:] ** 2).sum()), rel=1e-6)  # Eckart-Young
    p, q, k = blend.factorize(b, None, None)
    assert k == 20 and np.array_equal(q, np.eye(20)) and p is b  # exact: nothing copied


def test_fit_and_choose_keep_no_items_squared_array(monkeypatch):
    """5,000 items, a head of 100: one n_items² float64 array would be 200 MB; fitting, choosing and
    the user vectors stay far below, and what the blend keeps is head x rank."""
    import tracemalloc

    rng = np.random.default_rng(6)
    n_items, n_users = 5_000, 300
    train, val = _random_csr(rng, n_users, n_items, 20), _random_csr(rng, n_users, n_items, 2)
    item_vec, users = rng.normal(size=(n_items, 8)), np.arange(n_users)
    user_vec = rng.normal(size=(n_users, 8))
    monkeypatch.setattr(blend, "SCORE_BLOCK", 1 << 17)  # ~26 users a block
    tracemalloc.start()
    try:
        a, lam, _, _ = blend.choose([10.0, 50.0], [0.5, 1.0], 5, user_vec, item_vec, train, val, users, head_size=100, rank=8)
        fitted = blend.fit(a, lam, 8, train, item_vec, head_size=100)
        fitted.user_vectors(user_vec, blend.binary_matrix(train, users, n_items))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40e6, peak  # an n_items² float64 array alone: 200 MB
    assert fitted.user_factors.shape == fitted.item_factors.shape == (100, 8) and fitted.ease_cov.shape == (8, 8)
    assert fitted.item_vectors(item_vec).shape == (n_items, 16) and fitted.head_rows().shape == (n_items,)


def test_onnx_user_half_equals_the_numpy_formula(tmp_path):
    """EaseBlendArch exported alone (tower vectors + history bag in, blended user vector out): ONNX
    Runtime's output equals EaseBlend.user_vectors, tail items in the history included."""
    import onnxruntime as ort
    import torch

    from training.export import EaseBlendArch

    rng = np.random.default_rng(7)
    n_items, n_users = 40, 50
    train = _random_csr(rng, n_users, n_items, 6)
    tower_items, tower_users = rng.normal(size=(n_items, 4)), rng.normal(size=(n_users, 4)).astype(np.float32)
    fitted = blend.fit(0.6, 5.0, 6, train, tower_items, head_size=25)
    arch = EaseBlendArch(fitted).eval()
    users = np.arange(n_users)
    history = train[1][train[0][0] : train[0][-1]].astype(np.int64)
    offsets = train[0][:-1].astype(np.int64)
    args = (torch.from_numpy(tower_users), torch.from_numpy(history), torch.from_numpy(offsets))
    path = tmp_path / "half.onnx"
    batch = torch.export.Dim("batch")
    torch.onnx.export(arch, args, str(path), dynamo=True, input_names=["tower", "history", "history_offsets"], output_names=["out"],
                      dynamic_shapes={"tower": {0: batch}, "history": {0: torch.export.Dim("n")}, "history_offsets": {0: batch}})
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"tower": tower_users, "history": history, "history_offsets": offsets})[0]
    expected = fitted.user_vectors(tower_users.astype(np.float64), blend.binary_matrix(train, users, n_items))
    assert np.isin(history, np.setdiff1d(np.arange(n_items), fitted.head)).any()  # tail items are in the histories
    np.testing.assert_allclose(out, expected, atol=2e-6)
    assert np.abs(out).max() < 10  # balanced halves: O(1) coordinates, where float32 keeps ~1e-7


def test_choose_picks_the_validation_best():
    rng = np.random.default_rng(1)
    n_items = 10
    train = (np.arange(0, 41, 4), rng.integers(0, n_items, 40))
    val = (np.arange(0, 11, 1), rng.integers(0, n_items, 10))
    item_vec, users = rng.normal(size=(n_items, 3)), np.arange(10)
    user_vec = rng.normal(size=(10, 3))
    a, lam, _, ndcg = blend.choose([1.0, 50.0], [0.0, 0.5, 1.0], 3, user_vec, item_vec, train, val, users, head_size=100, rank=None)
    from training import evaluation

    def score(a_, lam_):
        ease = blend.binary_rows(train, users, n_items) @ blend.ease_matrix(blend.gram(train, n_items), lam_)
        top = evaluation.topk_from_scores(blend.blend_scores(user_vec @ item_vec.T, ease, a_), 3, exclude=train, exclude_rows=users)
        return evaluation.ranking_metrics(top, val, users, 3, n_items)["ndcg@3"]

    assert ndcg == pytest.approx(score(a, lam))
    assert blend.choose([1.0, 50.0], [0.0, 0.5, 1.0], 3, user_vec, item_vec, train, val, users, 100, None, batch_size=3) == (a, lam, 0.0, ndcg)  # blocks of users
    assert ndcg == pytest.approx(max(score(x, y) for x in (0.0, 0.5, 1.0) for y in (1.0, 50.0)))


def test_blend_is_refused_where_it_would_leak_or_cannot_run(tmp_path):
    with pytest.raises(ConfigError, match="blend.ease"):
        load_config(REPO / "configs" / "two_tower.yaml", ["blend.ease=true", "privacy.mode=dp"])
    with pytest.raises(ConfigError, match="blend.weights"):
        load_config(REPO / "configs" / "two_tower.yaml", ["blend.weights=[1.5]"])
    with pytest.raises(ConfigError, match="blend.head_items"):
        load_config(REPO / "configs" / "two_tower.yaml", ["blend.head_items=0"])
    for bad in ("[-1]", "[]", "[.inf]"):
        with pytest.raises(ConfigError, match="blend.genre_weights"):
            load_config(REPO / "configs" / "two_tower.yaml", [f"blend.genre_weights={bad}"])
    from training.distributed import check_config

    with pytest.raises(ConfigError, match="blend.ease"):
        check_config(load_config(REPO / "configs" / "two_tower.yaml", ["blend.ease=true", "trainer.refit=false"]))


@pytest.fixture(scope="module")
def blended(tmp_path_factory):
    from tests.conftest import tiny_overrides
    from training.pipeline import train

    root = tmp_path_factory.mktemp("blend")
    cfg = load_config(REPO / "configs" / "two_tower.yaml", tiny_overrides(root) + [
        "blend.ease=true", "blend.lambdas=[50,200]", "blend.weights=[0,0.5,0.8,1]", "blend.genre_weights=[0,3]", "trainer.epochs=8", "tracking.enabled=false", "store.load=true",
        "data.synthetic.n_users=400", "data.synthetic.n_items=150", "blend.head_items=100", "blend.rank=16",
    ])  # fmt: skip  (a catalog above the head: 50 items get the two-tower's score only)
    return cfg, train(cfg)


def test_pipeline_exports_the_blend_and_offline_evaluation_reproduces_it(blended):
    import onnx

    from training.offline import evaluate_bundle

    cfg, result = blended
    manifest = json.loads((result.artifact_dir / "manifest.json").read_text())
    n_items, head, rank = 150, 100, 16
    assert manifest["blend"] == {"kind": "ease", "weight": result.metrics["blend/weight"], "lambda": result.metrics["blend/lambda"],
                                 "genre_weight": result.metrics["blend/genre_weight"], "rank": rank, "head_items": head}  # fmt: skip
    assert result.metrics["blend/genre_weight"] in (0.0, 3.0)
    assert manifest["output"]["shape"] == ["batch", 64 + rank] and manifest["output"]["similarity_dims"] == 64
    items = np.load(result.artifact_dir / "item_embeddings.npy")
    assert items.shape == (n_items, 64 + rank) and (~items[:, 64:].any(1)).sum() == n_items - head  # the tail: no EASE half
    # the ONNX user tower keeps (head + 1) x rank floats for EASE, nothing n_items² (or head²) wide
    sizes = {t.name: int(np.prod(t.dims)) for t in onnx.load(str(result.artifact_dir / "user_tower.onnx")).graph.initializer}
    assert (head + 1) * rank in sizes.values() and max(sizes.values()) < head * head
    # parity with margin: the per-user scales in float64, the halves balanced to O(1) coordinates
    assert max(result.manifest["parity"].values()) <= cfg.export.parity_atol / 10
    # the blend's work is training time
    assert result.metrics["blend/seconds"] > 0 and result.metrics["train/seconds"] >= result.metrics["blend/seconds"]
    offline = evaluate_bundle(cfg, str(result.artifact_dir))  # the ONNX tower + item vectors, as served
    for k, v in result.metrics.items():
        if k.startswith("test/"):
            assert offline[k] == pytest.approx(v, abs=1e-4), k
    # the wide vectors make smaller scoring batches (the history bags' gather is bounded): same metrics
    import training.offline as offline_module

    sizes = []
    real = offline_module.evaluation.evaluate_scores
    spy = lambda *a, **kw: sizes.append(kw["batch_size"]) or real(*a, **kw)  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(offline_module.evaluation, "evaluate_scores", spy)
        mp.setattr(offline_module, "SCORE_FLOATS", 20_000 * (64 + rank))  # ~20,000 gathered rows
        assert evaluate_bundle(cfg, str(result.artifact_dir)) == offline
    assert 16 <= sizes[0] < 1024


def test_serving_compares_items_on_the_tower_coordinates_only(blended):
    from serving.recommender import Recommender

    from features.store import FeatureStore

    cfg, result = blended
    rec = Recommender.from_dir(result.artifact_dir, store=FeatureStore(cfg.store.url))  # users with histories: the EASE half in use
    assert rec.similarity_vectors.shape[1] == 64
    np.testing.assert_allclose(np.linalg.norm(rec.similarity_vectors, axis=1), 1.0, atol=1e-5)  # the towers' unit vectors
    out = rec.recommend(rec.user_vocab.ids[0], k=5, diversity=0.5)
    assert len(out["items"]) == 5 and out["personalized"]
