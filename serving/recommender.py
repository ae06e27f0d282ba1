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

from features.content import age_bucket, lookup, user_inputs
from features.schema import UNKNOWN_AGE
from features.store import FeatureStore
from features.vocab import Vocab
from serving.rerank import mmr
from serving.runtime import create_session
from serving.topk import TopK, build_index

log = logging.getLogger(__name__)

SUPPORTED_SCHEMA = 1
MMR_POOL_FACTOR, MMR_MIN_POOL = 5, 50  # MMR re-ranks the top max(5k, 50) candidates


@dataclass(frozen=True)
class UserState:
    """A user as the model sees them: history item indices (+ ratings) and the stored profile."""

    items: np.ndarray
    ratings: np.ndarray
    profile: dict | None

    def has_signal(self, uses_stated: bool) -> bool:
        """Anything to personalize from: a history, or stated genres when the model reads them."""
        stated = bool(self.profile and (self.profile.get("liked_genres") or self.profile.get("avoided_genres")))
        return len(self.items) > 0 or (uses_stated and stated)


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
    def __init__(self, bundle: Path, store: FeatureStore | None = None, model_version: str = "local", force_cpu: bool = False, diversity: float = 1.0):
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
        self.diversity = diversity
        self.genre_index = {name: i for i, name in enumerate(self.manifest["genres"])}
        self.genre_mask = np.zeros((len(self.items), len(self.genre_index)), dtype=bool)  # item x genre
        for i, item in enumerate(self.items):
            self.genre_mask[i, [self.genre_index[g] for g in item["genres"] if g in self.genre_index]] = True
        user_features = set(self.manifest["features"]["user"])
        self.uses_stated = "liked" in user_features
        self.uses_profile = self.uses_stated or "age" in user_features

    @classmethod
    def from_dir(cls, path: str | Path, store: FeatureStore | None = None, force_cpu: bool = False, diversity: float = 1.0) -> "Recommender":
        return cls(find_bundle(Path(path)), store, "local", force_cpu, diversity)

    @classmethod
    def from_uri(cls, uri: str, store: FeatureStore | None = None, tracking_uri: str | None = None, force_cpu: bool = False, diversity: float = 1.0) -> "Recommender":
        bundle, version = resolve_model_uri(uri, tracking_uri)
        return cls(bundle, store, version, force_cpu, diversity)

    def user_state(self, user_id: str) -> UserState:
        """What the store holds about the user, in model indices; items the model never saw are dropped."""
        if self.store is None:
            return UserState(np.zeros(0, np.int64), np.zeros(0, np.float32), None)
        pairs = self.store.user_interactions(user_id)
        idx = self.item_vocab.encode([item for item, _ in pairs], unknown=-1)
        ratings = np.array([rating for _, rating in pairs], dtype=np.float32)
        profile = self.store.user_profile(user_id) if self.uses_profile else None
        return UserState(idx[idx >= 0], ratings[idx >= 0], profile)

    def _genres(self, names: list[str]) -> np.ndarray:
        return np.array([self.genre_index[n] for n in names if n in self.genre_index], dtype=np.int64)

    def feed(self, states: list[UserState], user_rows: list[int]) -> dict[str, np.ndarray]:
        """The ONNX feed (features.content.USER_INPUTS) for a batch of users."""
        spec = self.manifest["features"]
        profiles = [s.profile or {} for s in states]
        age = np.array([UNKNOWN_AGE if p.get("age") is None else p["age"] for p in profiles])
        return user_inputs(
            [s.items for s in states],
            [s.ratings for s in states] if spec["rating_weighted"] else None,
            np.asarray(user_rows, np.int64),
            age_bucket(age),
            lookup(spec["gender_vocab"], [p.get("gender") or "" for p in profiles]),
            lookup(spec["occupation_vocab"], [p.get("occupation") or "" for p in profiles]),
            [self._genres(p.get("liked_genres") or []) for p in profiles],
            [self._genres(p.get("avoided_genres") or []) for p in profiles],
        )

    def user_vectors(self, states: list[UserState], user_rows: list[int]) -> np.ndarray:
        return self.session.run(None, self.feed(states, user_rows))[0]

    def _item(self, index: int, score: float) -> dict:
        meta = self.items[index]
        return {"item_id": meta["item_id"], "title": meta["title"], "score": round(float(score), 6)}

    def recommend(self, user_id: str, k: int = 10, exclude_seen: bool = True, diversity: float | None = None) -> dict:
        """Top-k for one user: personalized when the model or the store knows them, popularity otherwise.

        `diversity` is the MMR lambda (1 = plain ranking by score, lower = more diverse); None
        takes the recommender's default."""
        return self.recommend_many([user_id], k, exclude_seen, diversity)[0]

    def recommend_many(self, user_ids: list[str], k: int = 10, exclude_seen: bool = True, diversity: float | None = None) -> list[dict]:
        lam = self.diversity if diversity is None else diversity
        states = [self.user_state(u) for u in user_ids]
        rows = [self.user_vocab.get(u) for u in user_ids]
        known = [i for i, (s, r) in enumerate(zip(states, rows)) if r is not None or s.has_signal(self.uses_stated)]
        results: list[dict | None] = [None] * len(user_ids)
        if known:
            vectors = self.user_vectors([states[i] for i in known], [self.user_oov if rows[i] is None else rows[i] for i in known])
            exclude = [self._excluded(states[i], exclude_seen) for i in known]
            liked = [self._liked(states[i]) for i in known]
            cold = [len(states[i].items) == 0 and g.size > 0 for i, g in zip(known, liked)]
            n_candidates = k if lam >= 1 and not any(cold) else max(k * MMR_POOL_FACTOR, MMR_MIN_POOL)
            scores, items = self.index.search(vectors, n_candidates, exclude)
            for j, i in enumerate(known):
                keep = items[j] >= 0
                cand, cand_scores = items[j][keep], scores[j][keep]
                if cold[j]:  # nothing but stated tastes: items of a liked genre first, model order within
                    match = self.genre_mask[cand][:, liked[j]].any(1)
                    order = np.argsort(~match, kind="stable")[: max(int(match.sum()), k)]
                    cand, cand_scores = cand[order], cand_scores[order]
                if lam < 1 and len(cand):
                    order = mmr(cand_scores, self.item_vectors[cand], k, lam)
                    cand, cand_scores = cand[order], cand_scores[order]
                results[i] = self._response([self._item(t, s) for t, s in zip(cand[:k], cand_scores[:k])], True)
        for i, result in enumerate(results):
            if result is None:
                results[i] = self._response(self._popular(k, self._excluded(states[i], exclude_seen)), False)
        return results  # type: ignore[return-value]

    def _liked(self, state: UserState) -> np.ndarray:
        return self._genres((state.profile or {}).get("liked_genres") or [])

    def _excluded(self, state: UserState, exclude_seen: bool) -> np.ndarray:
        """Items never to return: the user's history (when asked) and every item of an avoided genre."""
        avoided = self._genres((state.profile or {}).get("avoided_genres") or [])
        banned = np.flatnonzero(self.genre_mask[:, avoided].any(1)) if avoided.size else np.zeros(0, np.int64)
        return np.union1d(state.items, banned) if exclude_seen else banned

    def _popular(self, k: int, exclude: np.ndarray) -> list[dict]:
        chosen = self.popular[~np.isin(self.popular, exclude)]
        n = len(chosen)
        # score = rank-based in (0, 1]: clients can sort on it, but it is not a model score
        return [self._item(int(t), 1.0 - r / max(n, 1)) for r, t in enumerate(chosen[:k])]

    def _response(self, items: list[dict], personalized: bool) -> dict:
        return {"items": items, "personalized": personalized, "model_version": self.model_version, "provider": self.provider}
