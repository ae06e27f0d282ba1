"""`trustrec experiment report` (training/experiments/report.py) on a real SQLite store holding a
hand-made exposure log: per-arm figures by hand, intent-to-treat with the no-consent fallback, SRM
with the holdout, the HTML page and plot, the MLflow run, and the CLI's refusals."""
import json

import pytest
import yaml
from mlflow import MlflowClient

from cli.main import main
from features.exposures import Exposure, ExposureLog, record_outcome
from features.store import FeatureStore
from tests.features.test_consent import tiny_dataset

EXPERIMENT = {"name": "pers-vs-pop", "arms": [{"name": "control", "baseline": "popularity"}, {"name": "treatment", "model": "champion"}], "holdout": 0.1}


@pytest.fixture
def logged(tmp_path, monkeypatch):
    """control: users c0-c3, one list of 2 items each, clicks 1, 0, 1, 0 -> CTR 2 / 8;
    treatment: t0-t3, clicks 2, 1, 1, 0 -> 4 / 8, t3 served the fallback (no consent);
    holdout: h0 (outside the arms, in the SRM test)."""
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", "report-test-salt")
    url = f"sqlite:///{tmp_path / 'features.db'}"
    store = FeatureStore(url)
    store.load_dataset(tiny_dataset())
    log = ExposureLog(store, interval_s=60)
    clicks = {f"pii-{u}": c for u, c in {"c0": [0], "c1": [], "c2": [1], "c3": [], "t0": [0, 1], "t1": [1], "t2": [0], "t3": [], "h0": [0]}.items()}
    ids = {}
    for n, (user, clicked) in enumerate(clicks.items()):
        arm = {"c": "control", "t": "treatment", "h": "holdout"}[user[4]]
        served = None if arm == "holdout" else "control" if user == "pii-t3" else arm
        ids[user] = f"{n:032x}"
        log.append(Exposure(ids[user], store.subject_hash(user), "pers-vs-pop", arm, served, None, False, [("i1", 0.9, 1.0), ("i2", 0.5, 1.0)], 1000 + n))
    log.flush()
    for user, clicked in clicks.items():
        for pos in clicked:
            record_outcome(store, user, ids[user], "click", 1, item_id=("i1", "i2")[pos])
    record_outcome(store, "pii-t0", ids["pii-t0"], "click", 1, item_id="i1")  # a second click on one position counts once
    record_outcome(store, "pii-c1", ids["pii-c1"], "dwell", 30)  # not a click
    log.close()
    serve = yaml.safe_load(open("configs/serve.yaml"))
    serve["applications"][0]["args"].update(store_url=url, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment=EXPERIMENT)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(serve))
    yield store, config, tmp_path
    store.close()


def test_report_by_hand_through_the_cli(logged, capsys):
    store, config, root = logged
    assert main(["experiment", "report", "pers-vs-pop", "--config", str(config), "--out", str(root / "rep")]) == 0
    out = capsys.readouterr().out
    body = json.loads((root / "rep" / "report.json").read_text())
    control, treatment = body["arms"]["control"], body["arms"]["treatment"]
    assert (control["users"], control["exposures"], control["clicks"]) == (4, 4, 2) and control["ctr"]["value"] == pytest.approx(2 / 8)
    assert (treatment["users"], treatment["clicks"]) == (4, 4) and treatment["ctr"]["value"] == pytest.approx(4 / 8)
    assert treatment["served_fallback_exposures"] == 1 and control["served_fallback_exposures"] == 0  # t3 stays in treatment (ITT)
    assert treatment["lift"]["ctr"]["absolute"]["value"] == pytest.approx(0.25) and treatment["lift"]["ctr"]["relative"]["value"] == pytest.approx(1.0)
    assert control["conversion"]["value"] == pytest.approx(0.5) and treatment["conversion"]["value"] == pytest.approx(0.75)
    assert body["srm"]["observed"] == {"control": 4, "treatment": 4, "holdout": 1} and body["holdout_exposures"] == 1
    assert body["srm"]["expected"]["holdout"] == pytest.approx(0.9) and body["srm"]["expected"]["control"] == pytest.approx(4.05)
    assert "guardrails" in treatment and treatment["guardrails"]["coverage"] == pytest.approx(2 / 4)  # i1, i2 of 4 items
    assert treatment["guardrails"]["diversity"] == pytest.approx(1.0)  # i1 (Comedy, Drama) vs i2 (Sci-Fi): Jaccard distance 1
    page = (root / "rep" / "report.html").read_text()
    assert "treatment" in page and "arms.png" in page and (root / "rep" / "arms.png").stat().st_size > 1000
    assert "lift +100.00 %" in out and "sample ratio p =" in out
    assert "pii-" not in page + out + json.dumps(body)  # subjects are hashes, never ids
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(body["mlflow_run_id"])
    assert run.info.run_name == "report:pers-vs-pop" and run.data.metrics["treatment/ctr"] == pytest.approx(0.5)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "experiment_report")} >= {"experiment_report/report.html", "experiment_report/arms.png"}


def test_cli_refusals_name_what_is_wrong(logged, capsys):
    _, config, root = logged
    assert main(["experiment", "report", "other", "--config", str(config), "--no-mlflow"]) == 2
    assert "declares 'pers-vs-pop', not 'other'" in capsys.readouterr().err
    assert main(["experiment", "report", "pers-vs-pop", "--config", str(config), "--store-url", f"sqlite:///{root / 'nope.db'}"]) == 2
    assert "--store-url: no such file" in capsys.readouterr().err and not (root / "nope.db").exists()
    empty = root / "empty.db"
    FeatureStore(f"sqlite:///{empty}").close()
    assert main(["experiment", "report", "pers-vs-pop", "--config", str(config), "--store-url", f"sqlite:///{empty}", "--no-mlflow"]) == 2
    assert "no exposure logged yet" in capsys.readouterr().err
