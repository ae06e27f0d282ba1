"""benchmarks/side_signals.py: the time, genre and demographic signals by hand on tiny data, and a
run on the synthetic data whose plain-EASE row is the product's own EASE (training/blend.py) chosen
on validation over the config's lambda grid."""
from __future__ import annotations

import json

import numpy as np
import pytest

from features.schema import Interactions, Users
from tests.conftest import load_script

signals = load_script("benchmarks/side_signals.py")


def test_time_scores_by_hand():
    # 3 users, 2 items; timestamps 1..4: with 30 quantile bins each distinct time gets its own bin
    inter = Interactions(user=np.array([0, 0, 1, 2]), item=np.array([0, 1, 1, 0]), rating=np.ones(4), timestamp=np.array([1, 2, 3, 4]))
    s = signals.time_scores(inter, np.array([0, 1]), 3, 2)
    # user 0 rated at times 1 and 2 (half each); item 0 holds all of time 1's ratings, item 1 all of time 2's
    np.testing.assert_allclose(s, [[0.5, 0.5], [0.0, 1.0]])
    flat = Interactions(user=np.array([0, 1]), item=np.array([0, 1]), rating=np.ones(2), timestamp=np.zeros(2, np.int64))
    assert signals.time_scores(flat, np.array([0]), 2, 2) is None  # no time signal at all


def test_demographic_one_hots_by_hand():
    class Data:
        users = Users(age=np.array([17, 30, 0]), gender=["M", "F", "F"], occupation=["a", "a", "a"], liked_genres=[()] * 3, avoided_genres=[()] * 3)

    d = signals.demographics(Data)
    # gender F/M (2 columns), occupation has one value (dropped: no signal), 7 age bands (0 and 17 < 18: band 0; 30: band 2)
    assert d.shape == (3, 2 + 7)
    np.testing.assert_array_equal(d[:, :2], [[0, 1], [1, 0], [1, 0]])
    np.testing.assert_array_equal(d[:, 2:].argmax(1), [0, 2, 0])


def test_a_synthetic_run_reports_every_family_against_the_products_ease(tmp_path):
    from training import blend, evaluation
    from training.config import load_config
    from training.pipeline import prepare

    out = tmp_path / "s.json"
    assert signals.main(["--data", "synthetic", "--config", str(signals.harness.CONFIGS / "two_tower_ease.yaml"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"ease", "time", "genres", "demographics"}
    cfg = load_config(signals.harness.CONFIGS / "two_tower_ease.yaml", ["tracking.enabled=false", "store.load=false"])
    data = prepare(cfg)
    users, n = np.flatnonzero(np.diff(data.val[0]) > 0), data.dataset.n_items
    x = blend.binary_rows(data.train, users, n)

    def val(lam):
        top = evaluation.topk_from_scores(x @ blend.ease_matrix(blend.gram(data.train, n), lam), 10, exclude=data.train[:2], exclude_rows=users)
        return evaluation.ranking_metrics(top, data.val[:2], users, 10, n)["ndcg@10"]

    best = max(cfg.blend.lambdas, key=val)
    assert report["results"]["ease"]["lambda"] == best and report["results"]["ease"]["val_ndcg"] == pytest.approx(val(best), abs=1e-4)
    for family in ("time", "genres", "demographics"):  # each chose on validation within its grid
        r = report["results"][family]
        assert r["val_ndcg"] == max(g["val_ndcg"] for g in r["grid"]) and len(r["grid"]) == len(cfg.blend.lambdas) * len(signals.GRIDS[family])
    assert report["above_ease_on_validation"] == [f for f in ("time", "genres", "demographics") if report["results"][f]["val_ndcg"] > report["results"]["ease"]["val_ndcg"]]
