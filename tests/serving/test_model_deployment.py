"""The model deployment's own logic without Ray: batching over recommend_many, the in-place model
swap, and check_health really probing the ONNX session and the feature store."""
import asyncio
import sqlite3
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from serving.app import ModelServer, recommend_batch
from serving.recommender import Recommender

Model = ModelServer  # the model half of the deployment, a plain class


def make_server(trained_run, **args) -> object:
    server = Model({"tracking_uri": trained_run.tracking_uri, "store_url": trained_run.store_url, **args})
    asyncio.run(server.reconfigure({"model_uri": str(trained_run.result.artifact_dir)}))
    return server


@pytest.fixture
def server(trained_run):
    s = make_server(trained_run)
    yield s
    s.store.close()


def test_a_batch_is_one_call_per_parameter_group_in_request_order(server):
    rec = server.recommender
    calls = []
    real = rec.recommend_many

    def counting(user_ids, *a, **kw):  # the real method, counted
        calls.append((len(user_ids), *a))
        return real(user_ids, *a, **kw)

    rec.recommend_many = counting
    users = [f"u{i}" for i in range(1, 11)] + ["never-seen", "also-unknown"]
    requests = [{"user_id": u, "k": 5 if i % 2 else 7, "exclude_seen": True, "diversity": 0.5 if i == 0 else None} for i, u in enumerate(users)]
    results = recommend_batch(rec, requests)
    # three groups: (k 7, diversity 0.5) = request 0; (7, None) = the 5 other even ones; (5, None) = the 6 odd ones
    assert sorted(calls, key=str) == sorted([(1, 7, True, 0.5), (5, 7, True, None), (6, 5, True, None)], key=str)
    for r, got in zip(requests, results):
        want = real([r["user_id"]], r["k"], True, r["diversity"])[0]
        assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in want["items"]]
        assert got["personalized"] == want["personalized"] and got["model_version"] == "local"
    assert [r["personalized"] for r in results[-2:]] == [False, False]


def test_batch_settings_come_from_the_args(trained_run):
    s = make_server(trained_run, max_batch_size=3, batch_wait_timeout_s=0.0)
    try:
        assert (s.batcher.max_batch_size, s.batcher.wait_s, s.batcher.inline) == (3, 0.0, True)  # SQLite: batches run in the loop
    finally:
        s.store.close()


def test_health_reports_version_and_provider(server):
    assert server.health() == {"status": "ok", "model_version": "local", "provider": "CPUExecutionProvider", "n_items": len(server.recommender.items)}
    server.check_health()


def test_check_health_fails_when_the_store_is_unusable(trained_run, tmp_path):
    db = tmp_path / "features.db"
    with sqlite3.connect(trained_run.store_url.removeprefix("sqlite:///")) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    s = Model({"store_url": f"sqlite:///{db}"})
    asyncio.run(s.reconfigure({"model_uri": str(trained_run.result.artifact_dir)}))
    s.check_health()
    with sqlite3.connect(db) as conn:  # someone drops the table the model reads histories from
        conn.execute("DROP TABLE users")
    with pytest.raises(Exception, match="users"):
        s.check_health()
    s.store.close()


def test_check_health_fails_when_the_onnx_session_is_unusable(server, tmp_path):
    # a real ORT session whose graph does not take the user tower's inputs
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "other",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    server.recommender.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception):
        server.check_health()


def test_no_model_loaded_is_unhealthy():
    s = Model({"store_url": None})
    with pytest.raises(RuntimeError, match="no model loaded"):
        s.check_health()


def test_reconfigure_swaps_in_place_and_keeps_the_old_model_on_a_bad_uri(trained_run, server, tmp_path):
    old = server.recommender
    # a replica that serves a model does not raise on a bad one: Serve would kill it and start
    # replacements that fail the same way (the full outage of issue 13); it keeps the old model and says so
    asyncio.run(server.reconfigure({"model_uri": str(tmp_path / "nowhere")}))
    assert server.recommender is old  # a failed load never replaces a working model
    assert "nowhere" in server.health()["swap_error"] and server.health()["model_version"] == old.model_version
    refused = server.audit.entries(action="model_swap_refused") if server.audit else []
    assert refused and refused[-1]["detail"]["serving"] == old.model_version and "nowhere" in refused[-1]["detail"]["uri"]
    with pytest.raises(FileNotFoundError):  # a replica with no model yet must fail to start
        asyncio.run(Model({"store_url": None}).reconfigure({"model_uri": str(tmp_path / "nowhere")}))
    asyncio.run(server.reconfigure({"model_uri": "models:/trustrec@champion"}))
    assert server.recommender is not old and server.recommender.model_version == trained_run.result.model_version
    assert server.health()["model_version"] == trained_run.result.model_version and "swap_error" not in server.health()
    with pytest.raises(ValueError, match="model_url"):
        asyncio.run(server.reconfigure({"model_url": "typo"}))


def test_graceful_shutdown_closes_the_store(trained_run):
    s = make_server(trained_run)
    disposed = []
    s.store.engine.dispose = lambda *a, **kw: disposed.append(True)
    s.__del__()
    assert disposed == [True]


def test_pinned_version_uri_resolves(trained_run):
    from bundle.locate import resolve_model_uri

    bundle, version = resolve_model_uri(f"models:/trustrec/{trained_run.result.model_version}", trained_run.tracking_uri)
    assert version == trained_run.result.model_version and (bundle / "manifest.json").exists()
    with pytest.raises(ValueError, match="models:/name/version"):
        resolve_model_uri("models:/trustrec", trained_run.tracking_uri)
    assert np.load(bundle / "item_embeddings.npy").shape[0] == len(Recommender.from_dir(bundle).items)


def test_a_registry_model_loads_into_memory_and_leaves_no_download_behind(trained_run):
    """Every load of a `models:/` URI (a replica's start or swap, the preflight, `trustrec recommend`,
    `trustrec evaluate`) downloaded the bundle into a fresh temporary directory and left it there."""
    import tempfile

    from bundle.locate import DOWNLOAD_PREFIX, fetched_model

    def downloads() -> set:
        return set(Path(tempfile.gettempdir()).glob(DOWNLOAD_PREFIX + "*"))

    before = downloads()
    rec = Recommender.from_uri("models:/trustrec@champion", None, trained_run.tracking_uri)
    assert downloads() == before
    out = rec.recommend("u1", k=5)  # nothing of it is read from disk any more
    assert len(out["items"]) == 5 and out["model_version"] == trained_run.result.model_version
    with fetched_model("models:/trustrec@champion", trained_run.tracking_uri) as (bundle, _):
        assert (bundle / "manifest.json").exists() and len(downloads()) == len(before) + 1
    assert downloads() == before and not bundle.exists()
