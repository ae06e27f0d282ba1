"""Every audited action through the real FastAPI routes of serving/app.py (without Ray: the routes'
`self` is a ModelServer with its UsersService, as in the `Model` deployment), then the audit table,
the audit file and the logs are searched for the raw user ids and every token: none may be there."""
import asyncio
import hashlib
import hmac
import logging
import sqlite3
import time
from types import SimpleNamespace

import numpy as np
import pytest
import ray.serve
from fastapi.testclient import TestClient

from features.audit import AuditLog
from features.schema import UNKNOWN_AGE, Dataset, Interactions, Items, Users
from features.store import FeatureStore
from features.vocab import Vocab
from serving.auth import user_token

ADMIN = "admin-token-audit-3f9e1a"
SECRET = "token-secret-audit-b7c240"
SALT = "erasure-salt-audit-0d5e"
CANARY = "pii-canary-user-5e2b"  # the user whose data is changed, exported and erased
OTHER = "other-user-9c1d"  # a second user: whose token is used where it must not be


def keyed(user_id: str) -> str:
    return hmac.new(SALT.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def dataset() -> Dataset:
    """CANARY: i1 @100, i2 @200; OTHER: i3 @300."""
    inter = Interactions(
        user=np.array([0, 0, 1], np.int64), item=np.array([0, 1, 2], np.int64),
        rating=np.array([4, 5, 3], np.float32), timestamp=np.array([100, 200, 300], np.int64),
    )  # fmt: skip
    return Dataset(
        "tiny", inter,
        Items(title=["One", "Two", "Three"], genres=[(0,), (1,), (0, 1)], year=np.array([1999, 2000, 2001], np.int32)),
        Users(np.array([30, UNKNOWN_AGE], np.int32), ["F", ""], ["artist", ""], [(), ()], [(), ()]),
        ["Comedy", "Drama"], Vocab([CANARY, OTHER], kind="user"), Vocab(["i1", "i2", "i3"], kind="item"),
    )  # fmt: skip


@pytest.fixture
def app(tmp_path, monkeypatch):
    """(TestClient over serving.app.api, the ModelServer behind it, the audit file path)."""
    import serving.app as app_module
    from serving.recommender import Recommender
    from serving.users_api import UsersService

    for name, value in (("TRUSTREC_ADMIN_TOKEN", ADMIN), ("TRUSTREC_TOKEN_SECRET", SECRET), ("TRUSTREC_ERASURE_SALT", SALT)):
        monkeypatch.setenv(name, value)
    url = f"sqlite:///{tmp_path / 'features.db'}"
    with FeatureStore(url) as s:
        s.load_dataset(dataset())
    versions = iter(["7", "8"])  # a stand-in model: these tests are about the audit, not ONNX
    monkeypatch.setattr(Recommender, "from_uri", staticmethod(lambda *a, **kw: SimpleNamespace(model_version=next(versions), provider="CPUExecutionProvider")))
    monkeypatch.setattr(app_module, "probe", lambda rec, store: None)
    path = tmp_path / "audit.jsonl"
    server = app_module.ModelServer({"store_url": url, "audit": {"table": True, "path": str(path)}, "auth": {"protect_recommend": True}})
    server.users = UsersService(server.cfg, server.store)  # what Model.__init__ adds
    # the routes find their `self` through Serve's replica context, as inside a replica
    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: SimpleNamespace(servable_object=server, replica_tag="trustrec#Model#r1"))
    asyncio.run(server.reconfigure({"model_uri": "models:/trustrec@champion"}))
    with TestClient(app_module.api) as client:
        yield client, server, path
    server.store.close()


def wait_for(server, n: int) -> None:
    """Until the audit holds n entries (a failed /v1/recommend check writes its entry off the event loop)."""
    deadline = time.monotonic() + 10
    while len(server.users.audit.entries()) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_every_audited_action_over_http_and_no_raw_id_or_token_anywhere(app, tmp_path, caplog):
    client, server, path = app
    caplog.set_level(logging.DEBUG)
    mine, others = user_token(SECRET, CANARY), user_token(SECRET, OTHER)
    forged = user_token("not-the-secret", CANARY)
    bearer = lambda token: {"authorization": f"Bearer {token}"}  # noqa: E731
    calls = [
        ("PUT", f"/v1/users/{CANARY}/consent", bearer(mine), {"training": False, "source": f"form-of-{CANARY}"}, 200),
        ("PUT", f"/v1/users/{CANARY}/preferences", bearer(mine), {"liked_genres": ["Drama"], "blocked_items": ["i3", "i1"]}, 200),
        ("POST", "/v1/events", bearer(mine), {"user_id": CANARY, "item_id": "i3", "rating": 4}, 200),
        ("GET", f"/v1/users/{CANARY}/data", bearer(mine), None, 200),
        ("GET", f"/v1/users/{CANARY}/data", {}, None, 401),  # no token
        ("PUT", f"/v1/users/{CANARY}/consent", bearer(forged), {"training": True}, 401),  # forged token
        ("DELETE", f"/v1/users/{CANARY}", bearer(others), None, 403),  # a genuine token, of another user
        ("POST", "/v1/events", bearer(ADMIN + "x"), {"user_id": OTHER, "item_id": "i1"}, 401),  # a near-miss admin token
        ("POST", "/v1/recommend", {}, {"user_id": CANARY, "k": 2}, 401),  # protect_recommend: true
        ("DELETE", f"/v1/users/{CANARY}", bearer(ADMIN), None, 200),
    ]
    for n, (method, route, headers, body, expected) in enumerate(calls):
        r = client.request(method, route, headers=headers, json=body)
        assert r.status_code == expected, (route, r.text)
        if route == "/v1/recommend":
            wait_for(server, n + 2)  # the start-up model swap + one entry per call so far
    asyncio.run(server.reconfigure({"model_uri": "models:/trustrec@challenger"}))

    c, o = keyed(CANARY), keyed(OTHER)
    expected = [
        ("model_swap", None, "replica:trustrec#Model#r1", {"old": None, "new": "7", "uri": "models:/trustrec@champion"}),
        ("consent", c, "user", {"purposes": {"training": False}}),
        ("preferences", c, "user", {"replaced": {"liked_genres": 1, "blocked_items": 2}}),
        ("event", c, "user", {"for_training": False}),
        ("export", c, "user", {"interactions": 2, "events": 1, "consent_records": 1}),
        ("auth_failure", c, "anonymous", {"status": 401, "reason": "missing_token", "operation": "export_user"}),
        ("auth_failure", c, "anonymous", {"status": 401, "reason": "invalid_token", "operation": "record_consent"}),
        ("auth_failure", c, "user", {"status": 403, "reason": "other_users_token", "operation": "erase_user"}),
        ("auth_failure", o, "anonymous", {"status": 401, "reason": "invalid_token", "operation": "record_event"}),
        ("auth_failure", c, "anonymous", {"status": 401, "reason": "missing_token", "operation": "recommend"}),
        ("erasure", c, "admin", {"deleted": {"users": 1, "interactions": 2, "events": 1, "consent_ledger": 1, "blocked_items": 2, "privacy_spend": 0,
                                             "exposures": 0, "outcomes": 0}, "popularity_adjusted_items": 2}),
        ("model_swap", None, "replica:trustrec#Model#r1", {"old": "7", "new": "8", "uri": "models:/trustrec@challenger"}),
    ]
    entries = server.audit.entries()  # the store table: the same one the UsersService writes
    assert [(e["action"], e["subject"], e["actor"], e["detail"]) for e in entries] == expected
    lines = AuditLog(None, table=False, path=path).entries()
    assert [(e["action"], e["subject"], e["actor"], e["detail"]) for e in lines] == expected  # the file agrees

    # no raw id, no token, not even the id's base64 inside a user token, in any sink or log line
    needles = {CANARY, OTHER, ADMIN, SECRET, mine, others, forged, *mine.split("."), *others.split("."), *forged.split(".")}
    con = sqlite3.connect(tmp_path / "features.db")
    table_text = "\n".join(repr(row) for row in con.execute("SELECT * FROM audit_log"))
    con.close()
    file_bytes = path.read_bytes()
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("features", "serving"))  # not the test client's own lines
    assert "erased user" in ours
    assert table_text.count("\n") == len(expected) - 1
    for needle in needles:
        assert needle not in table_text, needle
        assert needle.encode() not in file_bytes, needle
        assert needle not in ours, needle
    assert file_bytes.count(b"\n") == len(expected)  # one line per entry
