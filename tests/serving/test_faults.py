"""Kill a model replica under load (real Ray Serve, 2 model replicas of 0.5 CPU): Serve replaces it,
the app keeps answering, and failed requests stay bounded. The procedure is benchmarks/serve_faults.py's
own (loaded by path); figures against the goals (<= 1 % failed, recovery <= 10 s) come from that script,
so nothing here asserts a duration."""

import pytest
import requests
import yaml

from tests.serving.test_ray_serve_http import free_port, serve_yaml
from tests.conftest import load_script

pytestmark = pytest.mark.ray


def load_faults_script():
    return load_script("benchmarks/serve_faults.py")


@pytest.fixture(scope="module")
def faults():
    return load_faults_script()


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    from serving.launch import start, stop

    config = serve_yaml(trained_run, tmp_path_factory.mktemp("faults") / "serve.yaml", free_port())
    raw = yaml.safe_load(config.read_text())
    model = next(d for d in raw["applications"][0]["deployments"] if d["name"] == "Model")
    assert model["num_replicas"] == 2 and model["ray_actor_options"]["num_cpus"] == 0.5  # what the fault test names
    url = start(config, num_cpus=2)
    yield url
    stop()


def test_killed_model_replica_is_replaced_and_requests_keep_succeeding(server, faults):
    before = faults.model_replicas()
    assert len(before) == 2
    users = [f"u{i}" for i in range(1, 60)] + ["never-seen"]
    load = faults.OpenLoop(server, rate=40, users=users).start()
    try:
        while len(load.outcomes) < 40:  # load is flowing before the kill
            load.join(0.1)
        event = faults.inject()
        after = faults.model_replicas()
        n = len(load.outcomes)
        while len(load.outcomes) < n + 40:  # and keeps flowing on the replacement
            load.join(0.1)
    finally:
        load.stop()

    killed = next(name for name in before if name.endswith(event["killed"]))
    assert killed not in after and len(after) == 2 and set(after) - set(before)  # a new replica took its place
    faults.wait_healthy(2)  # (on a loaded machine a late health check may replace a replica once more)
    event.update(faults.window(load, event))
    assert event["requests_in_window"] > 0 and event["failed_in_window"] <= 0.05 * event["requests_in_window"], event
    outcomes = list(load.outcomes)
    failed = [o for o in outcomes if not o.ok]
    assert len(failed) <= 0.05 * len(outcomes), [o.detail for o in failed][:5]  # goal 1 %: measured by the benchmark
    assert all(o.ok for o in outcomes[-20:])  # the tail, after recovery, is clean
    assert requests.get(f"{server}/healthz", timeout=10).json()["status"] == "ok"


def test_run_reports_every_kill(server, faults):
    result = faults.run(server, [f"u{i}" for i in range(1, 30)], rate=20, kills=1, interval=0, warmup=1)
    assert result["requests"] > 0 and len(result["kills"]) == 1
    assert result["failed_pct"] == round(100 * result["failed"] / result["requests"], 3) <= 5 and result["max_recovery_s"] == result["kills"][0]["recovery_s"] > 0
    faults.wait_healthy(2)
