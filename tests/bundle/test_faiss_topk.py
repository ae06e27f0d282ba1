"""FAISS top-k (bundle.topk.HnswTopK, IvfTopK) against exact search, exclusion, the size-based choice."""
from __future__ import annotations

import numpy as np
import pytest

from bundle.topk import ANN_KIND, ExactTopK, HnswTopK, IvfTopK, build_index

# 4 items in 2-D (as in test_topk.py). Query [1, 0] scores the first coordinates:
# item 0: 1.0, item 1: 3.0, item 2: -1.0, item 3: 2.0 -> ranking [1, 3, 0, 2]
ITEMS = np.array([[1.0, 0.5], [3.0, 0.0], [-1.0, 4.0], [2.0, -2.0]], dtype=np.float32)
Q_X = [1.0, 0.0]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_catalog(n_items: int, dim: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return unit(rng.normal(size=(n_items, dim))), unit(rng.normal(size=(n_queries, dim)))


def test_hand_computed_ranking_and_scores():
    scores, items = HnswTopK(ITEMS, m=4, ef_construction=8, ef_search=8).search(np.array([Q_X]), k=3)
    assert scores.dtype == np.float32 and items.dtype == np.int64
    np.testing.assert_array_equal(items, [[1, 3, 0]])
    np.testing.assert_allclose(scores, [[3.0, 2.0, 1.0]])


def test_ties_put_the_lower_index_first_like_exact():
    # items 0 and 2 are the same vector: both score 1.0 for [1, 0]; item 1 scores 0
    items = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    scores, top = HnswTopK(items, m=4, ef_search=8).search(np.array([Q_X]), k=3)
    np.testing.assert_array_equal(top, [[0, 2, 1]])
    np.testing.assert_allclose(scores, [[1.0, 1.0, 0.0]])


def test_equals_exact_when_the_beam_covers_the_catalog():
    # 300 items, efSearch 400 >= N: the graph search visits every reachable node, so the result
    # is the exact one (random Gaussian data has no ties)
    items, queries = random_catalog(300, 16, 25, seed=1)
    hnsw = HnswTopK(items, m=16, ef_construction=64, ef_search=400)
    exact = ExactTopK(items)
    h_scores, h_items = hnsw.search(queries, k=20)
    e_scores, e_items = exact.search(queries, k=20)
    np.testing.assert_array_equal(h_items, e_items)
    np.testing.assert_allclose(h_scores, e_scores, rtol=1e-5, atol=1e-6)


def test_recall_on_a_seeded_catalog_with_serving_defaults():
    items, queries = random_catalog(5000, 32, 50, seed=2)
    _, found = build_index(items, kind="hnsw").search(queries, k=50)
    _, truth = ExactTopK(items).search(queries, k=50)
    recall = np.mean([len(np.intersect1d(f, t)) / 50 for f, t in zip(found, truth)])
    assert recall >= 0.95, recall


def test_exclusion_removes_items_and_keeps_the_rest_in_exact_order():
    items, queries = random_catalog(300, 16, 6, seed=3)
    rng = np.random.default_rng(4)
    exclude = [rng.choice(300, size=n, replace=False) for n in (0, 1, 10, 50, 150, 0)]
    hnsw = HnswTopK(items, m=16, ef_construction=64, ef_search=400)
    h_scores, h_items = hnsw.search(queries, k=20, exclude=exclude)
    e_scores, e_items = ExactTopK(items).search(queries, k=20, exclude=exclude)
    for found, banned in zip(h_items, exclude):
        assert not np.isin(found, banned).any()
    np.testing.assert_array_equal(h_items, e_items)
    np.testing.assert_allclose(h_scores, e_scores, rtol=1e-5, atol=1e-6)


def test_exclusion_of_the_best_item_hand_computed():
    # without item 1 the ranking for [1, 0] is [3, 0, 2]
    scores, items = HnswTopK(ITEMS, m=4, ef_search=8).search(np.array([Q_X, Q_X]), k=2, exclude=[np.array([1]), np.array([], dtype=np.int64)])
    np.testing.assert_array_equal(items, [[3, 0], [1, 3]])
    np.testing.assert_allclose(scores, [[2.0, 1.0], [3.0, 2.0]])


def test_excluding_almost_everything_pads_like_exact():
    scores, items = HnswTopK(ITEMS, m=4, ef_search=8).search(np.array([Q_X]), k=3, exclude=[np.array([0, 1, 3])])
    np.testing.assert_array_equal(items, [[2, -1, -1]])
    assert scores[0, 0] == pytest.approx(-1.0)
    assert np.isneginf(scores[0, 1:]).all()


def test_k_larger_than_catalog_pads():
    scores, items = HnswTopK(ITEMS, m=4, ef_search=2).search(np.array([Q_X]), k=6)
    np.testing.assert_array_equal(items, [[1, 3, 0, 2, -1, -1]])
    assert np.isneginf(scores[0, 4:]).all()


def test_builds_are_deterministic():
    items, queries = random_catalog(2000, 16, 20, seed=5)
    a = HnswTopK(items, m=8, ef_construction=16, ef_search=16).search(queries, k=30)
    b = HnswTopK(items, m=8, ef_construction=16, ef_search=16).search(queries, k=30)
    np.testing.assert_array_equal(a[1], b[1])


def test_size_based_choice():
    items, _ = random_catalog(100, 8, 1, seed=6)
    assert isinstance(build_index(items[:99], ann_min_items=100), ExactTopK)
    assert isinstance(build_index(items, ann_min_items=100, ivf_nlist=4), {"ivf": IvfTopK, "hnsw": HnswTopK}[ANN_KIND])
    assert isinstance(build_index(items, kind="auto", ann_min_items=100, ann_kind="hnsw"), HnswTopK)
    assert isinstance(build_index(items, kind="exact", ann_min_items=10), ExactTopK)
    assert isinstance(build_index(items[:5], kind="hnsw"), HnswTopK)
    index = build_index(items, ann_min_items=100, ann_kind="hnsw", hnsw_m=8, hnsw_ef_construction=20, hnsw_ef_search=30)
    assert (index.m, index.ef_construction, index.ef_search, len(index), index.dim) == (8, 20, 30, 100, 8)
    assert index.index.hnsw.efConstruction == 20
    ivf = build_index(items, kind="ivf", ivf_nlist=5, ivf_nprobe=2)
    assert (ivf.nlist, ivf.nprobe, len(ivf), ivf.index.nlist) == (5, 2, 100, 5)


def test_ivf_defaults_follow_the_catalog_size():
    items, _ = random_catalog(2500, 8, 1, seed=7)
    ivf = IvfTopK(items)
    assert ivf.nlist == 200  # 4 * sqrt(2500)
    assert ivf.nprobe == 6  # round(200 / 32)
    tiny = IvfTopK(ITEMS)  # 4 * sqrt(4) = 8 lists > 4 items: capped at one list per item
    assert (tiny.nlist, tiny.nprobe) == (4, 1)
    np.testing.assert_array_equal(tiny.search(np.array([Q_X]), k=1)[1], [[1]])


def test_ivf_scanning_every_list_is_exact_with_exclusion():
    items, queries = random_catalog(400, 16, 6, seed=8)
    rng = np.random.default_rng(9)
    exclude = [rng.choice(400, size=n, replace=False) for n in (0, 3, 40, 200, 395, 0)]
    ivf = IvfTopK(items, nlist=8, nprobe=8)  # every list scanned: exact
    i_scores, i_items = ivf.search(queries, k=10, exclude=exclude)
    e_scores, e_items = ExactTopK(items).search(queries, k=10, exclude=exclude)
    np.testing.assert_array_equal(i_items, e_items)
    np.testing.assert_allclose(i_scores, e_scores, rtol=1e-5, atol=1e-6)
    assert (i_items[4] == -1).sum() == 5  # 395 of 400 excluded: 5 left, padded to 10


def test_ivf_recall_on_a_seeded_clustered_catalog():
    rng = np.random.default_rng(10)
    centers = unit(rng.normal(size=(50, 16)))
    items = unit(centers[rng.integers(0, 50, 20000)] + 0.1 * rng.normal(size=(20000, 16)))
    queries = unit(centers[rng.integers(0, 50, 40)] + 0.1 * rng.normal(size=(40, 16)))
    _, found = IvfTopK(items, nlist=64, nprobe=8).search(queries, k=50)
    _, truth = ExactTopK(items).search(queries, k=50)
    recall = np.mean([len(np.intersect1d(f, t)) / 50 for f, t in zip(found, truth)])
    assert recall >= 0.95, recall


def test_ivf_builds_are_deterministic():
    items, queries = random_catalog(3000, 16, 20, seed=11)
    a = IvfTopK(items, nlist=32, nprobe=2).search(queries, k=20)
    b = IvfTopK(items, nlist=32, nprobe=2).search(queries, k=20)
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hnsw_m": 1}, "hnsw m must be an integer >= 2"),
        ({"hnsw_m": 16.5}, "hnsw m must be an integer"),
        ({"hnsw_ef_construction": 0}, "hnsw ef_construction must be an integer >= 1"),
        ({"hnsw_ef_search": -5}, "hnsw ef_search must be an integer >= 1"),
        ({"hnsw_ef_search": True}, "hnsw ef_search must be an integer"),
        ({"ann_min_items": 0}, "ann_min_items must be an integer >= 1"),
        ({"kind": "annoy"}, "unknown index kind 'annoy'"),
        ({"kind": "auto", "ann_kind": "exact"}, "unknown ann_kind 'exact'"),
        ({"kind": "ivf", "ivf_nlist": -1}, "ivf nlist must be an integer >= 0"),
        ({"kind": "ivf", "ivf_nprobe": 1.5}, "ivf nprobe must be an integer"),
        ({"kind": "ivf", "ivf_nlist": 5}, r"ivf nlist must be <= the number of items \(4\)"),
    ],
)
def test_bad_parameters_name_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_index(ITEMS, **{"kind": "hnsw", **kwargs})


def test_bad_queries_and_exclusions():
    index = HnswTopK(ITEMS, m=4)
    with pytest.raises(ValueError, match="queries must have shape"):
        index.search(np.zeros((1, 3)), k=1)
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.array([Q_X]), k=0)
    with pytest.raises(ValueError, match="outside"):
        index.search(np.array([Q_X]), k=1, exclude=[np.array([4])])
    with pytest.raises(ValueError, match="entries for 1 queries"):
        index.search(np.array([Q_X]), k=1, exclude=[np.array([], dtype=np.int64)] * 2)
    with pytest.raises(ValueError, match="2-D"):
        HnswTopK(np.zeros(4, dtype=np.float32))


def test_empty_batch():
    scores, items = HnswTopK(ITEMS, m=4).search(np.zeros((0, 2), dtype=np.float32), k=2)
    assert scores.shape == items.shape == (0, 2)


def test_index_args_validate_and_reach_build_index():
    from serving.config import AppArgs

    args = AppArgs.model_validate({"index": {"kind": "hnsw", "hnsw_ef_search": 64}})
    assert args.index.kind == "hnsw" and args.index.hnsw_ef_search == 64 and args.index.ann_min_items == 100_000
    index = build_index(ITEMS, **args.index.model_dump())
    assert isinstance(index, HnswTopK) and index.ef_search == 64
    with pytest.raises(ValueError, match="hnsw_m"):
        AppArgs.model_validate({"index": {"hnsw_m": 1}})
    with pytest.raises(ValueError, match="kind"):
        AppArgs.model_validate({"index": {"kind": "annoy"}})
    with pytest.raises(ValueError, match="ivf_nprobe"):
        AppArgs.model_validate({"index": {"ivf_nprobe": -1}})
    with pytest.raises(ValueError, match="ef_serch"):
        AppArgs.model_validate({"index": {"ef_serch": 5}})


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_recommender_with_faiss_equals_exact(trained_run, kind):
    """The whole online path with a forced FAISS index (searching everything) gives the exact lists."""
    from features.store import FeatureStore
    from serving.recommender import Recommender

    bundle = trained_run.cfg.export.output_dir
    store = FeatureStore(trained_run.store_url)
    try:
        exact = Recommender.from_dir(bundle, store, index={"kind": "exact"})
        n = len(exact.items)
        options = {"hnsw": {"hnsw_ef_search": n}, "ivf": {"ivf_nlist": 8, "ivf_nprobe": 8}}[kind]
        ann = Recommender.from_dir(bundle, store, index={"kind": kind, **options})
        assert isinstance(exact.index, ExactTopK) and isinstance(ann.index, (HnswTopK, IvfTopK))
        for user in ["u1", "u2", "u10", "u500", "never-seen"]:
            for k, diversity in ((10, None), (5, 0.5)):
                a, b = exact.recommend(user, k, diversity=diversity), ann.recommend(user, k, diversity=diversity)
                assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]], user
    finally:
        store.close()
