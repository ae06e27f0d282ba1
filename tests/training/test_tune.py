"""`trustrec tune`: a real 2-trial Ray Tune search on a tiny synthetic config, logged to a real
MLflow sqlite store in tmp_path (one parent run, one nested child run per trial), plus fast
checks of the search-space handling that need no Ray."""
from __future__ import annotations

import json

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from tests.conftest import REPO, tiny_overrides
from cli.main import build_parser, cmd_tune
from training.config import ConfigError, load_config
from training.tracking import mlflow_key
from training.tune import DEFAULT_SPACE, load_space, run_tune, trial_config, tune_base, validate_space

CONFIG = REPO / "configs" / "two_tower.yaml"
TINY = ["data.synthetic.n_users=150", "data.synthetic.n_items=120", "trainer.epochs=2"]
OBJECTIVE = mlflow_key("best/val/ndcg@10")


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    overrides = tiny_overrides(root) + TINY
    outcome = run_tune(CONFIG, overrides, trials=2, out=root / "tuned.yaml", storage=root / "ray", verbose=0, command="pytest tune")
    return root, overrides, outcome


@pytest.fixture(scope="module")
def client(search) -> MlflowClient:
    root, _, _ = search
    return MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")


@pytest.fixture(scope="module")
def children(search, client):
    _, _, outcome = search
    exp = client.get_experiment_by_name("trustrec")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")


def test_parent_run(search, client):
    root, _, outcome = search
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["kind"] == "tune"
    assert parent.data.tags["dataset"] == "synthetic-seed0"
    assert "mlflow.parentRunId" not in parent.data.tags
    assert parent.data.params["model.temperature"] == "loguniform[0.03, 0.3]"  # the range, not one value
    assert parent.data.params["tune.trials"] == "2"
    # MLflow artifacts live beside the sqlite db (Tracker's experiment creation), not in ./mlruns
    assert parent.info.artifact_uri.startswith((root / "mlartifacts").as_uri())
    space = download_artifacts(run_id=parent.info.run_id, artifact_path="search_space.json", dst_path=str(root / "dl"), tracking_uri=f"sqlite:///{root}/mlflow.db")
    assert json.load(open(space)) == json.loads(json.dumps(DEFAULT_SPACE))


def test_two_child_runs_nested_under_the_parent(search, client, children):
    _, overrides, outcome = search
    assert len(children) == 2
    assert {r.info.run_id for r in children} == {t.run_id for t in outcome.trials}
    base = load_config(CONFIG, overrides)
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
        assert run.data.tags["kind"] == "tune-trial"
        params = run.data.params
        assert set(params) == set(base.flat())  # the whole flattened trial config
        assert params["tracking.register_model"] == "False" and params["store.load"] == "False"
        trial = next(t for t in outcome.trials if t.run_id == run.info.run_id)
        for key, value in trial.params.items():  # the sampled values are what the run trained with
            assert params[key] == str(value), key
        assert OBJECTIVE in run.data.metrics
        assert run.data.metrics[OBJECTIVE] == pytest.approx(trial.objective)
        steps = client.get_metric_history(run.info.run_id, mlflow_key("val/ndcg@10"))  # per-epoch, as in training
        assert sorted(m.step for m in steps) == [1, 2]
        assert max(m.value for m in steps) == pytest.approx(trial.objective)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "bundle" not in artifacts and "model" not in artifacts


def test_best_trial_is_the_max_validation_metric(search, children, client):
    _, _, outcome = search
    best_run = max(children, key=lambda r: r.data.metrics[OBJECTIVE])
    assert outcome.best.run_id == best_run.info.run_id
    assert outcome.best.objective == pytest.approx(best_run.data.metrics[OBJECTIVE])
    assert [t.objective for t in outcome.trials] == sorted((t.objective for t in outcome.trials), reverse=True)
    # chosen on validation; test figures ride along for information
    assert outcome.best.metrics[mlflow_key("test/ndcg@10")] == pytest.approx(best_run.data.metrics[mlflow_key("test/ndcg@10")])
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.metrics[OBJECTIVE] == pytest.approx(outcome.best.objective)
    assert parent.data.tags["tune.best_run_id"] == best_run.info.run_id


def test_written_config_is_the_best_trials_config(search, children):
    root, overrides, outcome = search
    text = (root / "tuned.yaml").read_text()
    assert text.startswith("# Tuned by `trustrec tune`")
    assert f"{outcome.best.objective:.4f}" in text and "best of 2 trials" in text and "pytest tune" in text
    tuned = load_config(root / "tuned.yaml")
    assert tuned == trial_config(load_config(CONFIG, overrides), outcome.best.params) == outcome.best_config
    best_params = next(r for r in children if r.info.run_id == outcome.best.run_id).data.params
    for key in DEFAULT_SPACE:
        assert str(tuned.flat()[key]) == best_params[key], key
    # the tuned file is a normal training config: trial-only plumbing stays out of it
    assert tuned.tracking.register_model and tuned.store.load and tuned.trainer.num_threads is None


def test_no_model_registered_and_no_store_loaded(search, client):
    root, _, _ = search
    assert client.search_registered_models() == []
    assert not (root / "features.db").exists()
    assert not (root / "artifacts").exists()  # bundles went to the trials' temp dirs


# -- no Ray needed ---------------------------------------------------------------------------
def test_a_config_with_its_own_search_is_tuned_with_that_search_off(caplog):
    """configs/two_tower_ease.yaml chooses model.hidden_layers / task.history_dropout on validation
    inside training; under `trustrec tune` that search would overwrite what each trial sampled."""
    generic = REPO / "configs" / "two_tower_ease.yaml"
    assert load_config(generic).search.enabled
    base = tune_base(generic, ["trainer.epochs=3"])
    assert not base.search.enabled and "search.enabled is turned off" in caplog.text
    assert base.model_copy(update={"search": load_config(generic).search}) == load_config(generic, ["trainer.epochs=3"])  # nothing else moved
    assert not trial_config(base, {"task.history_dropout": 0.5}).search.enabled  # nor in the tuned config written from it
    caplog.clear()
    assert tune_base(CONFIG) == load_config(CONFIG) and caplog.text == ""  # no search of its own: untouched


def test_default_space_is_valid():
    validate_space(load_config(CONFIG), load_space(None))


def test_space_file_and_errors(tmp_path):
    base = load_config(CONFIG)
    good = tmp_path / "space.yaml"
    good.write_text("trainer.lr: {loguniform: [0.001, 0.01]}\ntrainer.batch_size: {randint: [64, 257]}\n")
    space = load_space(good)
    validate_space(base, space)
    assert space["trainer.batch_size"] == {"randint": [64, 257]}

    def fails(text: str, match: str) -> None:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match):
            validate_space(base, load_space(bad), str(bad))

    fails("trainer.lrr: {loguniform: [0.001, 0.01]}", "trainer.lrr: not a config key")
    fails("task.history_dropout: {uniform: [0.1, 1.0]}", "task.history_dropout: uniform value 1.0")
    fails("trainer.lr: {loguniform: [0, 0.01]}", "loguniform needs low > 0")
    fails("trainer.lr: {normal: [0, 1]}", "unknown sampler")
    fails("trainer.lr: 0.01", "expected one sampler")
    with pytest.raises(ConfigError, match="not found"):
        load_space(tmp_path / "missing.yaml")


def test_trial_config_sets_dotted_keys():
    cfg = trial_config(load_config(CONFIG), {"model.embedding_dim": 32, "model.use_user_id": True, "trainer.lr": 0.005})
    assert (cfg.model.embedding_dim, cfg.model.use_user_id, cfg.trainer.lr) == (32, True, 0.005)


def test_refuses_to_tune_on_test():
    with pytest.raises(ConfigError, match="validation metric"):
        run_tune(CONFIG, metric="test/ndcg@10", trials=1)


def test_cli_parses_tune():
    args = build_parser().parse_args(["tune", "--config", str(CONFIG), "--trials", "3", "--set", "trainer.epochs=2", "--search-space", "s.yaml",
                                      "--out", "o.yaml", "--metric", "val/recall@10"])
    assert args.func is cmd_tune
    assert (args.trials, args.set, args.search_space, args.out, args.metric) == (3, ["trainer.epochs=2"], "s.yaml", "o.yaml", "val/recall@10")
