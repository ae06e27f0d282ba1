"""MLflow as users compare runs: run names, one metric naming (training, MLflow, serving's model
card), dataset inputs whose digest follows the data, and the `alias` tag that follows the registry
through `trustrec train` and `trustrec promote` (real trainings, MLflow sqlite store)."""
from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.utils.validation import validate_param_and_metric_name

from features.schema import Interactions
from serving.users_api import metric_name as serving_metric_name
from serving.users_api import model_card
from tests.conftest import REPO
from training.config import load_config
from training.evaluation import Metrics, metric_name
from training.tracking import ALIAS_TAG, dataset_input, interactions_digest, promote, run_name, run_params


# --------------------------------------------------------------------------- run names
@pytest.mark.parametrize(("overrides", "dataset", "privacy", "expected"), [
    (["data.source=movielens", "privacy.mode=dp"], "ml-100k", None, "two_tower-ml100k-dp-eps8-s0"),
    (["model.kind=hybrid", "trainer.seed=1"], "synthetic-seed0", None, "hybrid-synthetic-nonprivate-s1"),
    (["privacy.mode=dp", "privacy.target_epsilon=1"], "synthetic-seed3", {"epsilon": 0.97}, "two_tower-synthetic-dp-eps1-s0"),
    # sigma given instead of a target: the name says sigma until the run knows its epsilon
    (["data.source=movielens", "privacy.mode=dp", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.1"], "ml-100k", None, "two_tower-ml100k-dp-sigma1.1-s0"),
    (["data.source=movielens", "privacy.mode=dp", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.1"], "ml-100k", {"epsilon": 7.996}, "two_tower-ml100k-dp-eps8-s0"),
    (["data.source=movielens", "privacy.mode=federated"], "ml-100k", {"mode": "federated"}, "two_tower-ml100k-federated-s0"),
    (["data.source=movielens", "privacy.mode=federated", "federated.dp=true"], "ml-100k", {"epsilon": 3.14159}, "two_tower-ml100k-federated-dp-eps3.14-s0"),
    (["data.source=store"], "store:9f2c", None, "two_tower-store-nonprivate-s0"),
    (["tracking.run_name=my-baseline", "privacy.mode=dp"], "ml-100k", None, "my-baseline"),  # the user's name wins
])  # fmt: skip
def test_run_name(overrides, dataset, privacy, expected):
    assert run_name(load_config(None, overrides), dataset, privacy) == expected


def test_params_are_few_and_grouped():
    for overrides in ([], ["privacy.mode=dp"], ["privacy.mode=federated", "federated.dp=true"]):
        params = run_params(load_config(REPO / "configs" / "hybrid.yaml", overrides), "synthetic-seed0")
        assert len(params) <= 30 and {k.split(".", 1)[0] for k in params} <= {"data", "model", "train", "privacy"}
        assert all(validate_param_and_metric_name(k) for k in params)
    params = run_params(load_config(REPO / "configs" / "hybrid.yaml", ["privacy.mode=federated"]), "synthetic-seed0")
    assert params["model.features"] == "genres,content,title,demographics,stated,rating_weighted"
    assert params["privacy.fl_partition"] == "silos x10" and params["privacy.fl_client_dp"] == "off"
    assert "privacy.target_epsilon" not in params  # a dp knob says nothing about a federated run


# --------------------------------------------------------------------------- metric names
def test_metric_name_spells_out_what_mlflow_refuses():
    assert metric_name("test/ndcg@10") == "test/ndcg_at_10"
    assert metric_name("beyond/ndcg@10/age=<18") == "beyond/ndcg_at_10/age_lt18"
    assert metric_name("beyond/ndcg@10/age=56+") == "beyond/ndcg_at_10/age_56plus"
    assert metric_name("beyond/ndcg@10/gender=F") == "beyond/ndcg_at_10/gender_F"
    assert metric_name("parity/torchrec_vs_onnx") == "parity/torchrec_vs_onnx"
    assert not validate_param_and_metric_name("test/ndcg@10")  # why: MLflow 3.17 refuses '@'
    names = ["test/ndcg@10", "val/recall@20", "beyond/ndcg@10/age=<18", "beyond/ndcg@10/age=56+", "a>b", "x y:z", "mmr/lambda_0.5/ndcg@10"]
    for name in names:
        published = metric_name(name)
        assert validate_param_and_metric_name(published), published
        assert metric_name(published) == published  # a published name maps to itself
        assert serving_metric_name(name) == published  # serving (no training import) spells it the same


def test_metrics_dict_shows_published_names_and_reads_both():
    m = Metrics({"test/ndcg@10": 0.25, "train/seconds": 3.0})
    m["beyond/ndcg@10/gender=F"] = 0.5
    m.update({"test/recall@10": 0.125})
    assert list(m) == ["test/ndcg_at_10", "train/seconds", "beyond/ndcg_at_10/gender_F", "test/recall_at_10"]
    assert m["test/ndcg@10"] == m["test/ndcg_at_10"] == 0.25 and m.get("test/recall@10") == 0.125
    assert "test/ndcg@10" in m and "test/ndcg@5" not in m and m.get("nope", -1) == -1
    assert json.loads(json.dumps(m)) == {"test/ndcg_at_10": 0.25, "train/seconds": 3.0, "beyond/ndcg_at_10/gender_F": 0.5, "test/recall_at_10": 0.125}
    again = pickle.loads(pickle.dumps(m))
    assert type(again) is Metrics and again == m and again["test/ndcg@10"] == 0.25


def test_model_card_maps_an_old_bundles_metric_names():
    manifest = {
        "model": {"kind": "two_tower"}, "features": {"user": ["history"], "item": ["item_id"]},
        "metrics": {"test/ndcg@10": 0.25, "beyond/ndcg@10/age=56+": 0.125, "val/ndcg_at_10": 0.5},
    }  # fmt: skip
    card = model_card(SimpleNamespace(manifest=manifest, model_version="3", provider="CPUExecutionProvider"))
    assert card["metrics"] == {"test/ndcg_at_10": 0.25, "beyond/ndcg_at_10/age_56plus": 0.125, "val/ndcg_at_10": 0.5}


# --------------------------------------------------------------------------- dataset inputs
def _rows(user, item, rating, ts) -> Interactions:
    return Interactions(np.array(user, np.int64), np.array(item, np.int64), np.array(rating, np.float32), np.array(ts, np.int64))


def test_interactions_digest_follows_the_rows_not_their_order():
    rows = _rows([0, 0, 1, 2], [3, 1, 1, 2], [5, 4, 3, 1], [10, 11, 12, 13])
    digest = interactions_digest("sha256:aa", rows)
    assert len(digest) == 10 and int(digest, 16) >= 0
    assert interactions_digest("sha256:aa", rows.take(np.array([3, 1, 0, 2]))) == digest  # same rows, other order
    assert interactions_digest("sha256:aa", _rows([0, 0, 1, 2], [3, 1, 1, 2], [5, 4, 3, 2], [10, 11, 12, 13])) != digest  # one rating
    assert interactions_digest("sha256:aa", rows.take(np.array([0, 1, 2]))) != digest  # one row fewer
    assert interactions_digest("sha256:bb", rows) != digest  # other data behind the same indices


def test_dataset_input_names_the_dataset_and_never_a_store_password():
    ds = SimpleNamespace(name="store:9f2c", n_users=3, n_items=4)
    rows = _rows([0, 1, 2], [0, 1, 3], [1, 1, 1], [1, 2, 3])
    cfg = load_config(None, ["data.source=store", "data.store.url=postgresql://trustrec:s3cret@db/store"])
    logged = dataset_input(cfg, ds, rows, "sha256:cc", "training").to_dict()
    assert logged["name"] == "store:9f2c" and logged["digest"] == interactions_digest("sha256:cc", rows)
    assert "s3cret" not in json.dumps(logged) and json.loads(logged["source"]) == {"tags": {"dataset": "store:9f2c", "source": "store"}}
    assert json.loads(logged["profile"]) == {"part": "training", "rows": 3, "users": 3, "items": 3, "dataset_users": 3,
                                             "dataset_items": 4, "split": "stratified", "snapshot": "sha256:cc"}  # fmt: skip
    ml = dataset_input(load_config(None, ["data.source=movielens"]), SimpleNamespace(name="ml-100k", n_users=3, n_items=4), rows, "sha256:cc", "training")
    assert ml.source.url == "https://files.grouplens.org/datasets/movielens/ml-100k.zip"


# --------------------------------------------------------------------------- real runs
TINY = [
    "data.synthetic.n_users=120", "data.synthetic.n_items=90", "trainer.epochs=2", "trainer.progress=false",
    "model.embedding_dim=16", "model.hidden_dim=16", "model.output_dim=16",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny trainings in one store: A (@champion, named by the pipeline), B (@challenger,
    named by the user, other model seed), C (other data, not registered)."""
    from training.pipeline import train

    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root}/mlflow.db"

    def one(tag: str, extra: list[str]):
        cfg = load_config(REPO / "configs" / "two_tower.yaml", TINY + extra + [
            f"tracking.tracking_uri={uri}", f"export.output_dir={root}/artifacts-{tag}", f"store.url=sqlite:///{root}/features.db",
            f"trainer.checkpoint_dir={root}/checkpoints-{tag}",
        ])  # fmt: skip
        return train(cfg)

    a = one("a", [])
    b = one("b", ["tracking.alias=challenger", "trainer.seed=1", "tracking.run_name=my-challenger"])
    c = one("c", ["data.synthetic.seed=1", "tracking.register_model=false"])
    return SimpleNamespace(uri=uri, client=MlflowClient(tracking_uri=uri), a=a, b=b, c=c)


def _tag(runs, result) -> str | None:
    return runs.client.get_run(result.run_id).data.tags.get(ALIAS_TAG)


def test_names_the_pipeline_gives_and_the_user_keeps(runs):
    assert runs.client.get_run(runs.a.run_id).info.run_name == "two_tower-synthetic-nonprivate-s0"
    assert runs.client.get_run(runs.b.run_id).info.run_name == "my-challenger"  # tracking.run_name wins
    assert runs.client.get_run(runs.c.run_id).info.run_name == "two_tower-synthetic-nonprivate-s0"


def test_training_digest_follows_the_data(runs):
    def digest(result, context):
        inputs = runs.client.get_run(result.run_id).inputs.dataset_inputs
        return next(d.dataset for d in inputs if any(t.value == context for t in d.tags))

    a, b, c = (digest(r, "training") for r in (runs.a, runs.b, runs.c))
    assert a.digest == b.digest and a.name == b.name == "synthetic-seed0"  # same data, other model seed
    assert c.digest != a.digest and c.name == "synthetic-seed1"
    assert digest(runs.a, "evaluation").digest != a.digest


def test_alias_tag_follows_train_and_promote(runs):
    assert runs.a.model_version == "1" and runs.b.model_version == "2"
    assert (_tag(runs, runs.a), _tag(runs, runs.b), _tag(runs, runs.c)) == ("champion", "challenger", None)  # c never registered

    assert promote(runs.b.run_id, "champion", "trustrec", runs.uri) == "2"
    assert _tag(runs, runs.a) == "none"  # lost @champion: the tag says so
    assert _tag(runs, runs.b) == "challenger,champion"  # what the registry says of version 2

    promote(runs.a.run_id, "champion", "trustrec", runs.uri)  # and back
    assert (_tag(runs, runs.a), _tag(runs, runs.b)) == ("champion", "challenger")
    assert runs.client.get_model_version_by_alias("trustrec", "champion").run_id == runs.a.run_id


def test_promote_refuses_a_run_with_no_version(runs):
    with pytest.raises(ValueError, match="no registered version"):
        promote(runs.c.run_id, "champion", "trustrec", runs.uri)
    assert _tag(runs, runs.c) is None


def test_early_stopping_params_are_shown_without_a_new_group():
    params = run_params(load_config(REPO / "configs" / "two_tower_ease.yaml", ["trainer.min_delta=0.005"]), "synthetic-seed0")
    assert params["train.min_delta"] == 0.005 and params["train.epochs"] == 100 and len(params) <= 30
    params = run_params(load_config(REPO / "configs" / "two_tower.yaml", ["trainer.max_seconds=900"]), "synthetic-seed0")
    assert params["train.epochs"] == "100 (max 900 s)"


def test_a_dp_ease_run_lists_its_own_kind_and_no_tower_settings():
    """A Gram-release run has no towers, epochs or optimizer: its run page says ease_dp and lists
    none of the two-tower's settings (fit_gram adds the mechanism and the EASE settings)."""
    params = run_params(load_config(REPO / "configs" / "ease_dp.yaml"), "synthetic-seed0")
    assert params["model.kind"] == "ease_dp" and params["privacy.mode"] == "dp"
    assert not {"model.temperature", "model.embedding_dim", "train.lr", "train.epochs", "privacy.max_grad_norm"} & set(params)
    assert params["train.seed"] == load_config(REPO / "configs" / "ease_dp.yaml").trainer.seed


def test_artifacts_go_beside_sqlite_where_configured_and_never_to_an_unstated_place(tmp_path):
    from training.tracking import default_artifact_location

    assert default_artifact_location(f"sqlite:///{tmp_path}/mlflow.db") == (tmp_path / "mlartifacts").as_uri()
    assert default_artifact_location(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "a")) == (tmp_path / "a").as_uri()
    assert default_artifact_location("postgresql://db/mlflow", "s3://bucket/mlflow") == "s3://bucket/mlflow"
    assert default_artifact_location("http://127.0.0.1:5000") is None  # a tracking server decides
    for uri in ("postgresql+psycopg://u@db/mlflow", "mysql://u@db/mlflow"):
        with pytest.raises(ValueError, match="tracking.artifact_location: a (postgresql|mysql) tracking store"):
            default_artifact_location(uri)
