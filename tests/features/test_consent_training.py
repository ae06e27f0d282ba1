"""`data.source: store` trains only on what consent and erasure allow, and the run records the
snapshot hash (manifest provenance + MLflow tag) without listing anyone."""
import json
from pathlib import Path

import pytest

from features.config import SyntheticConfig
from features.consent import erase_user, export_training_data, record_consent, record_event
from features.store import FeatureStore
from features.synthetic import generate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", "salt-for-the-training-test")
    url = f"sqlite:///{tmp_path / 'features.db'}"
    ds = generate(SyntheticConfig(n_users=60, n_items=50, n_genres=4, mean_interactions_per_user=10, seed=3))
    with FeatureStore(url) as store:
        store.load_dataset(ds)
        record_consent(store, "u1", {"training": False})
        record_consent(store, "u2", {"demographics": False})
        erase_user(store, "u3")
        record_event(store, "u4", "i50", rating=5, timestamp=2_000_000_000)
    return tmp_path, url


def test_training_from_the_store_honours_consent_and_records_the_snapshot(store_run):
    import mlflow

    from tests.conftest import tiny_overrides
    from training.config import load_config
    from training.pipeline import train

    root, url = store_run
    overrides = tiny_overrides(root) + ["data.source=store", f"data.store.url={url}", f"store.url={url}", "trainer.epochs=2"]
    result = train(load_config(REPO / "configs" / "two_tower.yaml", overrides))

    with FeatureStore(url) as store:
        expected, snapshot = export_training_data(store)
        assert store.user_history("u1"), "the store, also the run's store.load target, was not replaced by its consent-filtered export"
    prov = result.manifest["provenance"]["data"]
    # u3's erasure was applied by the store export itself, so no user was left for the tombstone check to remove
    assert prov == {"snapshot": snapshot, "users": 58, "items": 50, "interactions": len(expected.interactions), "erasures_applied": 0, "tombstones": 1}
    users = json.loads((result.artifact_dir / "user_vocab.json").read_text())["ids"]
    assert "u1" not in users and "u3" not in users and {"u2", "u4"} <= set(users) and len(users) == 58
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    run = mlflow.get_run(result.run_id)
    assert run.data.tags["data_snapshot"] == snapshot
