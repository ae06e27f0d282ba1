"""`Recommender`: the whole online path without Ray (ONNX user tower + TopK over the item
matrix + feature-store history), loadable from an artifact dir or `models:/name@alias`."""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from features.store import FeatureStore
from features.vocab import Vocab
from serving.runtime import create_session
from serving.topk import TopK, build_index

log = logging.getLogger(__name__)

SUPPORTED_SCHEMA = 1


@dataclass(frozen=True)
class Recommendation:
    item_id: str
    title: str
    score: float


def find_bundle(root: Path) -> Path:
    """The directory holding manifest.json: `root` itself or the pyfunc model's artifacts/<name>/."""
    if (root / "manifest.json").exists():
        return root
    found = sorted(root.glob("artifacts/*/manifest.json")) + sorted(root.glob("*/manifest.json"))
    if not found:
        raise FileNotFoundError(f"no manifest.json under {root}")
    return found[0].parent


def resolve_model_uri(uri: str, tracking_uri: str | None = None) -> tuple[Path, str]:
    """(local bundle dir, model version) for a path or an MLflow `models:/name@alias` URI."""
    if not uri.startswith("models:/"):
        return find_bundle(Path(uri)), "local"
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    name, _, alias = uri[len("models:/") :].partition("@")
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(name, alias).version if alias else uri.rsplit("/", 1)[-1]
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tempfile.mkdtemp(prefix="trustrec-model-"))
    return find_bundle(Path(local)), str(version)


class Recommender:
    def __init__(self, bundle: Path, store: FeatureStore | None = None, model_version: str = "local", force_cpu: bool = False):
        self.manifest: dict[str, Any] = json.loads((bundle / "manifest.json").read_text())
        if self.manifest.get("schema_version") != SUPPORTED_SCHEMA:
            raise ValueError(f"{bundle}/manifest.json: schema_version {self.manifest.get('schema_version')} unsupported (want {SUPPORTED_SCHEMA})")
        files = self.manifest["files"]
        self.session, self.provider = create_session(bundle / files["user_tower"], force_cpu=force_cpu)
        self.item_vectors = np.load(bundle / files["item_embeddings"])
        self.index: TopK = build_index(self.item_vectors)
        self.items: list[dict] = json.loads((bundle / files["items"]).read_text())
        self.user_vocab = Vocab.load(bundle / files["user_vocab"])
        self.item_vocab = Vocab.load(bundle / files["item_vocab"])
        self.user_oov = int(self.manifest["user_oov_index"])
        self.popular = self.item_vocab.encode(self.manifest["popularity"])
        self.store = store
        self.model_version = model_version

    @classmethod
    def from_dir(cls, path: str | Path, store: FeatureStore | None = None, force_cpu: bool = False) -> "Recommender":
        return cls(find_bundle(Path(path)), store, "local", force_cpu)

    @classmethod
    def from_uri(cls, uri: str, store: FeatureStore | None = None, tracking_uri: str | None = None, force_cpu: bool = False) -> "Recommender":
        bundle, version = resolve_model_uri(uri, tracking_uri)
        return cls(bundle, store, version, force_cpu)

    def history(self, user_id: str) -> np.ndarray:
        """Item indices of the user's stored history; items the model never saw are dropped."""
        if self.store is None:
            return np.zeros(0, np.int64)
        idx = self.item_vocab.encode(self.store.user_history(user_id), unknown=-1)
        return idx[idx >= 0]

    def user_vectors(self, histories: list[np.ndarray], user_rows: list[int]) -> np.ndarray:
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        feed = {
            "history": np.concatenate(histories).astype(np.int64) if histories else np.zeros(0, np.int64),
            "offsets": np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
            "user": np.asarray(user_rows, dtype=np.int64),
        }
        return self.session.run(None, feed)[0]

    def _item(self, index: int, score: float) -> dict:
        meta = self.items[index]
        return {"item_id": meta["item_id"], "title": meta["title"], "score": round(float(score), 6)}

    def recommend(self, user_id: str, k: int = 10, exclude_seen: bool = True) -> dict:
        """Top-k for one user: personalized when the model or the store knows them, popularity otherwise."""
        return self.recommend_many([user_id], k, exclude_seen)[0]

    def recommend_many(self, user_ids: list[str], k: int = 10, exclude_seen: bool = True) -> list[dict]:
        histories = [self.history(u) for u in user_ids]
        rows = [self.user_vocab.get(u) for u in user_ids]
        known = [i for i, (h, r) in enumerate(zip(histories, rows)) if r is not None or len(h) > 0]
        results: list[dict | None] = [None] * len(user_ids)
        if known:
            vectors = self.user_vectors([histories[i] for i in known], [self.user_oov if rows[i] is None else rows[i] for i in known])
            exclude = [histories[i] if exclude_seen else np.zeros(0, np.int64) for i in known]
            scores, items = self.index.search(vectors, k, exclude)
            for j, i in enumerate(known):
                keep = items[j] >= 0
                results[i] = self._response([self._item(t, s) for t, s in zip(items[j][keep], scores[j][keep])], True)
        for i, result in enumerate(results):
            if result is None:
                results[i] = self._response(self._popular(k, histories[i] if exclude_seen else None), False)
        return results  # type: ignore[return-value]

    def _popular(self, k: int, exclude: np.ndarray | None) -> list[dict]:
        chosen = self.popular if exclude is None else self.popular[~np.isin(self.popular, exclude)]
        n = len(chosen)
        # score = rank-based in (0, 1]: clients can sort on it, but it is not a model score
        return [self._item(int(t), 1.0 - r / max(n, 1)) for r, t in enumerate(chosen[:k])]

    def _response(self, items: list[dict], personalized: bool) -> dict:
        return {"items": items, "personalized": personalized, "model_version": self.model_version, "provider": self.provider}
