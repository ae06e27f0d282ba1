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


def test_blend_dot_product_equals_its_formula():
    rng = np.random.default_rng(0)
    n_items, users = 12, np.arange(6)
    train = (np.array([0, 3, 5, 9, 9, 11, 12]), rng.integers(0, n_items, 12))
    tower_items, tower_users = rng.normal(size=(n_items, 4)), rng.normal(size=(6, 4))
    fitted = blend.fit(0.3, 2.0, None, train, tower_items)
    x = blend.binary_rows(train, users, n_items)
    got = fitted.user_vectors(tower_users, x) @ fitted.item_vectors(tower_items).T
    expected = blend.blend_scores(tower_users @ tower_items.T, x @ blend.ease_matrix(blend.gram(train, n_items), 2.0), 0.3)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not fitted.user_vectors(tower_users, x)[3, 4:].any()  # user 3 has no history: no EASE half
    # a truncated B ranks by its rank-k approximation
    low = blend.fit(0.3, 2.0, 3, train, tower_items)
    assert low.rank == 3 and low.item_vectors(tower_items).shape == (n_items, 4 + 3)


def test_choose_picks_the_validation_best():
    rng = np.random.default_rng(1)
    n_items = 10
    train = (np.arange(0, 41, 4), rng.integers(0, n_items, 40))
    val = (np.arange(0, 11, 1), rng.integers(0, n_items, 10))
    item_vec, users = rng.normal(size=(n_items, 3)), np.arange(10)
    user_vec = rng.normal(size=(10, 3))
    a, lam, ndcg = blend.choose([1.0, 50.0], [0.0, 0.5, 1.0], 3, user_vec, item_vec, train, val, users)
    from training import evaluation

    def score(a_, lam_):
        ease = blend.binary_rows(train, users, n_items) @ blend.ease_matrix(blend.gram(train, n_items), lam_)
        top = evaluation.topk_from_scores(blend.blend_scores(user_vec @ item_vec.T, ease, a_), 3, exclude=train, exclude_rows=users)
        return evaluation.ranking_metrics(top, val, users, 3, n_items)["ndcg@3"]

    assert ndcg == pytest.approx(score(a, lam))
    assert blend.choose([1.0, 50.0], [0.0, 0.5, 1.0], 3, user_vec, item_vec, train, val, users, batch_size=3) == (a, lam, ndcg)  # blocks of users
    assert ndcg == pytest.approx(max(score(x, y) for x in (0.0, 0.5, 1.0) for y in (1.0, 50.0)))


def test_blend_is_refused_where_it_would_leak_or_cannot_run(tmp_path):
    with pytest.raises(ConfigError, match="blend.ease"):
        load_config(REPO / "configs" / "two_tower.yaml", ["blend.ease=true", "privacy.mode=dp"])
    with pytest.raises(ConfigError, match="blend.weights"):
        load_config(REPO / "configs" / "two_tower.yaml", ["blend.weights=[1.5]"])
    with pytest.raises(ValueError, match="blend.ease"):
        blend.check_size(blend.MAX_ITEMS + 1)
    from training.distributed import check_config

    with pytest.raises(ConfigError, match="blend.ease"):
        check_config(load_config(REPO / "configs" / "two_tower.yaml", ["blend.ease=true", "trainer.refit=false"]))


@pytest.fixture(scope="module")
def blended(tmp_path_factory):
    from tests.conftest import tiny_overrides
    from training.pipeline import train

    root = tmp_path_factory.mktemp("blend")
    cfg = load_config(REPO / "configs" / "two_tower.yaml", tiny_overrides(root) + [
        "blend.ease=true", "blend.lambdas=[50,200]", "blend.weights=[0,0.5,0.8,1]", "trainer.epochs=8", "tracking.enabled=false", "store.load=false",
        "data.synthetic.n_users=400", "data.synthetic.n_items=150",
    ])  # fmt: skip
    return cfg, train(cfg)


def test_pipeline_exports_the_blend_and_offline_evaluation_reproduces_it(blended):
    from training.offline import evaluate_bundle

    cfg, result = blended
    manifest = json.loads((result.artifact_dir / "manifest.json").read_text())
    n_items = 150
    assert manifest["blend"] == {"kind": "ease", "weight": result.metrics["blend/weight"], "lambda": result.metrics["blend/lambda"], "rank": n_items}
    assert manifest["output"]["shape"] == ["batch", 64 + n_items] and manifest["output"]["similarity_dims"] == 64
    assert np.load(result.artifact_dir / "item_embeddings.npy").shape == (n_items, 64 + n_items)
    assert max(result.manifest["parity"].values()) <= cfg.export.parity_atol
    offline = evaluate_bundle(cfg, str(result.artifact_dir))  # the ONNX tower + item vectors, as served
    for k, v in result.metrics.items():
        if k.startswith("test/"):
            assert offline[k] == pytest.approx(v, abs=1e-4), k


def test_serving_compares_items_on_the_tower_coordinates_only(blended):
    from serving.recommender import Recommender

    _, result = blended
    rec = Recommender.from_dir(result.artifact_dir)
    assert rec.similarity_vectors.shape[1] == 64
    np.testing.assert_allclose(np.linalg.norm(rec.similarity_vectors, axis=1), 1.0, atol=1e-5)  # the towers' unit vectors
    out = rec.recommend(rec.user_vocab.ids[0], k=5, diversity=0.5)
    assert len(out["items"]) == 5 and out["personalized"]
