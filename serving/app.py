"""Ray Serve application: a FastAPI ingress over one `Recommender` per replica.

(No `from __future__ import annotations` here: FastAPI must see the real request types.)

Run with `trustrec serve --config configs/serve.yaml` or `serve run configs/serve.yaml`
(import path `serving.app:build_app`). Binds 127.0.0.1 unless the config says otherwise.
"""

import logging

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from serving.config import AppArgs

log = logging.getLogger(__name__)

MAX_K = 100


class RecommendRequest(BaseModel):
    # numbers are accepted as ids ("user_id": 196) since many catalogs use numeric ids
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    user_id: str = Field(min_length=1, max_length=128)
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True
    diversity: float | None = Field(None, ge=0, le=1, description="MMR lambda: 1 = by score only, lower = more diverse")


class Item(BaseModel):
    item_id: str
    title: str
    score: float


class RecommendResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    items: list[Item]
    personalized: bool
    model_version: str
    provider: str


class Health(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    status: str
    model_version: str
    provider: str
    n_items: int


api = FastAPI(title="trustrec", description="Recommendations with consent and control built in", version="0.1.0")


@serve.deployment(name="Recommender")
@serve.ingress(api)
class RecommenderService:
    def __init__(self, args: dict):
        from features.store import FeatureStore
        from serving.recommender import Recommender

        cfg = AppArgs.model_validate(args)
        store = FeatureStore(cfg.store_url) if cfg.store_url else None
        self.recommender = Recommender.from_uri(cfg.model_uri, store, cfg.tracking_uri, cfg.force_cpu, cfg.diversity_lambda)
        log.info("loaded model version %s on %s", self.recommender.model_version, self.recommender.provider)

    @api.post("/v1/recommend", response_model=RecommendResponse)
    def recommend(self, request: RecommendRequest) -> dict:
        return self.recommender.recommend(request.user_id, request.k, request.exclude_seen, request.diversity)

    @api.get("/healthz", response_model=Health)
    def healthz(self) -> dict:
        r = self.recommender
        return {"status": "ok", "model_version": r.model_version, "provider": r.provider, "n_items": len(r.items)}


def make_app(args: dict | None = None, deployment_options: dict | None = None) -> serve.Application:
    """The bound application; validates args before any replica starts."""
    cfg = AppArgs.model_validate(args or {})
    deployment = RecommenderService.options(**deployment_options) if deployment_options else RecommenderService
    return deployment.bind(cfg.model_dump())


def build_app(args: dict) -> serve.Application:
    """Builder for `serve run` (exactly one dict parameter, as Serve requires; Serve applies the
    YAML's `deployments` section itself)."""
    return make_app(args)
