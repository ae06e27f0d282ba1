"""End-to-end run (the session fixture `trained_run`): MLflow run name, grouped params, dataset
inputs, metrics/tags/artifacts/registry and the alias tag, quality vs popularity, feature store,
offline re-evaluation of the bundle and checkpoint export."""
from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from features.store import FeatureStore
from training.data import user_feed, user_features
from training.model import TowerSpec, TwoTower
from training.offline import evaluate_bundle, export_checkpoint
from training.pipeline import context, item_counts, prepare, train
from training.evaluation import metric_name
from training.tracking import ALIAS_TAG, interactions_digest, mlflow_key, run_params

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def client(trained_run) -> MlflowClient:
    return MlflowClient(tracking_uri=trained_run.tracking_uri)


@pytest.fixture(scope="module")
def run(trained_run, client):
    return client.get_run(trained_run.result.run_id)


@pytest.fixture(scope="module")
def prepared(trained_run):
    return prepare(trained_run.cfg)


def test_run_is_found_through_the_mlflow_api(trained_run, client, run):
    exp = client.get_experiment_by_name(trained_run.cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert trained_run.result.run_id in [r.info.run_id for r in runs]
    assert run.info.status == "FINISHED"


def test_run_name_says_model_dataset_privacy_and_seed(run):
    assert run.info.run_name == "two_tower-synthetic-nonprivate-s0"


def test_params_are_a_few_grouped_keys_and_the_config_is_an_artifact(trained_run, client, run, tmp_path):
    params = run.data.params
    assert set(params) == set(run_params(trained_run.cfg, "synthetic-seed0"))
    assert len(params) <= 30 and {k.split(".", 1)[0] for k in params} == {"data", "model", "train", "privacy"}
    assert params["train.lr"] == "0.003" and params["train.epochs"] == "30" and params["train.seed"] == "0"
    assert params["model.kind"] == "two_tower" and params["model.features"] == "genres" and params["model.embedding_dim"] == "64"
    assert params["data.source"] == "synthetic" and params["data.dataset"] == "synthetic-seed0"
    assert params["data.split"] == "stratified by item, ratio 0.75" and params["privacy.mode"] == "none"
    # every key of the config, flattened, is one artifact away
    path = client.download_artifacts(run.info.run_id, "config_flat.json", str(tmp_path))
    flat = json.load(open(path))
    assert flat == trained_run.cfg.flat() and flat["data.synthetic.n_users"] == 1000 and flat["tracking.run_name"] is None


def test_training_and_test_data_are_dataset_inputs(trained_run, run, prepared):
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "evaluation"}
    snapshot = trained_run.result.manifest["provenance"]["data"]["snapshot"]
    train, test = inputs["training"], inputs["evaluation"]
    assert train.name == test.name == "synthetic-seed0"
    assert train.digest == interactions_digest(snapshot, prepared.seen_interactions) and len(train.digest) == 10
    assert test.digest == interactions_digest(snapshot, prepared.split.test) != train.digest
    assert train.source_type == "code" and json.loads(train.source)["tags"]["dataset"] == "synthetic-seed0"
    profile = json.loads(train.profile)
    assert profile["rows"] == len(prepared.seen_interactions) and profile["snapshot"] == snapshot and profile["part"] == "training"
    assert json.loads(test.profile)["rows"] == len(prepared.split.test)
    assert [c["name"] for c in json.loads(train.schema)["mlflow_colspec"]] == ["user_id", "item_id", "rating", "timestamp"]
    # a schema and counts, never a row: no raw user id anywhere in what was logged
    logged = json.dumps([d.dataset.to_dictionary() for d in run.inputs.dataset_inputs])
    assert not any(f'"{u}"' in logged for u in prepared.dataset.user_vocab.ids)


def test_no_pii_in_params_or_tags(trained_run, run, prepared):
    ds = prepared.dataset
    personal = set(ds.user_vocab.ids) | set(ds.items.title)  # raw user ids like "u1", item titles
    assert "u1" in personal
    values = list(run.data.params.values()) + list(run.data.tags.values())
    assert not personal & set(values)
    assert not any(v in ("u1", "u2", "u10") for v in values)


def test_step_metrics_per_epoch(trained_run, client, run):
    fit = trained_run.result.fit
    assert len(fit.history) == fit.epochs_run
    for name in ("train/loss", "val/ndcg@10"):
        key = mlflow_key(name)
        assert key == name.replace("@", "_at_")
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, fit.epochs_run + 1))
        assert [m.value for m in history] == pytest.approx([h[name] for h in fit.history])
    # training made progress: the epoch-1 val NDCG is below the best one
    val = [h["val/ndcg@10"] for h in fit.history]
    assert max(val) > val[0] + 0.05


def test_final_metrics_logged(trained_run, run):
    m = run.data.metrics
    metrics = trained_run.result.metrics
    assert "test/ndcg_at_10" in m and "test/ndcg@10" not in m
    # one naming: what the CLI prints (the run's metrics), the manifest (/v1/model) and MLflow hold the same keys
    manifest = trained_run.result.manifest
    assert set(metrics) == set(manifest["metrics"]) | set(manifest["parity"]) and set(metrics) <= set(m)
    assert all(metric_name(k) == k for k in metrics)
    for name in ("test/ndcg@10", "test/recall@10", "baseline/popularity/ndcg@10", "train/best_epoch", "train/epochs_run",
                 "parity/torchrec_vs_onnx"):
        assert m[mlflow_key(name)] == pytest.approx(metrics[name]), name
    assert m["train/epochs_run"] == trained_run.result.fit.epochs_run
    assert metrics["parity/torchrec_vs_onnx"] <= trained_run.cfg.export.parity_atol


def test_tags(run, prepared):
    tags = run.data.tags
    assert tags["model"] == "two_tower"
    assert tags["dataset"] == prepared.dataset.name == "synthetic-seed0"
    assert tags["split"] == "stratified"
    assert tags["git_sha"] and tags["git_sha"] != "unknown"
    assert tags["device"] == "cpu" or torch.cuda.is_available()


def test_artifacts(trained_run, client, run, tmp_path):
    run_id = run.info.run_id
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "config_flat.json", "metrics.json", "history.json", "bundle"} <= top
    bundle = {a.path for a in client.list_artifacts(run_id, "bundle")}
    assert "bundle/manifest.json" in bundle and "bundle/user_tower.onnx" in bundle

    def fetch(path):
        return download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path), tracking_uri=trained_run.tracking_uri)

    assert yaml.safe_load(open(fetch("config.yaml"))) == trained_run.cfg.model_dump(mode="json")
    assert json.load(open(fetch("metrics.json"))) == pytest.approx(trained_run.result.metrics)
    manifest = json.load(open(fetch("bundle/manifest.json")))
    assert manifest["provenance"]["run_id"] == run_id
    assert manifest["provenance"]["git_sha"] == run.data.tags["git_sha"]
    # the logged bundle, the local bundle and the manifest the run returned are one and the same
    assert manifest == json.loads((trained_run.result.artifact_dir / "manifest.json").read_text()) == trained_run.result.manifest


def test_registered_model_alias_points_at_this_run(trained_run, client):
    cfg = trained_run.cfg.tracking
    version = client.get_model_version_by_alias(cfg.registered_model, cfg.alias)
    assert trained_run.result.model_version is not None
    assert str(version.version) == trained_run.result.model_version
    assert version.run_id == trained_run.result.run_id
    assert cfg.alias in client.get_registered_model(cfg.registered_model).aliases
    tags = client.get_run(trained_run.result.run_id).data.tags
    assert tags[ALIAS_TAG] == "champion" and tags["model_version"] == f"trustrec/{version.version}"


def test_model_beats_popularity(trained_run):
    m = trained_run.result.metrics
    # measured for the fixed seeds: test ndcg@10 ~0.249 vs popularity ~0.193 (x1.29)
    assert m["test/ndcg@10"] >= 1.15 * m["baseline/popularity/ndcg@10"], m
    assert m["test/recall@10"] > m["baseline/popularity/recall@10"]
    assert m["test/coverage"] > 3 * m["baseline/popularity/coverage"]  # personalised lists spread over the catalog


def test_a_run_above_popularity_carries_no_quality_warning(run):
    assert "quality.warning" not in run.data.tags


def test_below_popularity_by_hand():
    from training.pipeline import below_popularity

    assert below_popularity({"test/ndcg_at_10": 0.20, "baseline/popularity/ndcg_at_10": 0.19}, 10) is None
    assert below_popularity({"test/ndcg_at_10": 0.19, "baseline/popularity/ndcg_at_10": 0.19}, 10) is None  # a tie is not below
    assert below_popularity({"test/ndcg_at_10": 0.20}, 10) is None  # no baseline: nothing to say
    msg = below_popularity({"test/ndcg_at_10": 0.0002, "baseline/popularity/ndcg_at_10": 0.181}, 10)
    assert msg.startswith("test NDCG@10 0.0002 is below the popularity list's 0.1810") and "DP-SGD" not in msg
    assert "sample rate" in below_popularity({"test/ndcg_at_5": 0.1, "baseline/popularity/ndcg_at_5": 0.2}, 5, dp_sgd=True)


def test_a_run_below_popularity_says_so_in_the_log_in_mlflow_and_under_the_cli_table(tmp_path, caplog, capsys):
    """One epoch at a negligible learning rate leaves the towers at their random start: a real run whose
    lists are worse than the popularity list. The loss would not tell; the run's log, its MLflow tags and
    the last line `trustrec train` prints (under the metrics table, where the user looks) do."""
    import logging

    from cli.main import main
    from tests.conftest import REPO, tiny_overrides

    overrides = tiny_overrides(tmp_path) + ["trainer.epochs=1", "trainer.lr=1e-9", "trainer.refit=false", "tracking.register_model=false"]
    with caplog.at_level(logging.WARNING, logger="training.pipeline"):
        assert main(["train", "--config", str(REPO / "configs" / "two_tower.yaml"), *(a for o in overrides for a in ("--set", o))]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    metrics = {line.split()[0]: float(line.split()[1]) for line in out if line.startswith("  test/") or line.startswith("  baseline/")}
    assert metrics["test/ndcg_at_10"] < metrics["baseline/popularity/ndcg_at_10"], metrics  # the premise
    warned = [r.getMessage() for r in caplog.records if "below the popularity list" in r.getMessage()]
    assert len(warned) == 1 and f"{metrics['test/ndcg_at_10']:.4f}" in warned[0]
    assert out[-1] == f"warning: {warned[0]}"  # said again under the table
    run_id = out[0].split()[1]
    tags = MlflowClient(tracking_uri=overrides[0].split("=", 1)[1]).get_run(run_id).data.tags
    assert tags["quality.warning"] == warned[0]


def test_manifest_popularity_is_the_seen_counts_order(trained_run, prepared):
    popularity = trained_run.result.manifest["popularity"]
    assert len(popularity) == trained_run.cfg.export.popularity_top_n == 100
    counts = item_counts(prepared.seen, prepared.dataset.n_items)
    ranked = counts[prepared.dataset.item_vocab.encode(popularity)]
    assert ranked[0] == counts.max()
    assert np.all(np.diff(ranked) <= 0)


def test_feature_store_was_loaded(trained_run, prepared):
    ds = prepared.dataset
    with FeatureStore(trained_run.store_url) as store:
        history = store.user_history("u1")
        assert history, "user u1 has no history in the store"
        # the store holds train + val (what serving may use as history), never the test split
        indptr, indices = prepared.seen[:2]
        assert set(history) == set(ds.item_vocab.decode(indices[indptr[0] : indptr[1]]))
        assert store.has_user("u1") and not store.has_user("u999999")
        assert len(store.item_metadata(["i1", "i2"])) == 2


@pytest.mark.parametrize("where", ["bundle_dir", "registry"])
def test_offline_evaluation_of_the_bundle_reproduces_test_metrics(trained_run, where):
    uri = str(trained_run.result.artifact_dir) if where == "bundle_dir" else "models:/trustrec@champion"
    offline = evaluate_bundle(trained_run.cfg, uri)
    test = {k: v for k, v in trained_run.result.metrics.items() if k.startswith("test/")}
    assert set(offline) == set(test)
    for k in test:
        assert abs(offline[k] - test[k]) <= 1e-4, (k, offline[k], test[k])


def test_export_checkpoint_rebuilds_the_bundle(trained_run, tmp_path):
    ckpts = sorted((trained_run.root / "checkpoints").glob("epoch-*.pt"))
    fit = trained_run.result.fit
    assert [p.name for p in ckpts] == [f"epoch-{e:03d}.pt" for e in range(1, fit.epochs_run + 1)]
    manifest = export_checkpoint(trained_run.cfg, ckpts[-1], tmp_path / "re")
    assert max(manifest["parity"].values()) <= trained_run.cfg.export.parity_atol
    assert manifest["metrics"]["val/ndcg_at_10"] == pytest.approx(fit.best_metric)
    assert manifest["provenance"]["epoch"] == fit.epochs_run
    # the checkpoint's best weights are the ones the pipeline exported
    original = np.load(trained_run.result.artifact_dir / "item_embeddings.npy")
    np.testing.assert_allclose(np.load(tmp_path / "re" / "item_embeddings.npy"), original, atol=1e-6)


def test_exported_onnx_matches_torchrec_on_trained_weights(trained_run, prepared):
    """The fixture's bundle (no user-id table) against the TorchRec tower with the best weights,
    on batches of 1 and 37 and with empty histories."""
    payload = torch.load(sorted((trained_run.root / "checkpoints").glob("epoch-*.pt"))[-1], weights_only=False)
    model = TwoTower(TowerSpec(**payload["spec"])).eval()
    model.load_state_dict(payload["best_state"])
    session = ort.InferenceSession(str(trained_run.result.artifact_dir / "user_tower.onnx"), providers=["CPUExecutionProvider"])
    ctx = context(trained_run.cfg, prepared.dataset)
    indptr, indices, ratings = prepared.seen
    # users 0 and 1 lose their history: the tower must give the "no history" vector for them
    history = (np.concatenate([[0, 0], indptr[2:] - indptr[2]]), indices[indptr[2] :], ratings[indptr[2] :])
    rng = np.random.default_rng(0)
    for users in (np.array([5]), np.array([0]), np.concatenate([[0, 1], rng.choice(np.arange(2, 1000), 35, replace=False)])):
        with torch.no_grad():
            ref = model.user_arch(user_features(model.spec, ctx, users, history, CPU)).numpy()
        out = session.run(None, user_feed(model.spec, ctx, users, history))[0]
        assert out.shape == (len(users), model.spec.output_dim)
        assert np.abs(out - ref).max() <= 1e-5
        assert np.isfinite(out).all()


def test_same_config_same_run_in_one_process(tmp_path):
    """Two runs of one config in the same process give the same model: the initial weights are
    seeded too, not only the training loop (torch's global RNG is disturbed in between)."""
    from training.config import load_config

    def once(i):
        torch.rand(7)  # whatever ran before must not matter
        cfg = load_config(None, [
            "data.synthetic.n_users=120", "data.synthetic.n_items=90", "trainer.epochs=2", "trainer.progress=false",
            "tracking.enabled=false", "store.load=false", "model.embedding_dim=16", "model.hidden_dim=16", "model.output_dim=16",
            f"export.output_dir={tmp_path}/a{i}", f"trainer.checkpoint_dir={tmp_path}/c{i}",
        ])
        return train(cfg)

    a, b = once(0), once(1)
    assert a.run_id is None and a.model_version is None  # tracking off
    assert a.metrics["test/ndcg@10"] == b.metrics["test/ndcg@10"]
    assert a.fit.history == b.fit.history
    np.testing.assert_array_equal(np.load(tmp_path / "a0" / "item_embeddings.npy"), np.load(tmp_path / "a1" / "item_embeddings.npy"))
    assert math.isfinite(a.metrics["test/ndcg@10"])
