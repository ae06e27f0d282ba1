"""The privacy-budget ledger across retrains, as a user meets it: real DP trainings (Opacus) into one
real SQLite store, the real CLI refusing the one that would go past `privacy.total_epsilon` (exit 2,
nothing released), the manifest / model card / MLflow showing the cumulative figure, erasure
leaving the accounting, and `trustrec privacy-budget` printing the ledger."""
from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from cli.main import main
from features.consent import erase_user
from features.privacy_ledger import entries, spent
from features.store import FeatureStore
from tests.conftest import REPO, tiny_overrides
from training.config import ConfigError, load_config
from training.pipeline import train

CONFIG = str(REPO / "configs" / "two_tower.yaml")
DP = ["data.synthetic.n_users=80", "data.synthetic.n_items=50", "model.embedding_dim=8", "model.hidden_dim=16", "model.output_dim=8",
      "privacy.mode=dp", "privacy.target_epsilon=2", "trainer.epochs=2", "trainer.batch_size=1000",
      "tracking.register_model=false"]  # fmt: skip


@pytest.fixture
def first(tmp_path, monkeypatch):
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", "ledger-salt")
    overrides = tiny_overrides(tmp_path) + DP
    return tmp_path, overrides, train(load_config(CONFIG, overrides))


def manifest_privacy(root):
    return json.loads((root / "artifacts" / "manifest.json").read_text())["provenance"]["privacy"]


def test_retrains_compose_and_the_one_past_the_budget_is_refused(first, capsys):
    root, overrides, result = first
    eps1 = result.fit.privacy["epsilon"]
    ledger = manifest_privacy(root)["ledger"]
    assert ledger["entry"] == 1 and ledger["cumulative_epsilon"] == pytest.approx(eps1) and ledger["releases"] == 1
    assert MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(result.run_id).data.metrics["privacy/cumulative_epsilon"] == pytest.approx(eps1)
    store = FeatureStore(f"sqlite:///{root}/features.db")
    covered = entries(store)[0]["users"]
    assert covered == result.fit.privacy["training_users"] and entries(store)[0]["run_id"] == result.run_id

    # a retrain under a total of 3: it plans epsilon 2 on users who spent ~2 -> refused before training
    run_before = json.loads((root / "artifacts" / "manifest.json").read_text())["provenance"]["run_id"]
    code = main(["train", "--config", CONFIG, *sum((["--set", o] for o in overrides + ["privacy.total_epsilon=3"]), [])])
    err = capsys.readouterr().err
    assert code == 2 and "privacy.total_epsilon" in err and "Nothing was released" in err
    assert len(entries(store)) == 1  # nothing recorded ...
    assert json.loads((root / "artifacts" / "manifest.json").read_text())["provenance"]["run_id"] == run_before  # ... nor exported
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    assert len(client.search_runs([client.get_experiment_by_name("trustrec").experiment_id])) == 1  # no MLflow run either

    # under a total of 5 it trains; the manifest and the card show the composed figure
    second = train(load_config(CONFIG, overrides + ["privacy.total_epsilon=5"]))
    eps2 = second.fit.privacy["epsilon"]
    ledger = manifest_privacy(root)["ledger"]
    assert ledger["cumulative_epsilon"] == pytest.approx(eps1 + eps2) and ledger["releases"] == 2 and ledger["budget_epsilon"] == 5
    assert ledger["cumulative_delta"] == pytest.approx(2 * result.fit.privacy["delta"])
    from serving.recommender import Recommender
    from serving.users_api import model_card

    card = model_card(Recommender.from_dir(root / "artifacts"))
    assert card["privacy"]["epsilon"] == pytest.approx(eps2) and card["privacy"]["cumulative_epsilon"] == pytest.approx(eps1 + eps2)

    # erasing one covered user takes them out of the accounting, not the others
    with store.engine.connect() as conn:
        user = conn.exec_driver_sql("SELECT user_id FROM users ORDER BY user_id LIMIT 1").scalar()
    erase_user(store, user)
    assert [r["still_covered"] for r in entries(store)] == [covered - 1, covered - 1]
    assert spent(store).epsilon == pytest.approx(eps1 + eps2)  # everyone else still spent both

    assert main(["privacy-budget", "--config", CONFIG, "--store-url", f"sqlite:///{root}/features.db", "--set", "privacy.total_epsilon=5"]) == 0
    out = capsys.readouterr().out
    assert "dp-sgd (opacus), user-level" in out and f"epsilon {eps1 + eps2:.3g}" in out and "of a budget of 5" in out and user not in out
    assert main(["privacy-budget", "--store-url", f"sqlite:///{root}/nope.db"]) == 2  # never creates a store
    assert not (root / "nope.db").exists() and "--store-url: no such file" in capsys.readouterr().err


def test_a_budget_without_the_ledger_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="privacy.total_epsilon: a budget needs the ledger"):
        load_config(CONFIG, tiny_overrides(tmp_path) + DP + ["privacy.total_epsilon=5", "privacy.ledger=false"])
