"""Ray Serve application: one deployment that is both the FastAPI ingress and the batching model.

(No `from __future__ import annotations` here: FastAPI must see the real request types.)

    HTTP proxy -> Model replica (FastAPI routes: validation, auth, latency metric
                                 -> LoopBatcher over Recommender.recommend_many in the same process)

One hop, because every hop is a Ray actor call and on a 2-core host each one cost more than the
model itself: the earlier Ingress -> Model split answered a lone request in 19.5 ms against
~3 ms for bare FastAPI + ONNX Runtime (docs/BENCHMARKS.md, "Load"). Each replica still
batches the requests in flight on it into one ONNX call (`serving/batching.py`), takes its model URI
through `user_config` so a new version is swapped in place (`reconfigure`: no restart, no failed
request), and its `check_health` really runs the ONNX session and queries the feature store.
Two or more replicas keep the app answering when one dies: the proxy routes around it.

`ModelServer` is the model half as a plain class (unit-tested without Ray); `Model` adds the routes
and is the deployment. Run with `trustrec serve --config configs/serve.yaml` or
`serve run configs/serve.yaml` (import path `serving.app:build_app`). Binds 127.0.0.1 unless the
config says otherwise.
"""

import asyncio
import logging
import time

import numpy as np
from fastapi import Depends
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from serving.audit import audit_log, record_model_swap
from serving.batching import LoopBatcher
from serving.config import MODEL_DEPLOYMENT, AppArgs, ModelConfig
from serving.http import CleanStr, FiniteFloat, StrictBool, StrictInt, TrustrecAPI, configure_http
from serving.metrics import Deferred, ModelMetrics, RouteMetrics
from serving.users_api import (
    AUTH_RESPONSES, ConsentRequest, ConsentResponse, EventRequest, EventResponse, ModelCard, Preferences,
    PreferencesRequest, Reason, Receipt, UserData, UserIdPath, UsersService, bearer, model_card,
)

log = logging.getLogger(__name__)

MAX_K = 100


class RecommendRequest(BaseModel):
    # numbers are accepted as ids ("user_id": 196) since many catalogs use numeric ids; every other
    # field is strict (no "5" or true for k, no 1 / 0 for a boolean, no NaN): serving/http.py
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    user_id: CleanStr = Field(min_length=1, max_length=128)
    k: StrictInt = Field(10, ge=1, le=MAX_K)
    exclude_seen: StrictBool = True
    diversity: FiniteFloat | None = Field(None, ge=0, le=1, description="MMR lambda: 1 = by score only, lower = more diverse")
    explain: StrictBool = Field(False, description="give every item its reasons (serving/explain.py)")


class Item(BaseModel):
    item_id: str
    title: str
    score: float
    reasons: list[Reason] | None = None  # only with explain: true


class Short(BaseModel):
    requested: int
    returned: int
    reason: str


class RecommendResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    items: list[Item]
    personalized: bool
    model_version: str
    provider: str
    short: Short | None = Field(None, description="present only when fewer than k items came back, with how many and why")
    experiment: str | None = Field(None, description="the experiment this list was served in (absent outside experiments)")
    arm: str | None = Field(None, description="the user's assigned arm (sticky); 'holdout' when kept outside the experiment")
    exposure_id: str | None = Field(None, description="send it back with POST /v1/events to join the outcome to this list")
    reasons_withheld: bool | None = Field(None, description="explain was asked without the user's own or the admin token: reasons are personal data, so none are given")


class Health(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    status: str
    model_version: str
    provider: str
    n_items: int
    swap_error: str | None = Field(None, description="the last model swap this replica refused (it kept serving model_version)")


class Unhealthy(BaseModel):
    status: str
    detail: str


def probe(recommender, store) -> None:
    """serving.recommender.probe (imported when first called, as Recommender is here)."""
    from serving.recommender import probe as probe_model_and_store

    probe_model_and_store(recommender, store)


def recommend_batch(recommender, requests: list[dict]) -> list[dict]:
    """Answer a batch of RecommendRequest dicts, in request order, with one recommend_many call per
    distinct (k, exclude_seen, diversity)."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault((r["k"], r["exclude_seen"], r["diversity"]), []).append(i)
    results: list = [None] * len(requests)
    for (k, exclude_seen, diversity), idx in groups.items():
        for i, out in zip(idx, recommender.recommend_many([requests[i]["user_id"] for i in idx], k, exclude_seen, diversity)):
            results[i] = out
    for i, r in enumerate(requests):
        if r.get("explain"):
            from serving.explain import explain

            results[i] = explain(recommender, r["user_id"], results[i])
    return results


def route_logs_to_serve() -> None:
    """Send our own loggers (`serving`, `features`: swaps, refusals, erasure receipts by hash;
    `bundle`: the ONNX Runtime provider in use, a fallback) to the replica's log file at Serve's
    level. Ray Serve writes only the `ray.serve` logger there; ours would otherwise stop at the
    worker's root logger (WARNING), and the INFO lines never appear."""
    serve_logger = logging.getLogger("ray.serve")
    for name in ("serving", "features", "bundle"):
        ours = logging.getLogger(name)
        for handler in serve_logger.handlers:
            if handler not in ours.handlers:
                ours.addHandler(handler)
        if serve_logger.handlers:
            ours.setLevel(serve_logger.getEffectiveLevel())
            ours.propagate = False  # once in the replica file, not again through the root logger


class ModelServer:
    """One Recommender per replica; the model comes from `user_config` (ModelConfig) and can be swapped live.
    A plain class (the deployment `Model` below adds the HTTP routes), so it is tested without Ray."""

    def __init__(self, args: dict):
        from features.store import FeatureStore

        self.cfg = AppArgs.model_validate(args)
        route_logs_to_serve()
        self.store = FeatureStore(self.cfg.store_url, consent=self.cfg.consent) if self.cfg.store_url else None
        if self.store is not None:  # a salt that cannot match the tombstones would personalize erased users: refuse to start
            self.store.check_erasure_salt()
        self.audit = audit_log(self.cfg.audit, self.store)  # model swaps here; the user-data routes audit through UsersService
        self.recommender = None  # set by reconfigure, which Serve calls right after __init__
        self.model_uri: str | None = None
        self.swap_error: str | None = None  # why the last swap was refused (the old model kept serving)
        self.metrics = ModelMetrics()
        self.deferred = Deferred()  # metric records written after the answer is sent (serving/metrics.py)
        # a local store (SQLite, or none) answers in microseconds: batches run in the event loop itself,
        # with no thread hop and no GIL hand-off; a networked store could stall the loop for a round
        # trip, so its batches go to a worker thread (serving/batching.py)
        self.experiment = None
        if self.cfg.experiment is not None:
            from serving.experiment import ExperimentRouter

            self.experiment = ExperimentRouter(self.cfg.experiment, self.store, self.cfg.exposure_log_capacity)
        inline = self.store is None or self.store.engine.dialect.name == "sqlite"
        self.batcher = LoopBatcher(self._recommend_batch, self.cfg.max_batch_size, self.cfg.batch_wait_timeout_s, inline)

    async def reconfigure(self, user_config: dict) -> None:
        """Load the model `user_config` names, probe it, then swap it in: requests keep being served
        by the old model while the new one loads (in a thread), and never see a half-loaded one."""
        from serving.recommender import Recommender
        from bundle.runtime import preferred_providers

        cfg = ModelConfig.model_validate(user_config or {})
        c = self.cfg
        arms: dict = {}
        try:
            new = await asyncio.to_thread(Recommender.from_uri, cfg.model_uri, self.store, c.tracking_uri, c.force_cpu, c.diversity_lambda, c.index.model_dump(), c.user_cache_size)
            await asyncio.to_thread(probe, new, self.store)
            if self.experiment is not None:  # every arm's model swaps with the main one, or none does
                from serving.experiment import arm_uris

                for alias, uri in arm_uris(self.experiment.cfg, cfg.model_uri).items():
                    arms[alias] = await asyncio.to_thread(Recommender.from_uri, uri, self.store, c.tracking_uri, c.force_cpu, c.diversity_lambda, c.index.model_dump(), c.user_cache_size)
                    await asyncio.to_thread(probe, arms[alias], self.store)
        except Exception as e:
            if self.recommender is None:
                raise  # a replica with no model must not start
            # Raising here would make Serve kill this healthy replica and start ones that fail the same
            # way (a full outage); keep serving the old model and say so in /healthz and the log.
            self.swap_error = f"{cfg.model_uri}: {type(e).__name__}: {e}"[:500]
            log.error("model swap refused, still serving version %s: %s", self.recommender.model_version, self.swap_error)
            await asyncio.to_thread(record_model_swap, self.audit, self.recommender.model_version, None, cfg.model_uri, self.swap_error)
            return
        self.swap_error = None
        old_version = self.recommender.model_version if self.recommender else None
        self.recommender, self.model_uri = new, cfg.model_uri
        if self.experiment is not None:
            self.experiment.set_models(cfg.model_uri, arms)
        await asyncio.to_thread(record_model_swap, self.audit, old_version, new.model_version, cfg.model_uri)
        self.metrics.serving_with(new.provider, new.model_version, (preferred_providers(c.force_cpu) or [None])[0])
        log.info("model version %s -> %s (%s) on %s", old_version, new.model_version, cfg.model_uri, new.provider)

    def _recommend_batch(self, requests: list[dict]) -> list[dict]:
        """One batch of RecommendRequest dicts (the LoopBatcher's function), with one model for the
        whole batch even if a swap lands meanwhile."""
        rec = self.recommender
        results = self.experiment.answer(rec, requests, recommend_batch) if self.experiment is not None else recommend_batch(rec, requests)
        self.deferred(self.metrics.batch_size.observe, len(requests))
        self.deferred(self.metrics.popularity_fallbacks, sum(not r["personalized"] for r in results))
        return results

    async def batched_recommend(self, request: dict) -> dict:
        """The answer to one request, from the batch it joins (serving/batching.py)."""
        return await self.batcher.submit(request)

    def health(self) -> dict:
        """What /healthz reports, after a real probe of this replica's model and store."""
        rec = self.recommender
        if rec is None:
            raise RuntimeError("no model loaded")
        probe(rec, self.store)
        body = {"status": "ok", "model_version": rec.model_version, "provider": rec.provider, "n_items": len(rec.items)}
        if self.swap_error:
            body["swap_error"] = self.swap_error
        return body

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising marks the replica unhealthy and replaces it."""
        self.health()
        self.metrics.refresh()

    def model_card(self) -> dict:
        return model_card(self.recommender)

    def __del__(self) -> None:
        """Graceful shutdown (after in-flight requests drained): release the store's connections."""
        experiment = getattr(self, "experiment", None)
        if experiment is not None:
            experiment.close()  # writes the exposures still queued
        store = getattr(self, "store", None)
        if store is not None:
            store.close()


# a body that is not UTF-8 (or not parseable at all, e.g. a number of over 4300 digits) is refused by
# FastAPI with 400 before validation: documented, so clients (and the fuzz) expect it
BODY_UNREADABLE = {400: {"description": "the request body could not be decoded (not UTF-8, or not parseable as JSON)"}}
# what UsersApi._run answers besides 200/401/403/422 (found undocumented by the fuzz: benchmarks/fuzz.py)
USER_RESPONSES = {
    **AUTH_RESPONSES,
    404: {"description": "no data held for this user"},
    409: {"description": "this user id was erased and cannot be reused"},
    503: {"description": "authentication or the feature store is not configured"},
}
# TrustrecAPI (serving/http.py): 413 / 415 before parsing, a bounded 422, offline /docs, and
# /v1/recommend's bearer token shown as optional unless args.auth.protect_recommend
api = TrustrecAPI(
    title="trustrec", description="Recommendations with consent and control built in", version="0.1.0",
    responses=BODY_UNREADABLE, optional_auth_paths=["/v1/recommend"],
)


@serve.deployment(name=MODEL_DEPLOYMENT)
@serve.ingress(api)
class Model(ModelServer):
    """The deployment: ModelServer plus the HTTP routes, in one replica (one hop per request)."""

    def __init__(self, args: dict):
        super().__init__(args)
        configure_http(self.cfg)  # body limit and OpenAPI security of this replica's app (serving/http.py)
        self.routes = RouteMetrics()
        self.users = UsersService(self.cfg, self.store, self.audit)  # consent, preferences, events, access, erasure (serving/users_api.py)
        self.users.exposure_log = self.experiment.exposures if self.experiment is not None else None  # outcomes join exposures still queued

    @api.post("/v1/recommend", response_model=RecommendResponse, response_model_exclude_none=True)
    async def recommend(self, request: RecommendRequest, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        personal = self.users.authorize_recommend(request.user_id, credentials)
        query = request.model_dump()
        withheld = query["explain"] and not personal  # reasons name the user's history and stated genres: owner or admin only
        query["explain"] = query["explain"] and personal
        start, status = time.perf_counter(), "error"
        try:
            result = await self.batched_recommend(query)  # joins this replica's next batch
            status = "ok"
            # the dict is RecommendResponse's shape by construction (tests check it against the schema);
            # answered as is, without FastAPI validating it into the model and serializing it back
            return JSONResponse({**result, "reasons_withheld": True} if withheld else result)
        finally:
            self.deferred(self.routes.observe, "/v1/recommend", status, time.perf_counter() - start)

    @api.get("/healthz", response_model=Health, response_model_exclude_none=True, responses={503: {"model": Unhealthy, "description": "model or feature store unusable"}})
    async def healthz(self):
        start = time.perf_counter()
        try:
            body = await asyncio.to_thread(self.health)
        except Exception as e:  # any failure of the probe is "unhealthy", said plainly, never a 500
            self.routes.observe("/healthz", "unhealthy", time.perf_counter() - start)
            return JSONResponse({"status": "unhealthy", "detail": f"{type(e).__name__}: {e}"[:500]}, status_code=503)
        self.routes.observe("/healthz", "ok", time.perf_counter() - start)
        return body

    # customer control: thin routes, the work is in serving/users_api.py
    @api.put("/v1/users/{user_id}/consent", response_model=ConsentResponse, responses=USER_RESPONSES)
    async def put_consent(self, body: ConsentRequest, user_id: str = UserIdPath, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        return await self.users.put_consent(user_id, body, credentials)

    @api.put("/v1/users/{user_id}/preferences", response_model=Preferences, responses=USER_RESPONSES)
    async def put_preferences(self, body: PreferencesRequest, user_id: str = UserIdPath, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        return await self.users.put_preferences(user_id, body, credentials)

    @api.post("/v1/events", response_model=EventResponse, response_model_exclude_none=True, responses=USER_RESPONSES)
    async def post_event(self, body: EventRequest, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        return await self.users.post_event(body, credentials)

    @api.get("/v1/users/{user_id}/data", response_model=UserData, responses=USER_RESPONSES)
    async def get_user_data(self, user_id: str = UserIdPath, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        return await self.users.get_data(user_id, credentials)

    @api.delete("/v1/users/{user_id}", response_model=Receipt, responses=USER_RESPONSES)
    async def delete_user(self, user_id: str = UserIdPath, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        return await self.users.delete_user(user_id, credentials)

    @api.get("/v1/model", response_model=ModelCard)
    async def get_model_card(self) -> dict:
        return self.model_card()


def make_app(args: dict | None = None) -> serve.Application:
    """The bound application (one deployment); validates args before any replica starts.
    `args.model_uri` is the model's default `user_config`; a config file's `user_config` wins."""
    cfg = AppArgs.model_validate(args or {})
    return Model.options(user_config=ModelConfig(model_uri=cfg.model_uri).model_dump()).bind(cfg.model_dump())


def build_app(args: dict) -> serve.Application:
    """Builder for `serve run` (exactly one dict parameter, as Serve requires; Serve applies the
    YAML's `deployments` section itself)."""
    return make_app(args)
