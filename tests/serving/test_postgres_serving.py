"""trustrec on a real PostgreSQL server (tests/pg.py) where users outgrow SQLite: the MLflow backend
store (runs, registry, aliases) and the feature store shared by serving replicas and a trainer.

- MLflow: a tiny synthetic model trained with `tracking.tracking_uri=postgresql+psycopg://...`,
  registered as @champion, loaded back through `models:/trustrec@champion` (its export dir deleted
  first, so the bundle comes from MLflow's artifact store), with no password in the run's params.
- Concurrency (Ray): `trustrec serve`'s launcher with 2 replicas on one PostgreSQL store, while
  `trustrec train` (another process) trains and bulk-loads the same store; every consent flip made
  over HTTP shows on the very next /v1/recommend, whichever replica answers (both must answer)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import REPO
from tests.pg import free_port

ADMIN, SECRET, SALT = "pg-admin-token-51c0e2", "pg-token-secret-8d2a6b", "pg-erasure-salt-0f93c4"
SECRETS = {"TRUSTREC_ADMIN_TOKEN": ADMIN, "TRUSTREC_TOKEN_SECRET": SECRET, "TRUSTREC_ERASURE_SALT": SALT}
SMALL = ["data.synthetic.n_users=150", "data.synthetic.n_items=120", "model.embedding_dim=16", "model.hidden_dim=16",
         "model.output_dim=16", "trainer.progress=false"]  # fmt: skip


def overrides(root: Path, tracking_uri: str, store_url: str, epochs: int) -> list[str]:
    return SMALL + [f"trainer.epochs={epochs}", f"tracking.tracking_uri={tracking_uri}", f"store.url={store_url}",
                    f"export.output_dir={root}/artifacts", f"trainer.checkpoint_dir={root}/checkpoints"]  # fmt: skip


# ---- MLflow's backend store on PostgreSQL --------------------------------------------------------
@pytest.mark.postgres
def test_mlflow_on_postgres_trains_registers_and_serves_champion(postgres, tmp_path, monkeypatch):
    import mlflow
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from features.store import FeatureStore
    from serving.recommender import Recommender
    from training.config import load_config
    from training.pipeline import train

    monkeypatch.chdir(tmp_path)  # MLflow's own default for a database backend: ./mlruns of the cwd
    tracking, store_url = postgres.url(postgres.database("mlflow")), postgres.url(postgres.database("store"))
    assert make_url("postgresql://h/db").get_dialect().driver == "psycopg"  # SQLAlchemy 2.1: plain postgresql:// is psycopg 3 too
    with pytest.raises(ValueError, match="tracking.artifact_location: a postgresql tracking store has no place for run artifacts"):
        train(load_config(REPO / "configs" / "two_tower.yaml", overrides(tmp_path, tracking, store_url, epochs=2)))
    shared = tmp_path / "shared-artifacts"
    cfg = load_config(REPO / "configs" / "two_tower.yaml", [*overrides(tmp_path, tracking, store_url, epochs=2), f"tracking.artifact_location={shared}"])
    result = train(cfg)
    assert not (tmp_path / "mlruns").exists() and any(shared.rglob("MLmodel"))  # the artifacts went where configured
    assert result.model_version == "1"

    client = mlflow.MlflowClient(tracking_uri=tracking)
    assert str(client.get_model_version_by_alias("trustrec", "champion").version) == "1"
    run = client.get_run(result.run_id)
    flat = yaml.safe_load(Path(client.download_artifacts(result.run_id, "config_flat.json", str(tmp_path))).read_text())  # the whole config
    assert run.data.params["data.source"] == "synthetic" and flat["data.synthetic.n_users"] == 150 and flat["store.url"] == store_url
    assert postgres.password not in repr(run.data.params) + repr(flat)  # the URL names a passfile, never the password
    with create_engine(tracking).connect() as conn:  # MLflow's own tables, in PostgreSQL
        assert conn.execute(text("SELECT version FROM registered_model_aliases WHERE alias = 'champion'")).scalar() == 1

    shutil.rmtree(cfg.export.output_dir)  # what is served must come from the registry, not the export dir
    with FeatureStore(store_url) as store:
        rec = Recommender.from_uri("models:/trustrec@champion", store, tracking_uri=tracking.replace("postgresql+psycopg://", "postgresql://"))
        user = _user_with_history(store)
        answer = rec.recommend(user, k=5)
    assert rec.model_version == "1" and answer["personalized"] is True and len(answer["items"]) == 5


def _user_with_history(store) -> str:
    from sqlalchemy import select

    from features.store import interactions_table

    with store.engine.connect() as conn:
        return conn.scalar(select(interactions_table.c.user_id).order_by(interactions_table.c.user_id).limit(1))


# ---- two replicas and a trainer on one PostgreSQL store (Ray) -------------------------------------
def environment() -> dict[str, str]:
    """A trainer's environment as an operator's shell has it: the secrets, no Ray token of ours."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH_")}
    return {**env, **SECRETS, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def world(postgres, tmp_path_factory):
    from serving.launch import start, stop
    from training.config import load_config
    from training.pipeline import train

    mp = pytest.MonkeyPatch()
    for name, value in SECRETS.items():
        mp.setenv(name, value)  # before Ray starts: its workers inherit the environment
    root = tmp_path_factory.mktemp("pg-serving")
    store_url = postgres.url(postgres.database("serving"))
    tracking = f"sqlite:///{root}/mlflow.db"
    train(load_config(REPO / "configs" / "two_tower.yaml", overrides(root, tracking, store_url, epochs=2)))  # loads the store

    cfg = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    cfg["http_options"]["port"] = free_port()
    app = cfg["applications"][0]
    app["args"].update(tracking_uri=tracking, store_url=store_url)
    model = next(d for d in app["deployments"] if d["name"] == "Model")
    model["num_replicas"] = 2
    for section in (cfg, app):  # access logs: which replica answered (they hold no id or token)
        section["logging_config"]["enable_access_log"] = True
    path = root / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    url = start(path, num_cpus=2)
    yield {"root": root, "url": url, "store_url": store_url}
    stop()
    mp.undo()


def bearer(user: str) -> dict:
    from serving.auth import user_token

    return {"Authorization": f"Bearer {user_token(SECRET, user)}"}


def personalized(url: str, user: str) -> bool:
    r = requests.post(f"{url}/v1/recommend", json={"user_id": user, "k": 5}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["personalized"]


def replica_logs_answering(path: str) -> set[str]:
    """Replica log files (one per replica) with an access-log line for `path`."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return {p.name for p in logs.glob("replica_trustrec_Model_*.log") if path in p.read_text(errors="replace")}


@pytest.mark.ray
@pytest.mark.postgres
def test_two_replicas_and_a_trainer_share_one_postgres_store(world):
    from features.store import FeatureStore

    url = world["url"]
    with FeatureStore(world["store_url"]) as store:
        user = _user_with_history(store)
        assert personalized(url, user) is True  # opt_out regime: personalized until the user says no
        before = store.generation()

        root = world["root"] / "retrain"
        argv = ["train", "--config", str(REPO / "configs" / "two_tower.yaml")]
        for o in overrides(root, f"sqlite:///{root}/mlflow.db", world["store_url"], epochs=3):
            argv += ["--set", o]
        root.mkdir()
        trainer = subprocess.Popen([sys.executable, "-m", "cli", *argv], cwd=root, env=environment(),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        flips = flips_while_training = 0
        deadline = time.monotonic() + 540
        try:
            while True:
                granted = flips % 2 == 1  # off, on, off, ...
                r = requests.put(f"{url}/v1/users/{user}/consent", json={"personalization": granted}, headers=bearer(user), timeout=30)
                assert r.status_code == 200, r.text
                answers = [personalized(url, user) for _ in range(6)]
                assert answers == [granted] * 6, f"flip {flips} ({'on' if granted else 'off'}): {answers}"
                flips += 1
                running = trainer.poll() is None
                flips_while_training += running
                if not running and flips >= flips_while_training + 2 and flips % 2 == 0:
                    break  # two more flips after the trainer's import, ending where it started (on)
                assert time.monotonic() < deadline, "the trainer did not finish"
                time.sleep(0.3)  # leave the trainer some of the 2 cores
        finally:
            if trainer.poll() is None:
                trainer.kill()
            out = trainer.communicate()[0]
        assert trainer.returncode == 0, out[-3000:]
        assert flips_while_training >= 1
        print(f"{flips} consent flips, {flips_while_training} while the trainer ran, {6 * flips} requests checked")
        # the counter moved once per flip and once for the trainer's bulk load, which kept the ledger
        assert store.generation() == before + flips + 1
        assert personalized(url, user) is True
    assert len(replica_logs_answering("/v1/recommend")) == 2  # both replicas answered
