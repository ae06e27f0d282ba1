"""An experiment served through the real FastAPI routes of serving/app.py (without Ray: the routes'
`self` is a ModelServer, as in the `Model` deployment), on the trained fixture run's real bundle,
MLflow registry and a copy of its SQLite store: arms (a baseline, the champion with exploration,
a challenger alias loaded beside it), sticky assignment across a restart, consent, the exposure log
with the logging policy's propensities, outcomes through POST /v1/events, erasure."""
import asyncio
import sqlite3
from types import SimpleNamespace

import pytest
import ray.serve
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from features.consent import record_consent
from features.experiments import ExperimentConfig, ExperimentKeyError, assign
from features.exposures import exposures, outcomes
from features.store import FeatureStore
from serving.auth import user_token
from serving.metrics import RouteMetrics

KEY, SECRET, ADMIN, SALT = "experiment-key-for-tests-0123456789", "token-secret-exp-4d1f", "admin-token-exp-77aa", "erasure-salt-exp-91c2"
EXPERIMENT = {
    "name": "pers-vs-pop",
    "arms": [
        {"name": "control", "baseline": "popularity"},
        {"name": "treatment", "model": "champion", "epsilon": 0.5, "pool": 20},
        {"name": "chall", "model": "challenger"},
    ],
}


@pytest.fixture
def served(trained_run, tmp_path, monkeypatch):
    import serving.app as app_module
    from serving.users_api import UsersService

    for name, value in (("TRUSTREC_EXPERIMENT_KEY", KEY), ("TRUSTREC_TOKEN_SECRET", SECRET), ("TRUSTREC_ADMIN_TOKEN", ADMIN),
                        ("TRUSTREC_ERASURE_SALT", SALT)):  # fmt: skip
        monkeypatch.setenv(name, value)
    path = tmp_path / "features.db"
    src, dst = sqlite3.connect(trained_run.root / "features.db"), sqlite3.connect(path)
    src.backup(dst)
    src.close(), dst.close()
    client = MlflowClient(trained_run.tracking_uri)
    version = client.get_model_version_by_alias("trustrec", "champion").version
    client.set_registered_model_alias("trustrec", "challenger", version)  # a second alias: loaded as a second model
    args = {"store_url": f"sqlite:///{path}", "tracking_uri": trained_run.tracking_uri, "experiment": EXPERIMENT}

    def start():
        server = app_module.ModelServer(args)
        server.users = UsersService(server.cfg, server.store, server.audit)  # what Model.__init__ adds
        server.users.exposure_log = server.experiment.exposures
        server.routes = RouteMetrics()
        asyncio.run(server.reconfigure({"model_uri": "models:/trustrec@champion"}))
        return server

    server = start()
    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: SimpleNamespace(servable_object=server, replica_tag="trustrec#Model#r1"))
    with TestClient(app_module.api) as http:
        yield http, server, start
    server.experiment.close()
    server.store.close()


def users(server, n=60):
    with server.store.engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(f"SELECT user_id FROM users ORDER BY user_id LIMIT {n}")]


def test_arms_are_sticky_served_as_declared_and_logged_with_their_propensities(served):
    http, server, start = served
    cfg = ExperimentConfig.model_validate(EXPERIMENT)
    assert set(server.experiment.arm_models) == {"challenger"}  # the champion arm is the deployment's own model
    answers = {}
    for u in users(server):
        body = http.post("/v1/recommend", json={"user_id": u, "k": 5}).json()
        assert body["experiment"] == "pers-vs-pop" and body["arm"] == assign(cfg, u, KEY.encode()) and len(body["exposure_id"]) == 32
        answers[u] = body
        if body["arm"] == "control":
            assert body["personalized"] is False and body["model_version"] == "baseline:popularity"
        else:
            assert body["personalized"] is True and body["model_version"] == "1" and len(body["items"]) == 5
    assert {b["arm"] for b in answers.values()} == {"control", "treatment", "chall"}

    restarted = start()  # another replica, or the same after a restart: same arms, nothing stored
    try:
        assert all(assign(restarted.experiment.cfg, u, restarted.experiment.key) == b["arm"] for u, b in answers.items())
    finally:
        restarted.experiment.close()
        restarted.store.close()

    server.experiment.exposures.flush()
    logged = {e["exposure_id"]: e for e in exposures(server.store, "pers-vs-pop")}
    assert len(logged) == len(answers)
    for u, body in answers.items():
        e = logged[body["exposure_id"]]
        assert e["subject"] == server.store.subject_hash(u) and u not in str(e)  # a keyed hash, never the id
        assert [i[0] for i in e["items"]] == [it["item_id"] for it in body["items"]] and e["arm"] == e["served"] == body["arm"]
        props = [i[2] for i in e["items"]]
        if body["arm"] == "treatment":  # epsilon 0.5 over a pool of 20: exact marginals (bundle/policy.py)
            top = 0.5 + 0.5 / 20
            assert all(p in (pytest.approx(top), pytest.approx(0.025)) for p in props)
            assert e["explored"] or props == [pytest.approx(top)] * 5
        else:
            assert props == [1.0] * 5 and not e["explored"]


def test_without_consent_a_user_is_counted_in_the_arm_but_never_personalized(served):
    http, server, _ = served
    cfg = ExperimentConfig.model_validate(EXPERIMENT)
    user = next(u for u in users(server) if assign(cfg, u, KEY.encode()) == "treatment")
    record_consent(server.store, user, {"personalization": False})
    body = http.post("/v1/recommend", json={"user_id": user, "k": 5}).json()
    assert body["arm"] == "treatment" and body["personalized"] is False and body["model_version"] == "baseline:popularity"
    server.experiment.exposures.flush()
    e = next(x for x in exposures(server.store, "pers-vs-pop") if x["exposure_id"] == body["exposure_id"])
    assert (e["arm"], e["served"]) == ("treatment", "control")


def test_outcomes_join_through_post_events_and_erasure_removes_them(served):
    http, server, _ = served
    user, other = users(server, 2)
    body = http.post("/v1/recommend", json={"user_id": user, "k": 5}).json()
    theirs = http.post("/v1/recommend", json={"user_id": other, "k": 5}).json()
    item = body["items"][2]["item_id"]
    auth = {"Authorization": f"Bearer {user_token(SECRET, user)}"}
    ok = http.post("/v1/events", json={"user_id": user, "item_id": item, "exposure_id": body["exposure_id"]}, headers=auth)
    assert ok.status_code == 200 and ok.json()["outcome"] == {"exposure_id": body["exposure_id"], "kind": "click", "position": 2, "recorded": True}
    for payload, field in (({"exposure_id": theirs["exposure_id"]}, "exposure_id"), ({"exposure_id": "0" * 32}, "exposure_id"),
                           ({"exposure_id": body["exposure_id"], "item_id": "not-shown-item"}, "item_id"),
                           ({"exposure_id": body["exposure_id"], "kind": "like"}, "kind")):  # fmt: skip
        bad = http.post("/v1/events", json={"user_id": user, "item_id": item, **payload}, headers=auth)
        assert bad.status_code == 422 and field in str(bad.json()["detail"]), (payload, bad.json())
    # an anonymous caller, or one holding another user's token, cannot attach an outcome to this exposure
    other_auth = {"Authorization": f"Bearer {user_token(SECRET, other)}"}
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, other_auth):
        denied = http.post("/v1/events", json={"user_id": user, "item_id": item, "exposure_id": body["exposure_id"]}, headers=headers)
        assert denied.status_code in (401, 403), (headers, denied.status_code)
        assert body["exposure_id"] not in denied.text and user not in denied.text
    assert [o["position"] for o in outcomes(server.store, "pers-vs-pop")] == [2]  # the refused ones left nothing
    receipt = http.delete(f"/v1/users/{user}", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert receipt["deleted"]["exposures"] == 1 and receipt["deleted"]["outcomes"] == 1
    assert [e["exposure_id"] for e in exposures(server.store, "pers-vs-pop")] == [theirs["exposure_id"]]


def test_a_replica_refuses_to_start_without_the_key_or_with_an_alias_it_cannot_resolve(served, monkeypatch, trained_run):
    import serving.app as app_module

    _, server, _ = served
    monkeypatch.delenv("TRUSTREC_EXPERIMENT_KEY")
    with pytest.raises(ExperimentKeyError, match="TRUSTREC_EXPERIMENT_KEY"):
        app_module.ModelServer({"store_url": server.cfg.store_url, "experiment": EXPERIMENT})
    monkeypatch.setenv("TRUSTREC_EXPERIMENT_KEY", KEY)
    local = app_module.ModelServer({"store_url": server.cfg.store_url, "experiment": EXPERIMENT})
    try:
        with pytest.raises(ValueError, match=r"experiment.arms\[treatment\].model: alias 'champion' needs a registry model_uri"):
            asyncio.run(local.reconfigure({"model_uri": str(trained_run.result.artifact_dir)}))
    finally:
        local.experiment.close()
        local.store.close()


def test_a_reload_whose_arm_model_cannot_load_keeps_every_arm_serving(served, trained_run):
    """A promote that leaves an arm's alias unresolvable: the swap is refused whole (main model and
    arm models stay as they were), /healthz says why, and the experiment keeps answering."""
    http, server, _ = served
    before_main, before_arms = server.recommender, dict(server.experiment.arm_models)
    MlflowClient(trained_run.tracking_uri).delete_registered_model_alias("trustrec", "challenger")
    asyncio.run(server.reconfigure({"model_uri": "models:/trustrec@champion"}))
    assert server.recommender is before_main and server.experiment.arm_models == before_arms
    assert "challenger" in server.swap_error
    user = users(server, 1)[0]
    body = http.post("/v1/recommend", json={"user_id": user, "k": 5}).json()
    assert body["experiment"] == "pers-vs-pop" and len(body["items"]) == 5
