"""An experiment inside the model deployment: assign, serve the arm, log the exposure.

Per request: the user's arm comes from features/experiments.py (keyed hash, sticky, stateless);
a user without personalization consent is served the experiment's non-personalized fallback
(still counted in the arm they were assigned, for the sample-ratio test); the arm's list comes from
its model (the deployment's own, or another registry alias loaded beside it in the same replica)
or from a baseline (`popularity`: the bundle's non-personalized list; `random`: uniform over the
catalog), passed through the arm's logging policy (bundle/policy.py: exact propensities); the
answer carries `experiment`, `arm` and `exposure_id`, and the exposure goes to the replica's
bounded, asynchronous log (features/exposures.py).

Arms share one replica rather than one deployment each: a request then needs no second hop and the
arms see the same store state; the cost is one more model in memory per extra alias (a bundle of
the synthetic default is ~1 MB; the catalog's item matrix dominates). Arm models reload with the
main model on every swap (`trustrec serve --reload`), so a promotion reaches every arm.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from bundle.policy import explore_slate
from features.experiments import ExperimentConfig, assign, assignment_key, served_arm
from features.exposures import Exposure, ExposureLog, new_exposure_id

log = logging.getLogger(__name__)


def alias_of(model_uri: str) -> str | None:
    """`models:/name@alias` -> alias; None for a directory or a version URI."""
    if model_uri.startswith("models:/") and "@" in model_uri:
        return model_uri.rsplit("@", 1)[1]
    return None


def arm_uris(cfg: ExperimentConfig, main_uri: str) -> dict[str, str]:
    """alias -> model URI for every model arm other than the main model's own alias. A ValueError
    naming the arm when the main URI is not a registry alias (there is no registry to ask)."""
    main = alias_of(main_uri)
    out: dict[str, str] = {}
    for arm in cfg.arms:
        if arm.model is None or arm.model == main:
            continue
        if main is None:
            raise ValueError(f"experiment.arms[{arm.name}].model: alias {arm.model!r} needs a registry model_uri (models:/name@alias); "
                             f"{main_uri!r} is not one")  # fmt: skip
        out[arm.model] = main_uri.rsplit("@", 1)[0] + "@" + arm.model
    return out


class ExperimentRouter:
    """One per replica: the experiment's config, its assignment key, the arm models, the exposure log."""

    def __init__(self, cfg: ExperimentConfig, store, log_capacity: int = 10_000):
        if store is None:
            raise ValueError("experiment: needs a feature store (store_url) for consent and the exposure log")
        self.cfg, self.store = cfg, store
        self.key = assignment_key(cfg)  # refuses to start without the secret: assignment must be the same on every replica
        self.exposures = ExposureLog(store, capacity=log_capacity)
        self.arm_models: dict[str, object] = {}  # alias -> Recommender, for arms not served by the main model
        self.main_alias: str | None = None
        self._rng = np.random.default_rng()

    def set_models(self, main_uri: str, arm_models: dict[str, object]) -> None:
        self.main_alias, self.arm_models = alias_of(main_uri), arm_models

    def close(self) -> None:
        self.exposures.close()

    # -- one batch ------------------------------------------------------------------------------
    def answer(self, rec, requests: list[dict], usual) -> list[dict]:
        """The batch's answers; `usual(rec, requests)` answers a request outside the experiment."""
        states = rec.user_states([r["user_id"] for r in requests])
        results: list[dict | None] = [None] * len(requests)
        plan = []
        for i, (r, state) in enumerate(zip(requests, states)):
            assigned = assign(self.cfg, r["user_id"], self.key)
            plan.append((assigned, served_arm(self.cfg, assigned, state.personalize)))
        outside = [i for i, (_, served) in enumerate(plan) if served is None]
        if outside:
            for i, out in zip(outside, usual(rec, [requests[i] for i in outside])):
                results[i] = out
        for i, (r, state) in enumerate(zip(requests, states)):
            assigned, served = plan[i]
            if served is None:
                items, explored, version = results[i]["items"], False, results[i]["model_version"]
                props = [1.0] * len(items)  # the usual path is deterministic
            else:
                results[i], props, explored, version = self._arm(rec, self.cfg.arm(served), r, state)
                items = results[i]["items"]
            eid = new_exposure_id()
            self.exposures.append(Exposure(eid, self.store.subject_hash(r["user_id"]), self.cfg.name, assigned, served, version, explored,
                                           [(it["item_id"], it["score"], p) for it, p in zip(items, props)], int(time.time() * 1000)))  # fmt: skip
            results[i] = {**results[i], "experiment": self.cfg.name, "arm": assigned, "exposure_id": eid}
        return results  # type: ignore[return-value]

    def _arm(self, rec, arm, r: dict, state) -> tuple[dict, list[float], bool, str | None]:
        """(response, propensities, explored, model version) of one request served by `arm`."""
        k = r["k"]
        n = max(k, arm.pool) if arm.epsilon > 0 else k
        if arm.baseline == "random":
            excluded = rec._excluded(state, r["exclude_seen"])
            candidates = np.setdiff1d(np.arange(len(rec.items)), excluded)
            picked = self._rng.permutation(candidates)[:k]
            items = [rec._item(int(t), 0.0) for t in picked]
            p = 1.0 / max(len(candidates), 1)  # a uniformly random k-permutation: each item at each position 1/M
            return rec._response(items, False) | {"model_version": "baseline:random"}, [p] * len(items), True, None
        if arm.baseline == "popularity":
            ranked = rec._popular(n, rec._excluded(state, r["exclude_seen"]))
            base, version = rec._response(ranked, False) | {"model_version": "baseline:popularity"}, None
        else:
            model = self.arm_models.get(arm.model, rec) if arm.model != self.main_alias else rec
            base = model.recommend_many([r["user_id"]], n, r["exclude_seen"], r["diversity"])[0]
            ranked, version = base["items"], base["model_version"]
        slate = explore_slate(np.arange(len(ranked)), k, arm.epsilon, arm.pool, self._rng)
        chosen = [ranked[int(j)] for j in slate.items]
        out = {**base, "items": chosen}
        if len(chosen) >= k:
            out.pop("short", None)
        if r.get("explain") and arm.model is not None:
            from serving.explain import explain

            out = explain(model, r["user_id"], out)
        return out, slate.propensities.tolist(), slate.explored, version
