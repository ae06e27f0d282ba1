"""Offline work on finished models: evaluate an exported bundle (read and scored through bundle/,
as serving scores it), export a checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import evaluation
from training.config import TrainConfig
from training.data import user_feed
from training.export import write_artifacts
from training.model import TowerSpec, TwoTower
from training.pipeline import context, item_counts, prepare
from training.task import RetrievalTask

log = logging.getLogger(__name__)

SCORE_FLOATS = 1 << 22  # floats an evaluation batch may gather and score at once (16 MB in float32; ONNX Runtime holds a few
# copies of the gather: ML-100k exact blend, `trustrec evaluate` peak 654 MB vs 1,778 MB at 1 << 25 and 2,988 at 1,024 users)


def evaluate_bundle(cfg: TrainConfig, model_uri: str) -> dict[str, float]:
    """Test metrics of the *exported* model (ONNX Runtime + item matrix), as serving computes scores."""
    from bundle.load import open_bundle
    from bundle.locate import fetched_model

    data = prepare(cfg)
    with fetched_model(str(model_uri), cfg.tracking.tracking_uri) as (path, _):
        bundle = open_bundle(path)  # in memory: the downloaded copy goes on exit
    manifest, item_vec = bundle.manifest, bundle.item_vectors
    raw = manifest["model"]["spec"]
    if raw.get("kind") == "ease":  # DP-EASE (training/privacy/gram.py): the history bag only, no torch tower to describe
        spec, n_users, n_items = None, raw["n_users"], raw["n_items"]
    else:
        spec = TowerSpec(**raw)
        n_users, n_items = spec.n_users, spec.n_items
        # the features are built as the bundle was trained, whatever the config says: a search (search.space)
        # may have chosen model.rating_weighted, and the manifest is the contract (serving reads it too)
        built = {"rating_weighted": manifest["features"]["rating_weighted"]} | ({"title_buckets": spec.n_title} if spec.use_content else {})
        if any(getattr(cfg.model, key) != value for key, value in built.items()):
            log.info("evaluate: features as the bundle was built: %s", built)
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=built)})
    if (n_users, n_items) != (data.dataset.n_users, data.dataset.n_items):
        raise ValueError(f"model has {n_users} users / {n_items} items, config data has {data.dataset.n_users} / {data.dataset.n_items}")

    ctx = context(cfg, data.dataset)

    def score(users: np.ndarray) -> np.ndarray:
        return bundle.user_vectors(user_feed(spec, ctx, users, data.seen)) @ item_vec.T

    users = np.flatnonzero(np.diff(data.test[0]) > 0)
    k = cfg.task.eval_k
    # users per batch: the user tower's history bags gather one vector-wide row per history item before
    # they pool, and a blend's vectors are wide (ML-100k's exact EASE half: 1,746 floats): bound that
    # gather, and the batch's scores, to ~SCORE_FLOATS floats (the metrics do not depend on the batch)
    mean_history = max(1.0, len(data.seen[1]) / max(1, n_users))
    batch = int(max(16, min(1024, SCORE_FLOATS // (item_vec.shape[1] * mean_history + n_items))))
    scores = evaluation.evaluate_scores(score, users, data.seen[:2], data.test[:2], n_items, k=k, batch_size=batch)
    return evaluation.Metrics({f"test/{name}": v for name, v in scores.items()})


def export_checkpoint(cfg: TrainConfig, checkpoint: Path, out_dir: Path) -> dict[str, Any]:
    """Rebuild the model from a trainer checkpoint (its best weights) and write the bundle."""
    if cfg.blend.ease:
        log.warning("blend.ease: a checkpoint holds the two-tower only; this bundle has no EASE half (train again to get the blend)")
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    spec = TowerSpec(**payload["spec"])
    model = TwoTower(spec)
    model.load_state_dict(payload["best_state"] or payload["model"])
    data = prepare(cfg)
    ds = data.dataset
    ctx = context(cfg, ds)
    task = RetrievalTask(cfg.task, item_counts(data.train, ds.n_items))
    item_vec = task.item_embeddings(model, ctx, torch.device("cpu")).numpy()
    popular = ds.item_vocab.decode(np.argsort(-item_counts(data.seen, ds.n_items), kind="stable")[: cfg.export.popularity_top_n])
    metrics = evaluation.Metrics({f"val/ndcg@{task.k}": float(payload["best_metric"])})  # published as val/ndcg_at_10
    provenance = {"checkpoint": str(checkpoint), "epoch": payload["epoch"], "dataset": ds.name, "config_digest": cfg.digest()}
    return write_artifacts(model, ctx, item_vec, ds, data.seen, out_dir, metrics, provenance, popular, cfg.export.parity_atol)
