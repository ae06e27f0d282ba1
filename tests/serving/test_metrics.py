"""trustrec's Prometheus metrics next to Ray Serve's built-ins, scraped from Ray's metrics export port
(`ray.init(_metrics_export_port=N)` -> http://127.0.0.1:N/metrics), after real requests."""
import re
import time

import pytest
import requests

from tests.serving.test_ray_serve_http import free_port, recommend, serve_yaml

pytestmark = pytest.mark.ray


def total(pattern: str, text: str) -> float:
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def scrape_until(url: str, patterns: dict[str, str], done=lambda text: True, timeout_s: float = 120.0) -> str:
    """Poll /metrics until every pattern matches and `done(text)` (Ray flushes metrics every few
    seconds, so a scrape may hold part of the requests); returns the text."""
    deadline, text = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            text = requests.get(url, timeout=5).text
        except requests.RequestException:
            text = ""
        if all(re.search(p, text, re.M) for p in patterns.values()) and done(text):
            return text
        time.sleep(1.0)
    missing = [name for name, p in patterns.items() if not re.search(p, text, re.M)]
    pytest.fail(f"metrics never appeared on {url}: {missing}")


@pytest.fixture(scope="module")
def served(trained_run, tmp_path_factory):
    from serving.launch import start, stop

    metrics_port = free_port()
    config = serve_yaml(trained_run, tmp_path_factory.mktemp("metrics") / "serve.yaml", free_port())
    url = start(config, num_cpus=2, metrics_port=metrics_port)
    yield url, f"http://127.0.0.1:{metrics_port}/metrics"
    stop()


def test_latency_fallbacks_provider_and_serve_builtins_are_exported(served):
    url, metrics_url = served
    unknown = [f"never-seen-{i}" for i in range(3)]
    for user in ["u1", "u2", "u3", *unknown]:
        assert recommend(url, user_id=user, k=5).status_code == 200
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200

    fallbacks = r'^ray_trustrec_fallbacks(?:_total)?\{.*kind="popularity".*\} (\S+)$'
    latency_count = r'^ray_trustrec_request_latency_ms_count\{.*route="/v1/recommend".*status="ok".*\} (\S+)$'
    text = scrape_until(
        metrics_url,
        {
            "latency histogram": r'^ray_trustrec_request_latency_ms_bucket\{.*route="/v1/recommend".*\} ',
            "popularity fallbacks": fallbacks,
            "provider gauge": r'^ray_trustrec_onnx_provider\{.*provider="CPUExecutionProvider".*\} 1(\.0)?$',
            "batch size": r"^ray_trustrec_batch_size_bucket\{",
            "serve built-in": r"^ray_serve_num_http_requests(_total)?\{",
        },
        # every unknown user was a popularity fallback; every request went through the histogram
        done=lambda t: total(fallbacks, t) >= len(unknown) and total(latency_count, t) >= 3 + len(unknown),
    )
    assert total(fallbacks, text) == len(unknown)  # known users are never counted as fallbacks
    # no provider fallback on a CPU-only build (CPU was asked for, CPU was given)
    assert not re.search(r'^ray_trustrec_fallbacks(_total)?\{.*kind="provider".*\} [1-9]', text, re.M)


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket LISTENing on `port` (from /proc/net/tcp{,6}, hex as the kernel writes them)."""
    found = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


def test_the_metrics_port_listens_on_loopback_only(served):
    _, metrics_url = served
    port = int(metrics_url.rsplit(":", 1)[1].split("/")[0])
    assert requests.get(metrics_url, timeout=10).status_code == 200
    # 0100007F is 127.0.0.1 (little-endian hex); 00000000 would be every interface
    assert listening_addresses(port) == {"0100007F"}
