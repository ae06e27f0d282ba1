"""Bad input is a 4xx, always; the OpenAPI schema says what is enforced; /docs works offline.

The real FastAPI app of serving/app.py (`api`, with the routes of the `Model` deployment) over
Starlette's TestClient, without Ray: the route's `self` is a real `Model` instance (no model
loaded: validation answers before any handler runs, and /v1/recommend's batch is stubbed where a
200 is checked). The same over real Ray Serve HTTP is in test_fuzz.py."""
import asyncio
import json
import re
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from ray import serve

from serving.app import Model, api
from serving.auth import user_token
from serving.config import AppArgs, AuthArgs
from serving.http import MAX_ECHO_CHARS, MAX_ERRORS, SETTINGS, sanitized_errors

ADMIN, SECRET = "admin-token-input-tests", "secret-input-tests"
ORIGINAL_MODEL = Model.func_or_class.__mro__[1]  # the class under Serve's ASGI wrapper: plain __init__, the routes' `self`


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (what a strict client or another language's parser does)."""
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def make_client(tmp_path, monkeypatch):
    """make_client(**args) -> TestClient over `api` with a Model built from those AppArgs."""
    monkeypatch.setenv("TRUSTREC_ADMIN_TOKEN", ADMIN)
    monkeypatch.setenv("TRUSTREC_TOKEN_SECRET", SECRET)
    saved = SETTINGS.max_body_bytes, SETTINGS.protect_recommend
    models, clients = [], []

    def make(**args):
        model = ORIGINAL_MODEL({"store_url": f"sqlite:///{tmp_path / 'features.db'}", **args})
        calls = []

        async def batched_recommend(request: dict) -> dict:  # no model loaded: a canned answer, the request kept
            calls.append(request)
            return {"items": [], "personalized": False, "model_version": "test", "provider": "CPUExecutionProvider"}

        model.batched_recommend = batched_recommend
        model.recommend_calls = calls
        models.append(model)
        # what Serve's class-based view resolves the routes' `self` through
        monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=model))
        client = TestClient(api, raise_server_exceptions=False)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()
    for m in models:
        if m.store is not None:
            m.store.close()
    SETTINGS.max_body_bytes, SETTINGS.protect_recommend = saved


@pytest.fixture
def client(make_client):
    return make_client()


def post_raw(client, path: str, text: str, method: str = "POST", headers: dict | None = None):
    return client.request(method, path, content=text.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json", **(headers or {})})


def locs(response) -> list[list]:
    return [e["loc"] for e in strict_json(response.text)["detail"]]


# ---- 1. non-finite numbers, invalid Unicode, out-of-range integers: 422 naming the field ---------
NON_FINITE = [
    ("/v1/recommend", '{"user_id": "u1", "diversity": NaN}', ["body", "diversity"]),
    ("/v1/recommend", '{"user_id": "u1", "diversity": Infinity}', ["body", "diversity"]),
    ("/v1/recommend", '{"user_id": "u1", "diversity": -Infinity}', ["body", "diversity"]),
    ("/v1/recommend", '{"user_id": NaN}', ["body", "user_id"]),  # a number is an id, a NaN is not ("nan")
    ("/v1/recommend", '{"user_id": 1e400}', ["body", "user_id"]),  # JSON overflow: Python parses it as inf
    ("/v1/recommend", '{"user_id": "u1", "k": Infinity}', ["body", "k"]),
    ("/v1/recommend", '{"user_id": "u1", "exclude_seen": NaN}', ["body", "exclude_seen"]),
    ("/v1/recommend", '{"user_id": "u1", "surprise": NaN}', ["body", "surprise"]),  # an unknown field
    ("/v1/events", '{"user_id": "u1", "item_id": "i1", "rating": NaN}', ["body", "rating"]),
    ("/v1/events", '{"user_id": "u1", "item_id": "i1", "rating": -Infinity}', ["body", "rating"]),
    ("/v1/events", '{"user_id": "u1", "item_id": "i1", "timestamp": NaN}', ["body", "timestamp"]),
    ("/v1/users/u1/preferences", '{"liked_genres": ["Drama", NaN]}', ["body", "liked_genres", 1]),
    ("/v1/users/u1/consent", '{"training": Infinity}', ["body", "training"]),
]


@pytest.mark.parametrize("path, body, loc", NON_FINITE)
def test_non_finite_numbers_are_a_422_naming_the_field(client, path, body, loc):
    method = "PUT" if path.startswith("/v1/users/") else "POST"
    r = post_raw(client, path, body, method)
    assert r.status_code == 422, r.text
    assert loc in locs(r)  # and the answer is strict JSON (no NaN in it)


SURROGATES = [
    ("POST", "/v1/recommend", '{"user_id": "\\ud800"}', ["body", "user_id"]),
    ("POST", "/v1/recommend", '{"user_id": "ok\\udfff"}', ["body", "user_id"]),
    ("POST", "/v1/events", '{"user_id": "u1", "item_id": "\\ud83d"}', ["body", "item_id"]),
    ("PUT", "/v1/users/u1/preferences", '{"blocked_items": ["i1", "\\ud800x"]}', ["body", "blocked_items", 1]),
    ("PUT", "/v1/users/u1/consent", '{"training": true, "source": "\\udc80"}', ["body", "source"]),
    # a key pydantic cannot decode cannot be named as a field: the body is, with the key escaped as its input
    ("POST", "/v1/recommend", '{"user_id": "u1", "\\ud800": 1}', ["body"]),
]


@pytest.mark.parametrize("method, path, body, loc", SURROGATES)
def test_lone_surrogates_are_a_422_naming_the_field(client, method, path, body, loc):
    r = post_raw(client, path, body, method)
    assert r.status_code == 422, r.text
    r.content.decode("utf-8")  # valid UTF-8 (a lone surrogate cannot be encoded, it is escaped)
    assert loc in locs(r)
    assert any("\\u" in str(e.get("input")) for e in strict_json(r.text)["detail"]), r.text  # echoed as the text \udXXX


@pytest.mark.parametrize("body, loc", [
    ('{"user_id": "u1", "item_id": "i1", "timestamp": 9223372036854775808}', "timestamp"),  # 2**63: SQLite overflowed, a 500
    ('{"user_id": "u1", "item_id": "i1", "timestamp": -9223372036854775809}', "timestamp"),
    ('{"user_id": "u1", "item_id": "i1", "timestamp": 4102444801}', "timestamp"),  # 2100-01-01T00:00:01Z
    ('{"user_id": "u1", "item_id": "i1", "timestamp": 1700000000000}', "timestamp"),  # milliseconds, not seconds
    ('{"user_id": "u1", "item_id": "i1", "timestamp": -1}', "timestamp"),
    ('{"user_id": 18446744073709551616, "item_id": "i1"}', "user_id"),  # a numeric id past 64 bits
])
def test_integers_out_of_range_are_a_422_naming_the_field(client, body, loc):
    r = post_raw(client, "/v1/events", body)
    assert r.status_code == 422, r.text
    assert ["body", loc] in locs(r)


def test_a_valid_event_passes_validation(client):
    """The same bodies in range get past validation (no token here: 401, from the handler)."""
    for ts in (0, 1700000000, 4102444800):
        r = client.post("/v1/events", json={"user_id": 196, "item_id": "i1", "rating": 4, "timestamp": ts})
        assert r.status_code == 401, r.text


# ---- 2. strict types -----------------------------------------------------------------------------
@pytest.mark.parametrize("method, path, body, loc", [
    ("POST", "/v1/recommend", {"user_id": "u1", "k": "5"}, "k"),
    ("POST", "/v1/recommend", {"user_id": "u1", "k": True}, "k"),
    ("POST", "/v1/recommend", {"user_id": "u1", "k": 5.0}, "k"),
    ("POST", "/v1/recommend", {"user_id": "u1", "exclude_seen": 1}, "exclude_seen"),
    ("POST", "/v1/recommend", {"user_id": "u1", "explain": 0}, "explain"),
    ("POST", "/v1/recommend", {"user_id": "u1", "explain": "true"}, "explain"),
    ("POST", "/v1/recommend", {"user_id": "u1", "diversity": "0.5"}, "diversity"),
    ("POST", "/v1/recommend", {"user_id": "u1", "diversity": True}, "diversity"),
    ("POST", "/v1/recommend", {"user_id": True}, "user_id"),
    ("PUT", "/v1/users/u1/consent", {"personalization": 1}, "personalization"),
    ("PUT", "/v1/users/u1/consent", {"training": "false"}, "training"),
    ("POST", "/v1/events", {"user_id": "u1", "item_id": "i1", "rating": "4"}, "rating"),
    ("POST", "/v1/events", {"user_id": "u1", "item_id": "i1", "timestamp": "1700000000"}, "timestamp"),
    ("POST", "/v1/events", {"user_id": "u1", "item_id": "i1", "timestamp": 1700000000.5}, "timestamp"),
])
def test_types_are_strict(client, method, path, body, loc):
    r = client.request(method, path, json=body)
    assert r.status_code == 422, r.text
    assert ["body", loc] in locs(r)


def test_numbers_are_still_accepted_as_ids(client):
    r = client.post("/v1/recommend", json={"user_id": 196, "k": 5, "exclude_seen": False, "diversity": 1})
    assert r.status_code == 200, r.text
    request = serve.get_replica_context().servable_object.recommend_calls[-1]
    assert (request["user_id"], request["k"], request["exclude_seen"], request["diversity"]) == ("196", 5, False, 1.0)


# ---- 3. body size: 413 before parsing ------------------------------------------------------------
def test_a_body_over_the_limit_is_a_413_before_parsing(client):
    big = b'{"user_id": "' + b"x" * 5_000_000  # 5 MB, and not even JSON: parsing it would be a 422
    r = client.post("/v1/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert len(r.content) < 200
    # streamed without a Content-Length (chunked): counted as it arrives
    r = client.post("/v1/recommend", content=(b"x" * 10_000 for _ in range(10)), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    # a large valid body under the limit is no 413
    body = {"user_id": "u1", "k": 5, "exclude_seen": True}
    assert client.post("/v1/recommend", content=json.dumps(body).ljust(60_000).encode(), headers={"content-type": "application/json"}).status_code == 200


def test_the_limit_comes_from_the_app_args(make_client):
    client = make_client(max_body_bytes=2048)  # reaches the replica's app through Model.__init__
    assert SETTINGS.max_body_bytes == 2048
    padded = json.dumps({"user_id": "u1"}).ljust(3000).encode()
    assert client.post("/v1/recommend", content=padded, headers={"content-type": "application/json"}).status_code == 413
    assert client.post("/v1/recommend", content=padded[:2000], headers={"content-type": "application/json"}).status_code == 200
    with pytest.raises(ValueError):
        AppArgs(max_body_bytes=0)


def test_a_chunked_body_is_cut_off_at_the_limit(client):
    """Straight over ASGI: 100 chunks of 1 KB against an 8 KB limit. The app stops reading right
    after the limit (it never gets the rest) and answers 413."""
    SETTINGS.max_body_bytes = 8192
    chunks = [b"x" * 1024] * 100
    sent, got = [], []

    async def receive():
        i = len(sent)
        sent.append(i)
        return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}

    async def send(message):
        got.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/recommend", "raw_path": b"/v1/recommend", "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked"), (b"host", b"test")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }
    asyncio.run(api(scope, receive, send))
    assert got[0]["type"] == "http.response.start" and got[0]["status"] == 413
    assert len(sent) <= 9  # 8 KB + the chunk that crossed the limit


# ---- 4. the 422 is bounded and JSON-safe ---------------------------------------------------------
def test_a_422_echoes_a_bounded_prefix_of_the_input(client):
    r = client.post("/v1/recommend", json={"user_id": "x" * 60_000})
    assert r.status_code == 422
    (error,) = strict_json(r.text)["detail"]
    assert error["loc"] == ["body", "user_id"] and error["type"] == "string_too_long"
    assert len(error["input"]) <= MAX_ECHO_CHARS + 1 and error["input"].startswith("xxx")
    assert len(r.content) < 1000
    # a thousand bad entries: at most MAX_ERRORS listed, then one saying how many more
    r = client.put("/v1/users/u1/preferences", json={"blocked_items": [{"a": "y" * 50}] * 1000})
    detail = strict_json(r.text)["detail"]
    assert r.status_code == 422 and len(detail) == MAX_ERRORS + 1 and detail[-1]["type"] == "too_many_errors"
    assert len(r.content) < 10_000


def test_sanitized_errors_are_always_json():
    class Weird:
        def __str__(self):
            return "weird\ud800" * 100

    errors = sanitized_errors([
        {"type": "value_error", "loc": ("body", "a\ud800", 3), "msg": "bad \udfff", "input": [float("nan"), float("-inf"), {"k\ud800": 10**400}],
         "ctx": {"error": ValueError("boom"), "limit": float("inf"), "obj": Weird()}},
        {"type": "x", "loc": ["body"], "msg": "m", "input": 10**300},
        {"type": "x", "loc": ["body"], "msg": "m", "input": [[[[[[[[["deep"]]]]]]]]] * 100},
    ])
    text = json.dumps(errors, allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")
    assert errors[0]["loc"] == ["body", "a\\ud800", 3]
    assert errors[0]["ctx"]["error"] == "boom" and errors[0]["ctx"]["limit"] == "Infinity"
    assert all(isinstance(e["input"], str) and len(e["input"]) <= MAX_ECHO_CHARS + 1 for e in errors)  # long: a prefix of its JSON
    assert errors[1]["input"].startswith("1000")


# ---- 5. content type: 415 ------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json; charset=latin-1", "application/jsonx"])
def test_a_body_that_is_not_json_is_a_415(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    for method, path in (("POST", "/v1/recommend"), ("PUT", "/v1/users/u1/consent"), ("POST", "/v1/events")):
        r = client.request(method, path, content=b'{"user_id": "u1"}', headers=headers)
        assert r.status_code == 415, (method, path, content_type, r.status_code)


@pytest.mark.parametrize("content_type", ["application/json", "Application/JSON", "application/json; charset=utf-8", 'application/json; charset="UTF-8"', "application/merge-patch+json"])
def test_json_media_types_are_accepted(client, content_type):
    r = client.post("/v1/recommend", content=b'{"user_id": "u1"}', headers={"content-type": content_type})
    assert r.status_code == 200, r.text


def test_no_body_is_no_415(client):
    assert client.put("/v1/users/u1/preferences").status_code == 422  # missing body: named by the 422
    assert client.get("/healthz").status_code in (200, 503)


# ---- 6. the OpenAPI schema says what is enforced -------------------------------------------------
USER_ROUTES = [("/v1/users/{user_id}/consent", "put"), ("/v1/users/{user_id}/preferences", "put"), ("/v1/events", "post"),
               ("/v1/users/{user_id}/data", "get"), ("/v1/users/{user_id}", "delete")]


def test_openapi_security_matches_what_is_enforced(make_client):
    client = make_client()  # open by default
    paths = client.get("/openapi.json").json()["paths"]
    assert paths["/v1/recommend"]["post"]["security"] == [{}, {"HTTPBearer": []}]  # optional
    assert client.post("/v1/recommend", json={"user_id": "u1"}).status_code == 200  # and really open
    for path, method in USER_ROUTES:
        assert paths[path][method]["security"] == [{"HTTPBearer": []}], path
    for path in ("/healthz", "/v1/model"):
        assert "security" not in paths[path]["get"], path
    for path, method in [("/v1/recommend", "post"), *USER_ROUTES[:3]]:  # the body routes
        assert {"413", "415", "422"} <= set(paths[path][method]["responses"]), path

    client = make_client(auth=AuthArgs(protect_recommend=True).model_dump())  # the replica's args decide
    paths = client.get("/openapi.json").json()["paths"]
    recommend = paths["/v1/recommend"]["post"]
    assert recommend["security"] == [{"HTTPBearer": []}]
    assert {"401", "403"} <= set(recommend["responses"])
    assert client.post("/v1/recommend", json={"user_id": "u1"}).status_code == 401  # and really closed
    token = {"Authorization": f"Bearer {user_token(SECRET, 'u1')}"}
    assert client.post("/v1/recommend", json={"user_id": "u1"}, headers=token).status_code == 200


# ---- 7. /docs works offline ----------------------------------------------------------------------
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_another_host(client, page):
    r = client.get(page)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    html = r.text
    assert "://" not in html and not re.search(r"""(src|href)=["']//""", html), html  # no absolute URL at all
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assets = [u for u in urls if u.endswith((".js", ".css"))]
    assert assets, html
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url
        if url.endswith(".js"):
            assert "javascript" in asset.headers["content-type"]
        if url.endswith(".css"):
            assert "text/css" in asset.headers["content-type"]
    assert "/openapi.json" in html


def test_swagger_ui_asks_no_validator_service(client):
    assert '"validatorUrl": null' in client.get("/docs").text
