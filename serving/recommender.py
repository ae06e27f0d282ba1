"""`Recommender`: the whole online path without Ray (ONNX user tower + TopK over the item
matrix + feature-store history), loadable from an artifact dir or `models:/name@alias`. The bundle
is located, checked and opened through `bundle/` (the contract training writes)."""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bundle.load import open_bundle
from bundle.locate import fetched_model, find_bundle
from bundle.rerank import mmr
from bundle.topk import TopK, build_index
from features.consent import serving_view
from features.content import age_bucket, lookup, user_inputs
from features.schema import UNKNOWN_AGE
from features.store import FeatureStore
from features.vocab import Vocab

log = logging.getLogger(__name__)

MMR_POOL_FACTOR, MMR_MIN_POOL = 5, 50  # MMR re-ranks the top max(5k, 50) candidates
MAX_MEMO_ANSWERS = 8  # distinct (k, exclude_seen, λ) answers memoized per cached user state
MAX_BLANK_ANSWERS = 64  # ... and for the users nothing is known about, shared (Recommender._blank)


def _copy_answer(answer: dict) -> dict:
    """A caller's own copy of a memoized answer (items and `short` are dicts callers may extend)."""
    out = {**answer, "items": [dict(item) for item in answer["items"]]}
    if "short" in out:
        out["short"] = dict(out["short"])
    return out


@dataclass(frozen=True)
class UserState:
    """A user as the model sees them: history item indices (+ ratings) and the stored profile."""

    items: np.ndarray
    ratings: np.ndarray
    profile: dict | None
    personalize: bool = True  # `personalization` consent; False: popularity, nothing personal read
    blocked: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # items the user blocked
    # what the recommender derives from this state (feed codes, exclusions), computed on first use:
    # a state is immutable and a cached one belongs to one Recommender, so a repeated user costs
    # no numpy work beyond the ONNX call and the top-k
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    def has_signal(self, uses_stated: bool) -> bool:
        """Anything to personalize from: a history, or stated genres when the model reads them."""
        stated = bool(self.profile and (self.profile.get("liked_genres") or self.profile.get("avoided_genres")))
        return len(self.items) > 0 or (uses_stated and stated)


class Recommender:
    def __init__(self, bundle: Path, store: FeatureStore | None = None, model_version: str = "local", force_cpu: bool = False,
                 diversity: float = 1.0, index: dict | None = None, cache_size: int = 10_000):
        opened = open_bundle(bundle, force_cpu=force_cpu, intra_op_threads=1)  # one small user-tower call per batch: scale with replicas, not threads
        self.manifest: dict[str, Any] = opened.manifest  # schema version checked (bundle.manifest)
        files = self.manifest["files"]
        self.session, self.provider = opened.session, opened.provider
        self.item_vectors = opened.item_vectors
        # what item-to-item similarity (MMR, explanations) compares: a learned item bias (the last
        # coordinate, model.item_bias) and an EASE half (blend.ease) are for scoring, not a likeness
        # between items; the manifest names the leading coordinates that are (older bundles: all but a bias)
        output = self.manifest["output"]
        dims = output.get("similarity_dims") or (self.item_vectors.shape[1] - 1 if output.get("item_bias") else self.item_vectors.shape[1])
        self.similarity_vectors = self.item_vectors[:, :dims]
        self.index: TopK = build_index(self.item_vectors, **(index or {}))  # `index`: serving.config.IndexArgs fields
        self.items: list[dict] = json.loads((bundle / files["items"]).read_text())
        self.user_vocab = Vocab.load(bundle / files["user_vocab"])
        self.item_vocab = Vocab.load(bundle / files["item_vocab"])
        self.user_oov = int(self.manifest["user_oov_index"])
        self.popular = self.item_vocab.encode(self.manifest["popularity"])
        self.store = store
        # per-replica cache of user states, keyed by the store's change counter (see user_states)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, UserState] = OrderedDict()
        self._cache_generation: int | None = None
        self._cache_lock = threading.Lock()  # batches and explanations run in worker threads
        self._blank_answers: dict[tuple, dict] = {}  # the answer to a user nothing is known about, per (k, exclude_seen, λ)
        self.model_version = model_version
        self.diversity = diversity
        self.genre_index = {name: i for i, name in enumerate(self.manifest["genres"])}
        self.genre_mask = np.zeros((len(self.items), len(self.genre_index)), dtype=bool)  # item x genre
        for i, item in enumerate(self.items):
            self.genre_mask[i, [self.genre_index[g] for g in item["genres"] if g in self.genre_index]] = True
        user_features = set(self.manifest["features"]["user"])
        self.uses_stated = "liked" in user_features
        self.uses_profile = self.uses_stated or "age" in user_features
        # being in user_vocab personalizes only a tower that reads the id row (or a profile): one that
        # reads neither gives every history-less user the same vector, so that user gets popularity
        self.uses_user_id = "user_id" in user_features

    @classmethod
    def from_dir(cls, path: str | Path, store: FeatureStore | None = None, force_cpu: bool = False, diversity: float = 1.0,
                 index: dict | None = None, cache_size: int = 10_000) -> "Recommender":
        return cls(find_bundle(Path(path)), store, "local", force_cpu, diversity, index, cache_size)

    @classmethod
    def from_uri(cls, uri: str, store: FeatureStore | None = None, tracking_uri: str | None = None, force_cpu: bool = False,
                 diversity: float = 1.0, index: dict | None = None, cache_size: int = 10_000) -> "Recommender":
        with fetched_model(uri, tracking_uri) as (bundle, version):  # everything is in memory once built
            return cls(bundle, store, version, force_cpu, diversity, index, cache_size)

    def user_states(self, user_ids: list[str]) -> list[UserState]:
        """user_state for each id, through the per-replica cache. The cache is keyed by the store's
        change counter (`FeatureStore.generation()`, bumped in the same transaction as every consent,
        preference, event, erasure or import): one read of it per call, and the whole cache is
        dropped when it moved, so a change shows on the very next request while a request that
        changes nothing reads a user's rows once. (A state read after the counter was read is at
        least as new as that counter: it is never served past a change.)"""
        if self.store is None or self.cache_size == 0:
            return [self.user_state(u) for u in user_ids]
        generation = self.store.generation()
        with self._cache_lock:
            if generation != self._cache_generation:
                self._cache.clear()
                self._cache_generation = generation
            cached = [self._cache.get(u) for u in user_ids]
            for u, state in zip(user_ids, cached):
                if state is not None:
                    self._cache.move_to_end(u)
        states = [state if state is not None else self.user_state(u) for u, state in zip(user_ids, cached)]
        with self._cache_lock:
            if generation == self._cache_generation:  # not dropped meanwhile by a newer counter
                for u, state, was in zip(user_ids, states, cached):
                    if was is None:
                        self._cache[u] = state
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)  # least recently used
        return states

    def user_state(self, user_id: str) -> UserState:
        """What the store holds about the user, in model indices, as far as their consent allows
        (read from the store, uncached: `user_states` caches it); items the model never saw are
        dropped. Stated preferences are read for every model: avoided genres and blocked items are
        honoured whatever the model reads and whatever the consent."""
        empty = np.zeros(0, np.int64)
        if self.store is None:
            return UserState(empty, np.zeros(0, np.float32), None)
        with self.store.snapshot() as conn:  # one connection, one consistent state: consent and history agree
            view = serving_view(self.store, user_id, conn)
            profile = self.store.user_profile(user_id, conn)
            pairs = self.store.user_interactions(user_id, conn=conn) if view.personalization else []
        blocked = self.item_vocab.encode(view.blocked_items, unknown=-1)
        if not view.personalization:  # no history read; stated exclusions still apply
            return UserState(empty, np.zeros(0, np.float32), profile, False, blocked[blocked >= 0])
        if profile is not None and not view.demographics:  # the tower gets "missing" for each
            profile = {**profile, "age": None, "gender": None, "occupation": None}
        idx = self.item_vocab.encode([item for item, _ in pairs], unknown=-1)
        ratings = np.array([rating for _, rating in pairs], dtype=np.float32)
        return UserState(idx[idx >= 0], ratings[idx >= 0], profile, True, blocked[blocked >= 0])

    def _genres(self, names: list[str]) -> np.ndarray:
        return np.array([self.genre_index[n] for n in names if n in self.genre_index], dtype=np.int64)

    def _codes(self, state: UserState) -> tuple[int, int, int, np.ndarray, np.ndarray]:
        """(age bucket, gender code, occupation code, liked genres, avoided genres) of a user, as the
        tower reads them (features.content); memoized on the state."""
        codes = state.memo.get("codes")
        if codes is None:
            spec, p = self.manifest["features"], state.profile or {}
            codes = state.memo["codes"] = (
                int(age_bucket(UNKNOWN_AGE if p.get("age") is None else p["age"])),
                int(lookup(spec["gender_vocab"], [p.get("gender") or ""])[0]),
                int(lookup(spec["occupation_vocab"], [p.get("occupation") or ""])[0]),
                self._genres(p.get("liked_genres") or []),
                self._genres(p.get("avoided_genres") or []),
            )
        return codes

    def feed(self, states: list[UserState], user_rows: list[int]) -> dict[str, np.ndarray]:
        """The ONNX feed (features.content.USER_INPUTS) for a batch of users."""
        codes = [self._codes(s) for s in states]
        return user_inputs(
            [s.items for s in states],
            [s.ratings for s in states] if self.manifest["features"]["rating_weighted"] else None,
            np.asarray(user_rows, np.int64),
            np.array([c[0] for c in codes], np.int64),
            np.array([c[1] for c in codes], np.int64),
            np.array([c[2] for c in codes], np.int64),
            [c[3] for c in codes],
            [c[4] for c in codes],
        )

    def user_vectors(self, states: list[UserState], user_rows: list[int]) -> np.ndarray:
        if len(states) == 1:  # the usual batch at moderate load: a repeated user's feed is built once
            feed = states[0].memo.get(("feed", user_rows[0]))
            if feed is None:
                feed = states[0].memo[("feed", user_rows[0])] = self.feed(states, user_rows)
            return self.session.run(None, feed)[0]
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
        """recommend() for each id. An answer is a pure function of the model, the user's state and
        (k, exclude_seen, λ), so it is memoized on the (cached) state: a repeated request between two
        store changes costs a counter read and a copy, not the user tower, the top-k and MMR again.
        Each caller gets its own copy (callers add fields to it)."""
        lam = self.diversity if diversity is None else diversity
        states = self.user_states(user_ids)
        key = (k, exclude_seen, lam)
        results: list[dict | None] = [None] * len(user_ids)
        todo = []
        blank = [self._blank(u, s) for u, s in zip(user_ids, states)]
        for i, state in enumerate(states):
            hit = (self._blank_answers if blank[i] else state.memo.get("answers", {})).get(key)
            if hit is None:
                todo.append(i)
            else:
                results[i] = _copy_answer(hit)
        if todo:
            fresh = self._recommend_states([user_ids[i] for i in todo], [states[i] for i in todo], k, exclude_seen, lam)
            for i, answer in zip(todo, fresh):
                answers = self._blank_answers if blank[i] else states[i].memo.setdefault("answers", {})
                if len(answers) < (MAX_BLANK_ANSWERS if blank[i] else MAX_MEMO_ANSWERS):  # a client cycling through λ values cannot grow it without bound
                    answers[key] = answer
                results[i] = _copy_answer(answer)
        return results  # type: ignore[return-value]

    def _blank(self, user_id: str, state: UserState) -> bool:
        """A user the model has no row for and the store holds nothing about (no history, no profile
        or stated tastes, nothing blocked): every such user gets the same popularity answer, shared
        across users (a new visitor's id is seen once, so a per-user memo would never hit)."""
        return len(state.items) == 0 and len(state.blocked) == 0 and state.profile is None and self.user_vocab.get(user_id) is None

    def _recommend_states(self, user_ids: list[str], states: list[UserState], k: int, exclude_seen: bool, lam: float) -> list[dict]:
        rows = [self.user_vocab.get(u) for u in user_ids]
        known = [i for i, (s, r) in enumerate(zip(states, rows)) if s.personalize and ((r is not None and (self.uses_user_id or self.uses_profile)) or s.has_signal(self.uses_stated))]
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
                    order = mmr(cand_scores, self.similarity_vectors[cand], k, lam)
                    cand, cand_scores = cand[order], cand_scores[order]
                results[i] = self._response([self._item(t, s) for t, s in zip(cand[:k], cand_scores[:k])], True)
        for i, result in enumerate(results):
            if result is None:  # stated likes steer the popularity list when personalization is allowed
                liked = self._liked(states[i]) if states[i].personalize else np.zeros(0, np.int64)
                results[i] = self._response(self._popular(k, self._excluded(states[i], exclude_seen), lam, liked), liked.size > 0)
        for i, result in enumerate(results):
            if len(result["items"]) < k:  # never silently short: say how many and why
                pool = "the model's catalog" if i in known else f"the bundle's popularity list ({len(self.popular)} items)"
                result["short"] = {
                    "requested": k, "returned": len(result["items"]),
                    "reason": f"only {len(result['items'])} items of {pool} remain after leaving out items already seen, of avoided genres and blocked",
                }  # fmt: skip
        return results  # type: ignore[return-value]

    def _liked(self, state: UserState) -> np.ndarray:
        return self._codes(state)[3]

    def _excluded(self, state: UserState, exclude_seen: bool) -> np.ndarray:
        """Items never to return: the user's history (when asked), every item of an avoided genre,
        blocked items (sorted, unique; memoized on the state)."""
        key = ("excluded", exclude_seen)
        found = state.memo.get(key)
        if found is None:
            avoided = self._codes(state)[4]
            banned = np.flatnonzero(self.genre_mask[:, avoided].any(1)) if avoided.size else np.zeros(0, np.int64)
            banned = np.union1d(banned, state.blocked)
            found = np.union1d(state.items, banned) if exclude_seen else banned
            found.flags.writeable = False  # shared by every later request of this user
            state.memo[key] = found
        return found

    def _popular(self, k: int, exclude: np.ndarray, lam: float = 1.0, liked: np.ndarray | None = None) -> list[dict]:
        """The popularity list without `exclude`; items of a `liked` genre first (stated tastes steer
        even a model that does not read them); MMR over the top candidates when lam < 1."""
        chosen = self.popular[~np.isin(self.popular, exclude)]
        if liked is not None and liked.size and len(chosen):
            match = self.genre_mask[chosen][:, liked].any(1)
            chosen = chosen[np.argsort(~match, kind="stable")][: max(int(match.sum()), k)]
        n = len(chosen)
        # score = rank-based in (0, 1]: clients can sort on it, but it is not a model score
        scores = 1.0 - np.arange(n) / max(n, 1)
        if lam < 1 and n:
            pool = max(k * MMR_POOL_FACTOR, MMR_MIN_POOL)
            order = mmr(scores[:pool], self.similarity_vectors[chosen[:pool]], k, lam)
            chosen, scores = chosen[:pool][order], scores[:pool][order]
        return [self._item(int(t), float(s)) for t, s in zip(chosen[:k], scores[:k])]

    def _response(self, items: list[dict], personalized: bool) -> dict:
        return {"items": items, "personalized": personalized, "model_version": self.model_version, "provider": self.provider}


HEALTH_PROBE_USER = "__trustrec_health_probe__"  # never a real id: the probe reads nothing personal


def probe(recommender, store) -> None:
    """Raise unless the ONNX session answers (a real run on a history-less user) and the store answers a query.
    Here, not in serving/app.py, so that checking a bundle (`trustrec serve`'s preflight) imports no Ray:
    Ray reads its auth settings when first imported, before `trustrec serve` has set them."""
    empty = UserState(np.zeros(0, np.int64), np.zeros(0, np.float32), None)
    vectors = recommender.user_vectors([empty], [recommender.user_oov])
    if vectors.shape != (1, recommender.item_vectors.shape[1]) or not np.isfinite(vectors).all():
        raise RuntimeError(f"ONNX user tower returned {vectors.shape} / non-finite values")
    if store is not None:
        store.has_user(HEALTH_PROBE_USER)  # a real SELECT: raises when the database or its tables are gone
