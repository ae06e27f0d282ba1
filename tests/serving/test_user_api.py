"""Customer control over real HTTP: a real Ray Serve app on 127.0.0.1 over a real SQLite file (a
copy of the `trained_run` store), checked against the store queried directly."""
import asyncio
import logging
import re
import sqlite3
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import requests
import yaml

from features.consent import export_training_data
from features.store import FeatureStore
from serving.auth import user_token
from serving.recommender import Recommender

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
ADMIN = "admin-token-for-tests-7d1c0b"
SECRET = "user-token-secret-for-tests-91ab4f"
SALT = "erasure-salt-for-tests-33e0"
CANARY = "pii-canary-user-5e2b"  # a user id searched for in every log line
EVIL = "1'; DROP TABLE interactions;--"


def free_port() -> int:
    from serving.ingress import free_port as pick  # below the ephemeral range (see there)

    return pick()


@pytest.fixture(scope="module")
def env():
    mp = pytest.MonkeyPatch()
    for name, value in (("TRUSTREC_ADMIN_TOKEN", ADMIN), ("TRUSTREC_TOKEN_SECRET", SECRET), ("TRUSTREC_ERASURE_SALT", SALT)):
        mp.setenv(name, value)  # before Ray starts: its workers inherit the environment
    yield
    mp.undo()


@pytest.fixture(scope="module")
def store_url(trained_run, tmp_path_factory):
    """A private copy of the fixture run's store: these tests change and erase users."""
    path = tmp_path_factory.mktemp("user-api") / "features.db"
    src, dst = sqlite3.connect(trained_run.root / "features.db"), sqlite3.connect(path)
    src.backup(dst)
    src.close(), dst.close()
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def server(trained_run, store_url, env, tmp_path_factory):
    from serving.launch import start, stop

    cfg = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    cfg["http_options"]["port"] = free_port()
    cfg["applications"][0]["args"].update(tracking_uri=trained_run.tracking_uri, store_url=store_url)
    # access logs on (configs/serve.yaml turns them off for speed): an operator may turn them on,
    # and test_tokens_and_user_ids_never_reach_the_logs checks that they still carry no id or token
    for section in (cfg, cfg["applications"][0]):
        section["logging_config"]["enable_access_log"] = True
    path = tmp_path_factory.mktemp("serve") / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    url = start(path, num_cpus=2)
    yield url
    stop()


@pytest.fixture(scope="module")
def store(store_url, env):
    s = FeatureStore(store_url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def local(trained_run, store):
    return Recommender.from_dir(trained_run.result.artifact_dir, store=store)


def bearer(user: str | None = None, token: str | None = None) -> dict:
    return {"Authorization": f"Bearer {token or user_token(SECRET, user)}"}


def path(user: str) -> str:
    return quote(user, safe="")


def recommend(url, headers=None, **body):
    r = requests.post(f"{url}/v1/recommend", json=body, headers=headers or {}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def ids(answer) -> list[str]:
    return [i["item_id"] for i in answer["items"]]


def genres_of(local, item_id) -> set[str]:
    return set(local.items[local.item_vocab.index(item_id)]["genres"])


def put(url, what, user, body, headers):
    return requests.put(f"{url}/v1/users/{path(user)}/{what}", json=body, headers=headers, timeout=30)


def cells_equal(store, value) -> list[tuple[str, str]]:
    """(table, column) pairs where some cell equals `value`, by plain sqlite3 on the file."""
    con = sqlite3.connect(store.engine.url.database)
    try:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return [
            (t, c) for t in tables for c in [r[1] for r in con.execute(f'PRAGMA table_info("{t}")')]
            if con.execute(f'SELECT count(*) FROM "{t}" WHERE "{c}" = ?', (value,)).fetchone()[0]
        ]  # fmt: skip
    finally:
        con.close()


# ---- authentication --------------------------------------------------------------------------
def test_user_data_endpoints_need_the_right_token(server, local):
    item = local.items[0]["item_id"]
    calls = [
        ("put", "/v1/users/u1/consent", {"personalization": True}),
        ("put", "/v1/users/u1/preferences", {}),
        ("post", "/v1/events", {"user_id": "u1", "item_id": item, "timestamp": 1}),
        ("get", "/v1/users/u1/data", None),
        ("delete", "/v1/users/u1", None),
    ]
    for method, route, body in calls:
        send = lambda headers: requests.request(method, f"{server}{route}", json=body, headers=headers, timeout=30)  # noqa: E731
        no_token = send({})
        assert no_token.status_code == 401 and no_token.headers["www-authenticate"] == "Bearer", (route, no_token.text)
        assert send({"Authorization": "Bearer not-a-token"}).status_code == 401
        assert send({"Authorization": f"Basic {ADMIN}"}).status_code == 401  # not a bearer token
        assert send(bearer(token=user_token("another-secret", "u1"))).status_code == 401  # forged
        assert send(bearer("u2")).status_code == 403, route  # genuine, but someone else's
        if method != "delete":
            assert send(bearer("u1")).status_code == 200, route
            assert send(bearer(token=ADMIN)).status_code == 200, route
    # open: recommendations, health, the model card
    assert requests.post(f"{server}/v1/recommend", json={"user_id": "u1"}, timeout=30).status_code == 200
    assert requests.get(f"{server}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{server}/v1/model", timeout=30).status_code == 200


# ---- consent takes effect on the very next request ---------------------------------------------
def test_consent_flip_changes_the_very_next_response(server, local, store):
    user = "u11"
    before = recommend(server, user_id=user, k=10)
    assert before["personalized"] is True
    assert put(server, "consent", user, {"personalization": False}, bearer(user)).json()["consents"]["personalization"]["granted"] is False
    off = recommend(server, user_id=user, k=10)
    assert off["personalized"] is False
    avoided = set(store.user_profile(user)["avoided_genres"])  # stated exclusions hold without personalization
    expected = [i for i in local.manifest["popularity"] if not genres_of(local, i) & avoided][:10]
    assert ids(off) == expected
    diverse = recommend(server, user_id=user, k=10, diversity=0.3)  # popularity with diversity
    assert diverse["personalized"] is False and set(ids(diverse)) <= set(local.manifest["popularity"][:50])
    assert ids(diverse) == ids(local.recommend(user, k=10, diversity=0.3))
    put(server, "consent", user, {"personalization": True}, bearer(user))
    back = recommend(server, user_id=user, k=10)
    assert back["personalized"] is True and ids(back) == ids(before)


def test_without_demographics_consent_the_tower_gets_none(server, local):
    user = "u12"
    assert local.feed([local.user_state(user)], [local.user_oov])["gender"][0] > 0
    put(server, "consent", user, {"demographics": False}, bearer(user))
    state = local.user_state(user)
    assert (state.profile["age"], state.profile["gender"], state.profile["occupation"]) == (None, None, None)
    feed = local.feed([state], [local.user_oov])
    assert (feed["age"][0], feed["gender"][0], feed["occupation"][0]) == (0, 0, 0)  # index 0 = missing
    assert recommend(server, user_id=user)["personalized"] is True  # still personalized, from the history


def test_stated_genres_steer_a_cold_user_at_once(server, local):
    user = "cold-steerer"
    counts: dict[str, int] = {}
    for item in local.manifest["popularity"]:
        for g in genres_of(local, item):
            counts[g] = counts.get(g, 0) + 1
    first, second = sorted(counts, key=lambda g: -counts[g])[:2]  # both cover >= 10 popular items
    assert counts[second] >= 10
    assert recommend(server, user_id=user, k=10)["personalized"] is False
    assert put(server, "preferences", user, {"liked_genres": [first]}, bearer(user)).status_code == 200
    steered = recommend(server, user_id=user, k=10)
    assert steered["personalized"] is True and all(first in genres_of(local, i) for i in ids(steered))
    put(server, "preferences", user, {"liked_genres": [second]}, bearer(user))
    assert all(second in genres_of(local, i) for i in ids(recommend(server, user_id=user, k=10)))


def test_avoided_genres_and_blocked_items_never_appear(server, local):
    user = "u13"
    plain = ids(recommend(server, user_id=user, k=20))
    blocked = plain[:3]
    avoided = sorted(genres_of(local, plain[3]) - set(local.user_state(user).profile["liked_genres"]))[:1]
    assert avoided, "the 4th item has a genre the user does not like"
    r = put(server, "preferences", user, {"avoided_genres": avoided, "blocked_items": blocked}, bearer(user))
    assert r.status_code == 200 and r.json()["blocked_items"] == sorted(blocked)

    def clean(answer):
        got = ids(answer)
        return len(got) == 100 and not set(got) & set(blocked) and not any(genres_of(local, i) & set(avoided) for i in got)

    for extra in ({}, {"diversity": 0.3}, {"explain": True}, {"exclude_seen": False}):
        assert clean(recommend(server, user_id=user, k=100, **extra)), extra
    put(server, "consent", user, {"personalization": False}, bearer(user))
    fallback = recommend(server, user_id=user, k=10)
    assert fallback["personalized"] is False and not set(ids(fallback)) & set(blocked)
    assert not any(genres_of(local, i) & set(avoided) for i in ids(fallback))


# ---- events -------------------------------------------------------------------------------------
def test_events_without_training_consent_stay_out_of_training(server, local, store):
    user, (a, b) = "event-user", [it["item_id"] for it in local.items[:2]]
    post = lambda item, ts: requests.post(f"{server}/v1/events", json={"user_id": user, "item_id": item, "rating": 4, "timestamp": ts}, headers=bearer(user), timeout=30)  # noqa: E731
    put(server, "consent", user, {"training": False}, bearer(user))
    assert post(a, 100).json() == {"stored": True, "for_training": False}
    put(server, "consent", user, {"training": True}, bearer(user))
    assert post(b, 200).json() == {"stored": True, "for_training": True}
    ds, _ = export_training_data(store)
    mine = ds.interactions.take(ds.interactions.user == ds.user_vocab.index(user))
    assert ds.item_vocab.decode(mine.item) == [b] and mine.timestamp.tolist() == [200]
    data = requests.get(f"{server}/v1/users/{user}/data", headers=bearer(user), timeout=30).json()
    assert [(e["item_id"], e["for_training"]) for e in data["events"]] == [(a, False), (b, True)]
    answer = recommend(server, user_id=user, k=5)  # the events are the history of a user the model never saw
    assert answer["personalized"] is True and not {a, b} & set(ids(answer))
    put(server, "consent", user, {"training": False, "personalization": False}, bearer(user))
    assert post(a, 300).json() == {"stored": False, "for_training": False}


# ---- explanations -----------------------------------------------------------------------------
def test_every_item_is_explained(server, local, store):
    user = "u14"
    answer = recommend(server, bearer(user), user_id=user, k=20, explain=True)
    history = np.unique(local.item_vocab.encode(store.user_history(user)))
    assert answer["personalized"] and len(answer["items"]) == 20
    for item in answer["items"]:
        assert item["reasons"], item
        first = item["reasons"][0]
        sims = local.item_vectors[history] @ local.item_vectors[local.item_vocab.index(item["item_id"])]
        assert first["kind"] == "similar_to_history"
        assert first["item_id"] == local.item_vocab.ids[history[np.argmax(sims)]]  # the nearest history item
        assert first["similarity"] == pytest.approx(float(sims.max()), abs=1e-4)
    assert "reasons" not in recommend(server, user_id=user, k=3)["items"][0]  # only when asked

    stranger = recommend(server, bearer("explain-stranger"), user_id="explain-stranger", k=10, explain=True)
    assert all([r["kind"] for r in it["reasons"]] == ["popular"] for it in stranger["items"])
    liked = sorted(genres_of(local, local.manifest["popularity"][0]))[0]
    put(server, "preferences", "explain-cold", {"liked_genres": [liked]}, bearer("explain-cold"))
    cold = recommend(server, bearer(token=ADMIN), user_id="explain-cold", k=30, explain=True)  # the admin sees reasons too
    kinds = [[r["kind"] for r in it["reasons"]] for it in cold["items"]]
    assert all(k for k in kinds) and ["stated_genre"] in kinds
    for item, k in zip(cold["items"], kinds):
        assert (k == ["stated_genre"]) == (liked in genres_of(local, item["item_id"]))
        if k == ["stated_genre"]:
            assert item["reasons"][0]["genres"] == [liked]


def test_reasons_are_personal_data_an_anonymous_caller_never_gets(server, store):
    user = "u16"
    put(server, "preferences", user, {"liked_genres": store.genre_names()[:1]}, bearer(user))
    put(server, "consent", "u17", {"personalization": False}, bearer("u17"))
    for who in (user, "u17", "never-seen-user"):  # known, opted out, unknown: the answers look alike
        answer = recommend(server, user_id=who, k=10, explain=True)
        assert answer["reasons_withheld"] is True and all("reasons" not in it for it in answer["items"]), who
    assert all(it["reasons"] for it in recommend(server, bearer(user), user_id=user, k=5, explain=True)["items"])
    assert "reasons_withheld" not in recommend(server, user_id=user, k=5)  # nothing was asked, nothing withheld
    wrong = requests.post(f"{server}/v1/recommend", json={"user_id": user, "explain": True}, headers=bearer("u18"), timeout=30)
    forged = requests.post(f"{server}/v1/recommend", json={"user_id": user, "explain": True}, headers=bearer(token="forged.abc"), timeout=30)
    assert (wrong.status_code, forged.status_code) == (403, 401)  # a token that is sent is checked


# ---- validation, injection ------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, route, body, field",
    [
        ("put", "/v1/users/u15/consent", {"marketing": True}, "marketing"),
        ("put", "/v1/users/u15/consent", {"training": "maybe"}, "training"),
        ("put", "/v1/users/u15/preferences", {"liked_genres": ["No-Such-Genre"]}, "liked_genres"),
        ("put", "/v1/users/u15/preferences", {"blocked_items": ["no-such-item"]}, "blocked_items"),
        ("post", "/v1/events", {"user_id": "u15", "item_id": "no-such-item"}, "item_id"),
        ("post", "/v1/events", {"user_id": "u15"}, "item_id"),
    ],
)
def test_bad_input_gets_422_naming_the_field(server, method, route, body, field):
    r = requests.request(method, f"{server}{route}", json=body, headers=bearer(token=ADMIN), timeout=30)
    assert r.status_code == 422, r.text
    assert any(err["loc"][-1] == field for err in r.json()["detail"]), r.json()


def test_injection_shaped_ids_are_plain_data(server, store):
    with store.engine.connect() as conn:
        n_rows = conn.exec_driver_sql("SELECT count(*) FROM interactions").scalar_one()
    admin = bearer(token=ADMIN)
    assert put(server, "consent", EVIL, {"training": False}, admin).status_code == 200
    assert put(server, "consent", EVIL, {"training": True}, bearer(EVIL)).status_code == 200  # their own token works too
    data = requests.get(f"{server}/v1/users/{path(EVIL)}/data", headers=admin, timeout=30).json()
    assert data["user_id"] == EVIL and len(data["consents"]["history"]) == 2
    assert requests.get(f"{server}/v1/users/{path(chr(39) + ' OR 1=1;--')}/data", headers=admin, timeout=30).status_code == 404
    assert recommend(server, user_id=EVIL)["personalized"] is False
    assert requests.delete(f"{server}/v1/users/{path(EVIL)}", headers=admin, timeout=30).json()["deleted"]["consent_ledger"] == 2
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM interactions").scalar_one() == n_rows  # table intact
    assert cells_equal(store, EVIL) == []


# ---- the model card ---------------------------------------------------------------------------
def test_model_card(server, trained_run):
    card = requests.get(f"{server}/v1/model", timeout=30).json()
    manifest = trained_run.result.manifest
    assert card["model_version"] == trained_run.result.model_version and card["kind"] == "two_tower"
    assert card["data_snapshot"] == manifest["provenance"]["data"]["snapshot"] and card["data_snapshot"].startswith("sha256:")
    assert card["data"]["users"] == 1000 and "u1" not in str(card["data"])
    assert card["metrics"]["test/ndcg_at_10"] == pytest.approx(manifest["metrics"]["test/ndcg_at_10"])  # the names MLflow shows
    assert card["privacy"] == {"mode": "none", "epsilon": None, "delta": None, "cumulative_epsilon": None, "cumulative_delta": None, "details": {}}


# ---- erasure ------------------------------------------------------------------------------------
def test_erasure_end_to_end(server, store, local, trained_run):
    user = "u7"
    n_history = len(store.user_history(user))
    assert n_history > 0 and user in local.user_vocab  # the model itself knows u7
    put(server, "consent", user, {"training": True}, bearer(user))
    data = requests.get(f"{server}/v1/users/{user}/data", headers=bearer(user), timeout=30).json()
    assert len(data["interactions"]) == n_history and data["profile"]["gender"] in ("F", "M")
    assert recommend(server, user_id=user)["personalized"] is True

    receipt = requests.delete(f"{server}/v1/users/{user}", headers=bearer(user), timeout=30)
    assert receipt.status_code == 200, receipt.text
    body = receipt.json()
    assert body["deleted"] == {"users": 1, "interactions": n_history, "events": 0, "consent_ledger": 1, "blocked_items": 0, "privacy_spend": 0,
                               "exposures": 0, "outcomes": 0}
    assert body["tombstone"] == store.subject_hash(user) and user not in body["tombstone"]
    assert cells_equal(store, user) == []  # zero rows for the user in every table, queried directly
    assert requests.get(f"{server}/v1/users/{user}/data", headers=bearer(user), timeout=30).status_code == 404
    assert requests.delete(f"{server}/v1/users/{user}", headers=bearer(token=ADMIN), timeout=30).status_code == 404
    assert put(server, "consent", user, {"training": True}, bearer(user)).status_code == 409
    assert recommend(server, user_id=user)["personalized"] is False  # next request: nothing personal left
    assert user not in export_training_data(store)[0].user_vocab

    # a re-import of a dataset that still holds u7 leaves them out: store, serving and training
    from features.synthetic import generate

    store.load_dataset(generate(trained_run.cfg.data.synthetic))
    assert not store.has_user(user) and store.user_history(user) == [] and cells_equal(store, user) == []
    assert recommend(server, user_id=user)["personalized"] is False
    assert user not in export_training_data(store)[0].user_vocab and "u8" in export_training_data(store)[0].user_vocab


# ---- no PII in logs -----------------------------------------------------------------------------
def test_tokens_and_user_ids_never_reach_the_logs(server, local, trained_run, store_url, caplog):
    import ray

    token, item = user_token(SECRET, CANARY), local.items[0]["item_id"]
    headers = bearer(CANARY)
    assert put(server, "consent", CANARY, {"training": True}, headers).status_code == 200
    assert put(server, "preferences", CANARY, {"blocked_items": [item]}, headers).status_code == 200
    assert requests.post(f"{server}/v1/events", json={"user_id": CANARY, "item_id": item}, headers=headers, timeout=30).status_code == 200
    assert recommend(server, user_id=CANARY, explain=True)["personalized"] is True
    assert requests.get(f"{server}/v1/users/{CANARY}/data", headers=headers, timeout=30).status_code == 200
    assert requests.get(f"{server}/v1/users/{CANARY}/data", headers=bearer("someone-else"), timeout=30).status_code == 403
    assert requests.delete(f"{server}/v1/users/{CANARY}", headers=headers, timeout=30).status_code == 200

    # the same handlers in this process, under caplog
    from serving.config import AppArgs
    from serving.users_api import ConsentRequest, UsersService

    caplog.set_level(logging.DEBUG)
    service = UsersService(AppArgs(store_url=store_url))
    creds = type("Creds", (), {"credentials": user_token(SECRET, CANARY + "-2")})()
    asyncio.run(service.put_consent(CANARY + "-2", ConsentRequest(training=False), creds))
    asyncio.run(service.delete_user(CANARY + "-2", creds))
    assert "consent recorded for" in caplog.text and "erased user" in caplog.text  # the handlers did log
    for secret in (CANARY, token, creds.credentials, ADMIN, SECRET):
        assert secret not in caplog.text

    # every Ray log file of this session: replicas, proxy, controller, workers
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    text = "\n".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt", ""))
    # Serve's access log (on in this fixture): method and route template (Ray 2.60; the route prefix before)...
    assert re.search(r" -- PUT /v1/users/\{user_id\}/\w+ 200 ", text) and re.search(r" -- DELETE /v1/users/\{user_id\} 200 ", text)
    for secret in (CANARY, token, ADMIN, SECRET):
        assert secret not in text  # ...never the id or a token
