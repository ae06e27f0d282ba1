"""`trustrec promote --gate-experiment` (training/experiments/gate.py + cli): a real MLflow registry,
a real SQLite store holding an experiment's log; the gate passes a challenger that clearly wins,
refuses one that does not, and records either decision in the audit log and the version's tags."""
import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from cli.main import main
from features.audit import AuditLog
from features.exposures import Exposure, ExposureLog, record_outcome
from features.store import FeatureStore
from tests.features.test_consent import tiny_dataset

EXPERIMENT = {"name": "champ-vs-chall", "arms": [{"name": "champ", "model": "champion"}, {"name": "chall", "model": "challenger"}]}
ITEMS = [("i1", 0.9, 1.0), ("i2", 0.8, 1.0), ("i3", 0.7, 1.0), ("i4", 0.6, 1.0)]


def registry(root):
    """Two runs with a registered version each: v1 @champion, v2 @challenger."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("trustrec")
    runs = []
    for alias in ("champion", "challenger"):
        run = client.create_run(client.create_experiment(f"e-{alias}"))
        client.set_terminated(run.info.run_id)
        version = client.create_model_version("trustrec", f"runs:/{run.info.run_id}/bundle", run.info.run_id)
        client.set_registered_model_alias("trustrec", alias, version.version)
        runs.append(run.info.run_id)
    return uri, client, runs


def log_experiment(store, clicks_per_arm: dict[str, int], users=40):
    """`users` per arm, one list of 4 items each; the first `clicks_per_arm[arm] * users / 40` users of an arm click 2 items."""
    log = ExposureLog(store, interval_s=60)
    plan = []
    for arm, clickers in clicks_per_arm.items():
        for n in range(users):
            user, eid = f"{arm}-user-{n}", f"{arm:>5}-{n:026d}"
            log.append(Exposure(eid, store.subject_hash(user), "champ-vs-chall", arm, arm, "1", False, ITEMS, 1000 + n))
            if n < clickers:
                plan.append((user, eid))
    log.close()
    for user, eid in plan:
        for item in ("i1", "i2"):
            record_outcome(store, user, eid, "click", 1, item_id=item)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", "gate-test-salt")
    uri, client, runs = registry(tmp_path)
    url = f"sqlite:///{tmp_path / 'features.db'}"
    store = FeatureStore(url)
    store.load_dataset(tiny_dataset())
    serve = yaml.safe_load(open("configs/serve.yaml"))
    serve["applications"][0]["args"].update(store_url=url, tracking_uri=uri, experiment=EXPERIMENT)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(serve))
    yield store, client, runs, uri, config
    store.close()
    mlflow.set_tracking_uri(None)


def promote(run, uri, config, *extra):
    return main(["promote", run, "--tracking-uri", uri, "--gate-experiment", "champ-vs-chall", "--config", str(config), *extra])


def test_a_clear_winner_is_promoted_and_the_evidence_recorded(setup, capsys):
    store, client, (champ_run, chall_run), uri, config = setup
    log_experiment(store, {"champ": 6, "chall": 30})  # CTR 12 / 160 vs 60 / 160
    assert promote(chall_run, uri, config) == 0
    assert str(client.get_model_version_by_alias("trustrec", "champion").version) == "2"
    tags = client.get_model_version("trustrec", "2").tags
    assert tags["gate.decision"] == "passed" and tags["gate.experiment"] == "champ-vs-chall" and tags["gate.reasons"] == "none"
    assert tags["gate.ctr_lift_relative"].startswith("+4.0000")  # 0.375 / 0.075 - 1 = 4
    entry = [e for e in AuditLog(store).entries() if e["action"] == "promotion_gate"][-1]
    assert entry["detail"]["passed"] is True and entry["detail"]["version"] == "2" and entry["detail"]["candidate_arm"] == "chall"
    assert "CTR lift +400.00 %" in capsys.readouterr().out


def test_no_clear_win_is_refused_recorded_and_the_alias_stays(setup, capsys):
    store, client, (champ_run, chall_run), uri, config = setup
    log_experiment(store, {"champ": 10, "chall": 11})  # 20 / 160 vs 22 / 160: the CI straddles zero
    assert promote(chall_run, uri, config) == 2
    err = capsys.readouterr().err
    assert "refused by the experiment gate" in err and "does not exclude zero" in err
    assert str(client.get_model_version_by_alias("trustrec", "champion").version) == "1"
    assert client.get_model_version("trustrec", "2").tags["gate.decision"] == "refused"
    assert [e["detail"]["passed"] for e in AuditLog(store).entries() if e["action"] == "promotion_gate"] == [False]


def test_the_gate_refuses_a_run_the_experiment_did_not_test(setup, capsys):
    store, client, (champ_run, chall_run), uri, config = setup
    log_experiment(store, {"champ": 6, "chall": 30})
    assert promote(champ_run, uri, config) == 2  # the champion's own run is not what the challenger arm served
    assert "the experiment did not test this model" in capsys.readouterr().err
    assert promote(chall_run, uri, config, "--gate-arm", "nope") == 2
    assert "--gate-arm: 'nope' is not an arm" in capsys.readouterr().err
