"""A real Ray Serve instance over HTTP on 127.0.0.1, compared with the in-process Recommender."""
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from features.store import FeatureStore
from serving.recommender import Recommender

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    from serving.ingress import free_port as pick  # below the ephemeral range: Ray's own sockets cannot take it first

    return pick()


def serve_yaml(trained_run, path: Path, port: int) -> Path:
    """configs/serve.yaml with the fixture run's registry and store."""
    cfg = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["args"].update(tracking_uri=trained_run.tracking_uri, store_url=trained_run.store_url)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    from serving.launch import start, stop

    config = serve_yaml(trained_run, tmp_path_factory.mktemp("serve") / "serve.yaml", free_port())
    url = start(config, num_cpus=2)
    yield url
    stop()


@pytest.fixture(scope="module")
def local(trained_run):
    store = FeatureStore(trained_run.store_url)
    yield Recommender.from_uri("models:/trustrec@champion", store=store, tracking_uri=trained_run.tracking_uri)
    store.close()


def assert_same_ranking(got: list[dict], want: list[dict], atol: float = 1e-5) -> None:
    """Same scores rank by rank; ids may differ only between items whose scores tie within atol
    (the ONNX tower's last bits depend on thread count and batch shape)."""
    assert len(got) == len(want)
    np.testing.assert_allclose([i["score"] for i in got], [i["score"] for i in want], atol=atol)
    for a, b in zip(got, want):
        if a["item_id"] != b["item_id"]:
            tied = {i["item_id"] for i in want if abs(i["score"] - a["score"]) <= atol}
            assert a["item_id"] in tied, (got, want)
    assert {i["item_id"] for i in got} - {i["item_id"] for i in want} <= {i["item_id"] for i in got if abs(i["score"] - got[-1]["score"]) <= atol}


def recommend(url, **body):
    return requests.post(f"{url}/v1/recommend", json=body, timeout=30)


def test_http_top_k_equals_in_process(server, local):
    for user in ["u1", "u2", "u10", "u500", "never-seen"]:
        r = recommend(server, user_id=user, k=10)
        assert r.status_code == 200, r.text
        body, expected = r.json(), local.recommend(user, k=10)
        assert_same_ranking(body["items"], expected["items"])
        assert body["personalized"] == expected["personalized"]
        assert body["model_version"] == local.model_version and body["provider"] == "CPUExecutionProvider"
    assert recommend(server, user_id="never-seen", k=3).json()["personalized"] is False


def test_numeric_user_id_is_accepted(server):
    assert recommend(server, user_id=12345, k=2).status_code == 200


def test_diversity_request_parameter(server, local):
    r = recommend(server, user_id="u1", k=10, diversity=0.3)
    assert r.status_code == 200
    expected = local.recommend("u1", k=10, diversity=0.3)
    assert_same_ranking(r.json()["items"], expected["items"])


@pytest.mark.parametrize(
    "body, field",
    [
        ({"user_id": "u1", "k": 0}, "k"),
        ({"user_id": "u1", "k": 101}, "k"),
        ({"user_id": "u1", "k": "many"}, "k"),
        ({"k": 5}, "user_id"),
        ({"user_id": "", "k": 5}, "user_id"),
        ({"user_id": "u1", "k": 5, "surprise": True}, "surprise"),
        ({"user_id": "u1", "k": 5, "diversity": 1.5}, "diversity"),
        ({"user_id": "u1", "k": 5, "diversity": -0.1}, "diversity"),
    ],
)
def test_bad_requests_get_422_naming_the_field(server, body, field):
    r = requests.post(f"{server}/v1/recommend", json=body, timeout=30)
    assert r.status_code == 422
    assert any(err["loc"][-1] == field for err in r.json()["detail"]), r.json()


def test_health_and_openapi(server, local):
    health = requests.get(f"{server}/healthz", timeout=10).json()
    assert health == {"status": "ok", "model_version": local.model_version, "provider": "CPUExecutionProvider", "n_items": len(local.items)}
    assert requests.get(f"{server}/docs", timeout=10).status_code == 200
    spec = requests.get(f"{server}/openapi.json", timeout=10).json()
    assert "/v1/recommend" in spec["paths"] and "/healthz" in spec["paths"]
