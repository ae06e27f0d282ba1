"""search.enabled: successive halving over a small grid, on validation, within a time budget."""
from __future__ import annotations

import pytest

from training.config import ConfigError, load_config
from training.pipeline import prepare, train
from training.search import candidates, effective_space, rung_epochs, search, survivors
from training.trainer import pick_device

DATA = ["data.synthetic.n_users=120", "data.synthetic.n_items=80", "data.synthetic.n_genres=4", "data.synthetic.mean_interactions_per_user=12"]
SMALL = ["model.embedding_dim=16", "model.hidden_dim=16", "model.output_dim=16", "trainer.progress=false", "trainer.batch_size=32"]


def test_candidates_are_every_combination_in_listed_order():
    assert candidates({"a": [1, 2], "b": ["x", "y", "z"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 2, "b": "z"}]  # fmt: skip
    assert candidates({"a": [0.5]}) == [{"a": 0.5}]


def test_rating_weighting_leaves_the_space_where_every_rating_is_the_same():
    import numpy as np

    space = {"model.hidden_layers": [0, 1], "model.rating_weighted": [False, True]}
    indptr, items = np.array([0, 2, 3]), np.array([0, 1, 1])
    implicit = (indptr, items, np.ones(3, np.float32))  # e.g. ML-1M implicit: every rating 1.0
    assert effective_space(space, implicit) == {"model.hidden_layers": [0, 1], "model.rating_weighted": [False]}
    assert len(candidates(effective_space(space, implicit))) == 2  # not 4 candidates training 2 models twice
    rated = (indptr, items, np.array([5.0, 3.0, 5.0], np.float32))
    assert effective_space(space, rated) == space
    assert effective_space({"model.hidden_layers": [0, 1]}, implicit) == {"model.hidden_layers": [0, 1]}


def test_rung_epochs_multiply_by_eta_within_the_cap():
    assert rung_epochs(4, 2, 100) == [4, 8, 16, 32, 64]
    assert rung_epochs(4, 3, 40) == [4, 12, 36]
    assert rung_epochs(4, 2, 4) == [4]
    assert rung_epochs(10, 2, 3) == [3]  # a cap below min_epochs: one rung at the cap


def test_survivors_keep_the_best_ceil_n_over_eta_and_break_ties_by_order():
    scored = [(0.30, 0), (0.35, 1), (0.20, 2), (0.35, 3), (0.10, 4)]
    assert survivors(scored, 2) == [1, 3, 0]  # ceil(5/2) = 3; 1 and 3 tie at 0.35: the earlier first
    assert survivors(scored, 3) == [1, 3]  # ceil(5/3) = 2
    assert survivors([(0.1, 7)], 2) == [7]


def test_search_runs_the_rungs_and_picks_the_best_of_the_last(tmp_path):
    cfg = load_config(None, [*DATA, *SMALL, "trainer.epochs=4", "search.enabled=true", "search.min_epochs=1", "search.eta=2",
                             "search.space={task.history_dropout: [0.2, 0.5], model.temperature: [0.05, 0.2]}"])  # fmt: skip
    data = prepare(cfg)
    result = search(cfg, data, pick_device("cpu"))
    epochs = [r["epochs"] for r in result.rungs]
    assert epochs == [1, 2]  # rung 0: 4 candidates x 1 epoch; rung 1: the best 2 x 2 epochs; then 1 is left
    first, second = (r["candidates"] for r in result.rungs)
    assert [c["candidate"] for c in first] == candidates(cfg.search.space)
    ranked = sorted(range(4), key=lambda i: (-first[i]["score"], i))[:2]
    assert [c["candidate"] for c in second] == [first[i]["candidate"] for i in sorted(ranked)]
    winner = max(second, key=lambda c: c["score"])
    assert result.chosen == winner["candidate"] and result.score == pytest.approx(winner["score"], abs=1e-5)


def test_a_spent_budget_ends_rung_0_after_its_first_candidate():
    cfg = load_config(None, [*DATA, *SMALL, "trainer.epochs=8", "search.enabled=true", "search.min_epochs=1", "search.budget_s=0.001",
                             "search.space={task.history_dropout: [0.2, 0.5]}"])  # fmt: skip
    result = search(cfg, prepare(cfg), pick_device("cpu"))
    # rung 0 always yields a choice (its first candidate runs whatever the budget; the second is past it)
    assert len(result.rungs) == 1 and [c["candidate"] for c in result.rungs[0]["candidates"]] == [{"task.history_dropout": 0.2}]
    assert result.chosen == {"task.history_dropout": 0.2}


@pytest.mark.parametrize("budget, rungs", [(150.0, [1]), (170.0, [1, 2])])
def test_a_later_rung_whose_estimated_time_would_pass_the_budget_is_skipped(monkeypatch, budget, rungs):
    """A controlled clock: every fit of e epochs takes 10·e seconds and scores its dropout. 8 candidates:
    rung 0 (1 epoch) spends 80 s; rung 1 (4 x 2 epochs) is estimated at 10 s/epoch x 8 epochs = 80 s more,
    so it runs within 170 s but not within 150 s; rung 2 (2 x 4 epochs, +80 s) would pass 170 s."""
    from types import SimpleNamespace

    import training.search as search_module
    from training.trainer import FitResult

    clock = [0.0]

    class Timed:  # stands in for training.trainer.Trainer inside the search
        monitor = "val/ndcg@10"

        def __init__(self, model, task, cfg, history_dropout, *args):
            self.epochs, self.score = cfg.epochs, history_dropout

        def fit(self, *args, **kwargs):
            clock[0] += 10.0 * self.epochs
            return FitResult(best_epoch=self.epochs, best_metric=self.score, epochs_run=self.epochs, seconds=10.0 * self.epochs)

    monkeypatch.setattr(search_module, "Trainer", Timed)
    monkeypatch.setattr(search_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    cfg = load_config(None, [*DATA, *SMALL, "trainer.epochs=4", "search.enabled=true", "search.min_epochs=1", "search.eta=2", f"search.budget_s={budget}",
                             "search.space={task.history_dropout: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}"])  # fmt: skip
    result = search_module.search(cfg, prepare(cfg), pick_device("cpu"))
    assert [r["epochs"] for r in result.rungs] == rungs
    assert [len(r["candidates"]) for r in result.rungs] == [8, 4][: len(rungs)]
    assert result.chosen == {"task.history_dropout": 0.8}  # the best of the last rung run
    assert result.seconds == 80.0 * len(rungs)


def test_the_run_trains_with_the_chosen_settings_and_logs_them(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(None, [*DATA, *SMALL, "trainer.epochs=3", "search.enabled=true", "search.min_epochs=1",
                             "search.space={task.history_dropout: [0.2, 0.6]}", f"tracking.tracking_uri={uri}", "tracking.register_model=false",
                             f"export.output_dir={tmp_path}/bundle", f"trainer.checkpoint_dir={tmp_path}/ckpt", "store.load=false"])  # fmt: skip
    result = train(cfg)
    chosen = result.fit.search["chosen"]["task.history_dropout"]
    assert chosen in (0.2, 0.6)
    run = mlflow.MlflowClient(uri).get_run(result.run_id)
    assert run.data.params["search.chosen.task.history_dropout"] == str(chosen)
    assert float(run.data.params["search.seconds"]) <= result.fit.seconds  # the search counts as training time
    assert "search.json" in {a.path for a in mlflow.MlflowClient(uri).list_artifacts(result.run_id)}


def test_search_is_refused_under_privacy():
    with pytest.raises(ConfigError, match="search.enabled: not with privacy.mode dp"):
        load_config(None, ["search.enabled=true", "privacy.mode=dp"])
    with pytest.raises(ConfigError, match="search.space"):
        load_config(None, ["search.space={}"])
    cfg = load_config(None, [*DATA, "search.enabled=true", "search.space={model.no_such_key: [1]}"])
    with pytest.raises(ConfigError, match="no_such_key"):
        search(cfg, prepare(cfg), pick_device("cpu"))
