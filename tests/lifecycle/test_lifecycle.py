"""The product's promises across what users do between requests (issue 13), as a new user runs it:
the real `trustrec` CLI in a fresh directory with default settings (configs as shipped; only the
epoch count is lowered), `trustrec serve` as its own process over HTTP on 127.0.0.1, a real SQLite
store file, a real MLflow sqlite registry, and a real retrain + promote + reload between requests.

The tests run in file order and share one world: customers decide things over HTTP, an operator
retrains (first without the erasure salt, which must be refused), promotes, reloads, pushes a bad
model and restarts the server; after each step every decision must still hold, the erased id must be
nowhere, and anonymous callers must see nothing personal."""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from serving import launch
from serving.auth import user_token
from tests.conftest import REPO
from tests.serving.test_ray_serve_http import free_port

pytestmark = pytest.mark.ray
BIN = Path(sys.executable).parent
ADMIN, SECRET, SALT = "lifecycle-admin-token-0c4e7b", "lifecycle-token-secret-6a1f2d", "lifecycle-erasure-salt-93b8e1"
SECRETS = {"TRUSTREC_ADMIN_TOKEN": ADMIN, "TRUSTREC_TOKEN_SECRET": SECRET, "TRUSTREC_ERASURE_SALT": SALT}
TRAIN = ["train", "--config", str(REPO / "configs" / "two_tower.yaml"), "--set", "trainer.epochs=3", "--set", "trainer.progress=false"]
SERVE_CONFIG = str(REPO / "configs" / "serve.yaml")
ERASED, FORGOTTEN = "u42", "u43"
DRAIN = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"  # tests/conftest.py shortens it; a new user's shell has Ray's default
ERASED_BYTES = re.compile(rb"u42(?![0-9])")  # u42 and not u420..u429


def environment(with_secrets: bool = True) -> dict[str, str]:
    # as a fresh shell: `trustrec serve` makes its own Ray token, `--reload` finds it through the state file
    env = {k: v for k, v in os.environ.items() if k not in SECRETS and k not in ("RAY_ADDRESS", DRAIN) and not k.startswith("RAY_AUTH_")}
    return {**env, **SECRETS} if with_secrets else env


def cli(root: Path, *argv: str, with_secrets: bool = True, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(BIN / "trustrec"), *argv], cwd=root, env=environment(with_secrets), capture_output=True, text=True, timeout=600)
    if ok:
        assert out.returncode == 0, f"trustrec {' '.join(argv)}: {out.stderr[-3000:]}"
    return out


class Server:
    """`trustrec serve` as its own process (what an operator starts), restartable; Ctrl-C reaches it
    as from a terminal (a child of a background job would inherit SIGINT ignored)."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "serve.log"
        self.leftovers: list[Path] = []

    def start(self, drain_s: float | None = None) -> None:
        """`drain_s`: Ray Serve's drain window behind HAProxy for this run (`--drain-seconds`); None: Ray's default (30 s)."""
        tmp = Path(tempfile.gettempdir())
        before, offset = set(tmp.glob("trhap-*")), self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            drain = ["--drain-seconds", str(drain_s)] if drain_s is not None else []
            self.proc = subprocess.Popen([str(BIN / "trustrec"), "serve", "--config", SERVE_CONFIG, "--port", str(self.port), *drain],
                                         cwd=self.root, env=environment(), stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if requests.get(f"{self.url}/healthz", timeout=5).status_code == 200 and b"serving on" in self.log.read_bytes()[offset:]:
                    state = launch.state_file(self.port)
                    # what this server put on disk: its state file, its Ray token's folder, its HAProxy folder
                    self.leftovers = [state, Path(json.loads(state.read_text())["auth_token_path"]).parent, *(set(tmp.glob("trhap-*")) - before)]
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(self.log.read_text()[-3000:])

    def stop(self, signum: int = signal.SIGTERM) -> int | None:
        """Stop as an operator does (SIGTERM from systemd / docker / Kubernetes, SIGINT from Ctrl-C);
        returns the exit code, None where it had to be killed."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(90)  # Ray Serve's drain behind HAProxy is 30 s
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            return None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    started = time.time()
    first = cli(root, *TRAIN)
    server = Server(root)
    server.start()
    state = {"root": root, "server": server, "first_run": re.search(r"run ([0-9a-f]{32})", first.stdout).group(1), "started": started}
    yield state
    server.stop()


def bearer(user: str | None = None, admin: bool = False) -> dict:
    return {"Authorization": f"Bearer {ADMIN if admin else user_token(SECRET, user)}"}


def call(world, method: str, path: str, body=None, headers=None) -> requests.Response:
    return requests.request(method, f"{world['server'].url}{path}", json=body, headers=headers or {}, timeout=60)


def recommend(world, user: str, headers=None, **extra) -> dict:
    r = call(world, "POST", "/v1/recommend", {"user_id": user, **extra}, headers)
    assert r.status_code == 200, r.text
    return r.json()


def genres(world) -> dict[str, set[str]]:
    with sqlite3.connect(world["root"] / "data" / "features.db") as db:
        return {item: set(g.split("|")) - {""} for item, g in db.execute("SELECT item_id, genres FROM items")}


def assert_decisions_hold(world) -> None:
    """Every customer decision of test_1, checked over HTTP."""
    catalog = genres(world)
    items = [it["item_id"] for it in recommend(world, "u50", k=100)["items"]]
    assert len(items) >= 50 and not any(catalog[i] & {"Drama", "Comedy"} for i in items)
    assert call(world, "GET", "/v1/users/u50/data", headers=bearer("u50")).json()["preferences"]["avoided_genres"] == ["Drama", "Comedy"]
    newbie = call(world, "GET", "/v1/users/newbie-1/data", headers=bearer("newbie-1"))
    assert newbie.status_code == 200 and newbie.json()["preferences"]["liked_genres"] == ["Horror"]
    assert recommend(world, "u60")["personalized"] is False  # opted out
    assert world["blocked"] not in [it["item_id"] for it in recommend(world, "u70", k=100)["items"]]
    assert call(world, "GET", f"/v1/users/{ERASED}/data", headers=bearer(admin=True)).status_code == 404
    assert recommend(world, ERASED)["personalized"] is False
    assert call(world, "PUT", f"/v1/users/{ERASED}/consent", {"training": True}, bearer(ERASED)).status_code == 409


def test_1_customers_decide_over_http(world):
    assert recommend(world, "u50", k=100)["personalized"] is True
    assert call(world, "PUT", "/v1/users/u50/preferences", {"liked_genres": ["Horror"], "avoided_genres": ["Drama", "Comedy"]}, bearer("u50")).status_code == 200
    assert call(world, "PUT", "/v1/users/newbie-1/preferences", {"liked_genres": ["Horror"]}, bearer("newbie-1")).status_code == 200
    assert call(world, "PUT", "/v1/users/u60/consent", {"personalization": False}, bearer("u60")).status_code == 200
    world["blocked"] = recommend(world, "u70", k=1)["items"][0]["item_id"]
    assert call(world, "PUT", "/v1/users/u70/preferences", {"blocked_items": [world["blocked"]]}, bearer("u70")).status_code == 200
    assert call(world, "GET", "/v1/users/u50/data").status_code == 401  # no token, no data
    assert call(world, "DELETE", f"/v1/users/{ERASED}").status_code == 401
    assert call(world, "DELETE", f"/v1/users/{ERASED}", headers=bearer(admin=True)).status_code == 200
    assert_decisions_hold(world)


def test_2_a_retrain_without_the_erasure_salt_is_refused(world):
    out = cli(world["root"], *TRAIN, with_secrets=False, ok=False)
    assert out.returncode == 2 and "TRUSTREC_ERASURE_SALT" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert_decisions_hold(world)  # nothing was imported


def test_3_retrain_promote_reload_keeps_every_decision(world):
    root = world["root"]
    second = cli(root, *TRAIN, "--set", "tracking.alias=challenger")  # the README's hot-swap steps
    run_id = re.search(r"run ([0-9a-f]{32})", second.stdout).group(1)
    assert_decisions_hold(world)  # the import at the end of training merged, it did not overwrite
    cli(root, "promote", run_id)
    reloaded = cli(root, "serve", "--reload", "--config", SERVE_CONFIG, "--port", str(world["server"].port))
    assert "models:/trustrec/2" in reloaded.stdout
    assert call(world, "GET", "/healthz").json()["model_version"] == "2"
    assert_decisions_hold(world)
    card = call(world, "GET", "/v1/model").json()
    assert card["model_version"] == "2" and card["erasures_applied"] == 1


def test_4_the_erased_id_is_nowhere(world):
    root = world["root"]
    vocab = json.loads((root / "artifacts" / "two_tower" / "user_vocab.json").read_text())["ids"]
    assert ERASED not in vocab and "u41" in vocab  # the new model never saw them
    for name in ("features.db", "features.db-wal", "features.db-shm"):  # rows, and the raw bytes of the files
        path = root / "data" / name
        if path.exists():
            assert not ERASED_BYTES.search(path.read_bytes()), name
    export = cli(root, "export-user", ERASED, "--config", SERVE_CONFIG, ok=False)
    assert export.returncode == 1 and ERASED not in export.stdout
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    for run in client.search_runs([e.experiment_id for e in client.search_experiments()]):
        assert not any(ERASED_BYTES.search(f"{k}={v}".encode()) for k, v in {**run.data.params, **run.data.tags}.items())
    # every Ray session begun since this world started (the server's, across its restarts; another Ray
    # user on the machine moves session_latest, and scanning its logs too only makes the check stricter)
    sessions = [p for p in Path("/tmp/ray").glob("session_2*") if p.is_dir() and p.stat().st_mtime >= world["started"] - 1]
    logs = [world["server"].log, *(f for s in sessions for f in (s / "logs").rglob("*"))]
    replica_logs = b"".join(p.read_bytes() for s in sessions for p in (s / "logs" / "serve").glob("replica_*.log"))
    assert b"model version None -> 1" in replica_logs and b"model version 1 -> 2" in replica_logs  # our INFO lines are there to scan
    for path in logs:
        if path.is_file():
            data = path.read_bytes()
            assert not ERASED_BYTES.search(data) and SECRET.encode() not in data and ADMIN.encode() not in data, path

    # an operator's erasure names the registered versions that learned from the user: both did
    receipt = json.loads(cli(root, "forget", FORGOTTEN, "--config", SERVE_CONFIG).stdout)
    assert [v["version"] for v in receipt["model_versions_trained_on_user"]] == ["1", "2"]
    assert call(world, "GET", f"/v1/users/{FORGOTTEN}/data", headers=bearer(admin=True)).status_code == 404
    entries = cli(root, "audit-log", "--user", ERASED, "--json", "--config", SERVE_CONFIG).stdout
    assert "erasure" in entries and ERASED_BYTES.search(entries.encode()) is None  # kept, by hash only


def test_5_anonymous_callers_see_nothing_personal(world):
    anonymous = recommend(world, "u7", k=10, explain=True)
    assert anonymous["reasons_withheld"] is True and all("reasons" not in it for it in anonymous["items"])
    owner = recommend(world, "u7", bearer("u7"), k=10, explain=True)
    assert any(r["kind"] == "similar_to_history" for it in owner["items"] for r in it["reasons"])
    for who in ("u60", ERASED, "never-seen"):  # opted out, erased, unknown: no reason text tells them apart
        assert "reasons" not in json.dumps(recommend(world, who, k=5, explain=True)["items"])
    spec = call(world, "GET", "/openapi.json").json()
    assert spec["paths"]["/v1/recommend"]["post"].get("security") in ([{}, {"HTTPBearer": []}], [{"HTTPBearer": []}, {}])
    assert spec["paths"]["/v1/users/{user_id}/data"]["get"]["security"] == [{"HTTPBearer": []}]


class Stream(threading.Thread):
    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.codes = url, threading.Event(), []

    def run(self) -> None:
        session, i = requests.Session(), 0
        while not self.stop.is_set():
            i += 1
            path, body = ("/healthz", None) if i % 5 == 0 else ("/v1/recommend", {"user_id": f"u{i % 40}", "k": 5})
            try:
                r = session.request("GET" if body is None else "POST", self.url + path, json=body, timeout=30)
                self.codes.append(r.status_code)
            except requests.RequestException as e:
                self.codes.append(repr(e))


def test_6_a_bad_reload_costs_no_request(world):
    stream = Stream(world["server"].url)
    stream.start()
    try:
        out = cli(world["root"], "serve", "--reload", "--config", SERVE_CONFIG, "--port", str(world["server"].port), "--model", "/does-not-exist", ok=False)
        n = len(stream.codes)
        while len(stream.codes) < n + 50:
            stream.join(0.1)
    finally:
        stream.stop.set()
        stream.join(60)
    assert out.returncode == 2 and "not swapping" in out.stderr, out.stderr[-2000:]
    assert len(stream.codes) >= 50 and [c for c in stream.codes if c != 200] == []
    assert call(world, "GET", "/healthz").json()["model_version"] == "2"


def assert_stopped_in_order(server: Server, code: int | None, signame: str, drain_s: str = "30") -> None:
    log = server.log.read_text()
    assert code == 0, f"`trustrec serve` did not stop on {signame} (exit {code}): {log[-2000:]}"
    assert f"stopping on {signame} (behind HAProxy, Ray Serve keeps replicas reachable for its drain window, {drain_s} s)" in log, log[-2000:]
    assert log.rstrip().endswith("trustrec serve: stopped"), log[-2000:]
    assert len(server.leftovers) == 3 and [p for p in server.leftovers if p.exists()] == []  # nothing a --reload could find
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/healthz", timeout=5)


def test_7_a_restart_keeps_everything(world):
    server = world["server"]
    assert_stopped_in_order(server, server.stop(signal.SIGINT), "SIGINT")  # at Ray's default drain window (30 s)
    server.start(drain_s=1)  # the stop in test 8 need not wait it out a second time
    assert call(world, "GET", "/healthz").json()["model_version"] == "2"
    assert_decisions_hold(world)


def test_8_sigterm_stops_it_in_order_and_leaves_nothing_behind(world):
    server = world["server"]
    started = time.monotonic()
    assert_stopped_in_order(server, server.stop(signal.SIGTERM), "SIGTERM", drain_s="1")  # started with --drain-seconds 1
    assert time.monotonic() - started < 25, "--drain-seconds 1 did not shorten Ray's 30 s drain window"
    out = cli(world["root"], "serve", "--reload", "--config", SERVE_CONFIG, "--port", str(server.port), ok=False)
    assert out.returncode != 0 and "no running `trustrec serve`" in out.stderr, out.stderr[-2000:]
