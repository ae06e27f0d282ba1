"""Cold-start evaluation (training/cold_start.py) on a tiny synthetic set, plus hand-made cases."""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from features.content import ItemSide
from training.cold_start import (
    content_scores,
    cold_user_vectors,
    derive_stated,
    genre_match,
    genre_profile,
    hold_out_items,
    item_vectors,
    restricted_metrics,
    restricted_topk,
    run_item_cold_start,
    run_user_cold_start,
    truth_genre_match,
    warm_user_vectors,
)
from training.config import load_config
from training.data import item_features
from training.pipeline import prepare

REPO = Path(__file__).resolve().parents[2]
K = 5


def csr(rows):
    return np.cumsum([0] + [len(r) for r in rows]).astype(np.int64), np.array([i for r in rows for i in r], dtype=np.int64)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("cold")
    return load_config(REPO / "configs" / "hybrid.yaml", [
        "data.source=synthetic", "data.synthetic.n_users=200", "data.synthetic.n_items=150", "data.synthetic.mean_interactions_per_user=15",
        "trainer.epochs=3", "trainer.progress=false", "trainer.device=cpu", f"trainer.checkpoint_dir={root}/ckpt", "tracking.enabled=false", "store.load=false",
    ])  # fmt: skip


@pytest.fixture(scope="module")
def data(cfg):
    return prepare(cfg)


@pytest.fixture(scope="module")
def items_run(cfg, data):
    return run_item_cold_start(cfg, holdout=0.10, seed=0, k=K, data=data)


@pytest.fixture(scope="module")
def users_run(cfg, data):
    return run_user_cold_start(cfg, holdout=0.10, seed=0, k=K, data=data)


# -- item cold start ---------------------------------------------------------------------------
def test_held_out_items_never_reach_training(items_run, data):
    h = items_run.holdout
    assert len(h.cold) == 15 and np.all(np.diff(h.cold) > 0)
    for part in (h.train, h.val, h.seen):
        assert not np.isin(part[1], h.cold).any()
        assert len(part[1]) == len(part[2]) == part[0][-1]
    assert np.isin(h.truth[1], h.cold).all()  # truth: held-out items only
    # every interaction with a held-out item is truth (default truth="all"), none is lost
    assert len(h.truth[1]) == np.isin(data.dataset.interactions.item, h.cold).sum()
    task = items_run.fitted.task
    assert task.cold[h.cold].all()  # zero training count -> served through the OOV id row
    assert items_run.metrics["cold_item_id_is_oov"] == 1.0
    assert (h.cold == hold_out_items(data, 0.10, 0).cold).all()  # seeded


def test_restricted_ranking_only_returns_candidates():
    cands = np.array([3, 7, 9, 20])
    scores = np.array([[0.1, 0.9, 0.5, 0.2], [1.0, 1.0, 0.0, -np.inf]])
    top = restricted_topk(scores, cands, 3)
    np.testing.assert_array_equal(top, [[7, 9, 20], [3, 7, 9]])  # ties by lower column
    # truth on non-candidate items can never be hit; recall counts every truth item
    truth = csr([[], [], [], [], [], [7, 11]])
    m = restricted_metrics(scores[:1], np.array([5]), cands, truth, 3)
    assert m["recall@3"] == pytest.approx(0.5) and m["ndcg@3"] == pytest.approx(1 / (1 + 1 / np.log2(3)))
    assert m["coverage"] == pytest.approx(3 / 4)  # share of the candidate set


def test_experiment_ranks_only_held_out_items(items_run):
    f, h = items_run.fitted, items_run.holdout
    scores = warm_user_vectors(f, h.users, h.seen) @ item_vectors(f)[h.cold].T
    top = restricted_topk(scores, h.cold, K)
    assert np.isin(top, h.cold).all()
    m = items_run.metrics
    for model in ("hybrid", "content", "random", "recency"):
        assert 0 <= m[f"{model}/ndcg@{K}"] <= 1 and 0 <= m[f"{model}/recall@{K}"] <= 1
    assert m["ratio_vs_content"] == pytest.approx(m[f"hybrid/ndcg@{K}"] / m[f"content/ndcg@{K}"])
    assert m["n_users_evaluated"] == len(h.users) > 0


def test_never_seen_items_score_from_content(items_run):
    f, h = items_run.fitted, items_run.holdout
    model, spec, ctx, cold_mask = f.model, f.model.spec, f.ctx, f.task.cold
    vec = f.task.item_embeddings(model, ctx, f.device).numpy()[h.cold]
    assert vec.std(axis=0).max() > 1e-3  # not one constant vector: content moves them
    # give held-out item b exactly the content of held-out item a: both use the OOV id row,
    # so their vectors become identical; a warm item with the same content keeps its own id row
    a, b = h.cold[0], h.cold[1]
    warm = int(np.flatnonzero(~cold_mask)[0])
    side = ctx.items

    def copy_rows(csr_, src, dst):
        rows = [list(csr_[1][csr_[0][i] : csr_[0][i + 1]]) for i in range(len(csr_[0]) - 1)]
        for d in dst:
            rows[d] = rows[src]
        return csr(rows)

    year = side.year.copy()
    year[[b, warm]] = year[a]
    ctx2 = replace(ctx, items=ItemSide(copy_rows(side.genres, a, [b, warm]), year, copy_rows(side.title, a, [b, warm])))
    with torch.no_grad():
        v2 = model.item_arch(item_features(spec, ctx2, f.device, oov=cold_mask)).numpy()
    np.testing.assert_allclose(v2[a], v2[b], atol=1e-6)
    assert np.abs(v2[a] - v2[warm]).max() > 1e-4
    # and the OOV path ignores the item id: the same content under two ids gives one vector
    with torch.no_grad():
        both = model.item_arch(item_features(spec, ctx2, f.device, items=np.array([a, b]), oov=np.array([True, True]))).numpy()
    np.testing.assert_allclose(both[0], both[1], atol=1e-6)


def test_content_baseline_is_genre_cosine():
    item_genres = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]], float)
    history = (np.array([0, 2, 2]), np.array([0, 1]))  # user 0 saw items 0 and 1; user 1 nothing
    profile = genre_profile(history, np.array([0, 1]), item_genres)
    np.testing.assert_array_equal(profile, [[2, 1, 0], [0, 0, 0]])
    s = content_scores(profile, item_genres)
    np.testing.assert_allclose(s[0], [2 / np.sqrt(5), 3 / np.sqrt(10), 0, 0])
    np.testing.assert_array_equal(s[1], 0)  # no history: all ties


# -- user cold start ---------------------------------------------------------------------------
def test_held_out_users_never_reach_training(users_run):
    h = users_run.holdout
    assert len(h.cold) == 20
    for part in (h.train, h.val, h.seen):
        assert (np.diff(part[0])[h.cold] == 0).all()
    rows = np.repeat(np.arange(len(h.truth[0]) - 1), np.diff(h.truth[0]))
    assert np.isin(rows, h.cold).all() and np.array_equal(h.users, h.cold)


def test_cold_users_get_full_lists_driven_by_stated_genres(users_run):
    m, x = users_run.metrics, users_run.extra
    assert x["stated_source"] == "dataset"  # synthetic data carries stated preferences
    for name, top in x["lists"].items():
        assert top.shape == (len(users_run.holdout.users), K) and (top >= 0).all(), name
        assert m[f"{name}/empty_lists"] == 0
    for key in ("hybrid/genre_match", "popularity/genre_match", "hybrid/ndcg@5", "popularity/ndcg@5", "truth/genre_match"):
        assert 0 <= m[key] <= 1
    assert m["genre_popularity/genre_match"] == 1.0  # only stated-genre items when enough exist
    assert m["hybrid_stated_first/genre_match"] == 1.0
    # the tower reads the stated genres: different statements, different vectors
    f, users = users_run.fitted, users_run.holdout.users[:2]
    g = [np.array([0]), np.array([0])]
    v0 = cold_user_vectors(f, users, g)
    v1 = cold_user_vectors(f, users, [np.array([1, 2]), np.array([1, 2])])
    assert np.abs(v0 - v1).max() > 1e-4
    np.testing.assert_allclose(v0[0], cold_user_vectors(f, users[:1], g[:1])[0], atol=1e-6)


def test_genre_match_hand_case():
    # items: 0 {0}, 1 {1}, 2 {0, 2}, 3 {} (none), 4 {2}
    item_genres = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 0], [0, 0, 1]], float)
    topk = np.array([[0, 1, 2, 3], [4, 3, 1, -1], [0, 1, 2, 4], [-1, -1, -1, -1]])
    liked = [np.array([0]), np.array([1, 2]), np.array([], np.int64), np.array([0])]
    share = genre_match(topk, liked, item_genres)
    np.testing.assert_allclose(share[:2], [2 / 4, 2 / 3])  # padding ignored
    assert np.isnan(share[2]) and np.isnan(share[3])  # nothing stated / empty list
    assert float(np.nanmean(share)) == pytest.approx((0.5 + 2 / 3) / 2)
    truth = csr([[0, 3], [1, 4, 0]])
    np.testing.assert_allclose(truth_genre_match(truth, np.array([0, 1]), liked[:2], item_genres), [1 / 2, 2 / 3])


def test_derive_stated_takes_most_frequent_genres():
    item_genres = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]], float)
    truth = csr([[0, 1, 2], [3], []])
    liked = derive_stated(truth, np.array([0, 1, 2]), item_genres, n=2)
    # user 0: genre counts [2, 3, 1, 0] -> {0, 1}; user 1: only genre 3; user 2: nothing
    assert [list(g) for g in liked] == [[0, 1], [3], []]
    # an excluded genre ("unknown") is never stated; ties go to the lower genre index
    assert list(derive_stated(truth, np.array([0]), item_genres, n=2, exclude=(1,))[0]) == [0, 2]


def test_benchmark_skips_without_ml100k(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("cold_start_bench", REPO / "benchmarks" / "cold_start.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--data", f"ml100k:{tmp_path}/missing", "--out", str(tmp_path / "x.json")]) == 2
    assert "skipped" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
