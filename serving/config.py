"""Serving settings. `configs/serve.yaml` is a Ray Serve config file (so `serve run` takes
it as is); `trustrec serve` reads the same file: http_options + the application's args."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bundle.topk import ANN_KIND, ANN_MIN_ITEMS, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M
from features.config import ConsentConfig
from features.experiments import ExperimentConfig

MODEL_DEPLOYMENT = "Model"  # the deployment that batches over the Recommender and takes the model URI via user_config


class IndexArgs(BaseModel):
    """How the Recommender searches the item matrix (`bundle.topk.build_index`); figures: benchmarks/ann.py."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["auto", "exact", "hnsw", "ivf"] = "auto"  # auto: exact scan below ann_min_items items, ann_kind from there
    ann_min_items: int = Field(ANN_MIN_ITEMS, ge=1)  # below ~1e5 items the exact scan takes a few ms, is exact, and needs no build
    ann_kind: Literal["hnsw", "ivf"] = ANN_KIND  # the approximate index "auto" picks (see bundle/topk.py for the measured why)
    hnsw_m: int = Field(HNSW_M, ge=2)  # graph links per node: recall@100 vs memory (M=32: +256 B per item)
    hnsw_ef_construction: int = Field(HNSW_EF_CONSTRUCTION, ge=1)  # build beam: build time grows linearly with it
    hnsw_ef_search: int = Field(HNSW_EF_SEARCH, ge=1)  # search beam (raised to k): more = better recall, slower
    ivf_nlist: int = Field(0, ge=0)  # k-means lists; 0 = ~4 sqrt(items), FAISS's rule of thumb
    ivf_nprobe: int = Field(0, ge=0)  # lists scanned per query; 0 = nlist/32: recall@100 0.985 on the synthetic 1M catalog


class AuthArgs(BaseModel):
    """Bearer tokens for the user-data endpoints (serving/auth.py). The config names env vars
    only: a secret in YAML ends up in git and in Ray's stored app config."""

    model_config = ConfigDict(extra="forbid")
    admin_token_env: str = "TRUSTREC_ADMIN_TOKEN"  # operators: one token that may act for every user
    user_secret_env: str = "TRUSTREC_TOKEN_SECRET"  # per-user tokens are HMACs of the user id under this secret
    # /v1/recommend answers a list and reveals no stored data, so it stays open (as /healthz does)
    # for clients that have no token; true makes it ask for the user's (or the admin) token too.
    protect_recommend: bool = False


class AuditArgs(BaseModel):
    """The audit log (features/audit.py): consent, preferences, events, exports, erasures, model
    swaps, auth failures, keyed by a salted hash of the user id. `trustrec forget` / `export-user`
    read these settings from the same file, so the CLI writes where serving does."""

    model_config = ConfigDict(extra="forbid")
    # The store's `audit_log` table: each entry is written in the same transaction as the change it
    # records (neither exists without the other), every replica and the CLI share it with no setup,
    # and erasure keeps it (no raw ids in it). Needs store_url; false only where the file below is the record.
    table: bool = True
    # A JSON-lines file as well (append-only, 0600): off by default because each replica process appends
    # to it, so it must be a path on a disk that every replica and the CLI share; set it to feed a
    # log collector or keep a copy outside the database. Relative paths are from the working directory.
    path: str | None = None


class AppArgs(BaseModel):
    """The `args` of the trustrec application, validated (a typo fails with its name)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model_uri: str = "models:/trustrec@champion"
    tracking_uri: str = "sqlite:///mlflow.db"
    store_url: str | None = "sqlite:///data/features.db"
    force_cpu: bool = False
    diversity_lambda: float = Field(1.0, ge=0, le=1)  # MMR lambda when a request names none; 1 = plain ranking
    max_k: int = Field(100, gt=0)
    index: IndexArgs = IndexArgs()  # top-k search over the catalog: exact, or a FAISS index (IVF / HNSW) by catalog size
    # users whose store state (consent, history, profile, blocked items) a replica keeps between requests,
    # dropped whole whenever the store's change counter moves: 1.6 KB each measured (synthetic users, ~40
    # history items; tracemalloc over 1,000 users), so 10k users ~16 MB per replica; 0 = no cache
    user_cache_size: int = Field(10_000, ge=0)
    max_batch_size: int = Field(16, gt=0)  # requests one ONNX call takes at most (serving/batching.py)
    batch_wait_timeout_s: float = Field(0.002, ge=0)  # how long a batch waits to fill: latency bound at low load
    consent: ConsentConfig = ConsentConfig()  # opt-in / opt-out regime and the erasure salt's env var
    auth: AuthArgs = AuthArgs()  # who may read, change or erase a user's data
    # Request bodies over this many bytes get 413 before anything parses them (serving/http.py):
    # a body is parsed whole into Python objects, so without a bound one client can make a replica
    # parse megabytes per request. 64 KiB is ~4x the largest realistic request (a preferences PUT
    # blocking 1000 items of ~10-char ids is ~15 KB); a PUT filling all three lists to their
    # 1000-entry maximum with long ids needs it raised.
    max_body_bytes: int = Field(65536, ge=1024)
    audit: AuditArgs = AuditArgs()  # where the audit log goes: the store table (default) and/or a JSON-lines file
    # a controlled experiment (features/experiments.py, serving/experiment.py): arms, weights, control,
    # holdout; null = none. Its exposures queue in memory up to exposure_log_capacity per replica
    # (~1 KB each with 10 items: 10k = ~10 MB) and are written in batches off the request path
    experiment: ExperimentConfig | None = None
    exposure_log_capacity: int = Field(10_000, ge=1)


class ModelConfig(BaseModel):
    """The model deployment's `user_config`: changing it swaps the model in place (`reconfigure`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model_uri: str = "models:/trustrec@champion"


class HttpOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)


def load_serve_config(path: str | Path) -> tuple[HttpOptions, AppArgs, dict[str, Any]]:
    """(http options, app args, the raw application entry) from a Ray Serve config file."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    apps = raw.get("applications") or [{}]
    app = next((a for a in apps if a.get("name") == "trustrec"), apps[0])
    model = next((d for d in app.get("deployments") or [] if d.get("name") == MODEL_DEPLOYMENT), {})
    args = dict(app.get("args") or {})
    if (model.get("user_config") or {}).get("model_uri"):  # what the model deployment really loads
        args["model_uri"] = model["user_config"]["model_uri"]
    try:
        return HttpOptions.model_validate(raw.get("http_options") or {}), AppArgs.model_validate(args), app
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{path}: {bad}") from None
