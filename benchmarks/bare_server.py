"""Baseline server for benchmarks/serve_load.py: FastAPI + ONNX Runtime under uvicorn, no Ray.

    python benchmarks/bare_server.py --model models:/trustrec@champion --tracking-uri sqlite:///mlflow.db \
        --store-url sqlite:///data/features.db --port 8001

Serves the same endpoints as the Ray Serve app (`POST /v1/recommend`, `GET /healthz`) with the
same request/response models (imported from serving.app; importing it starts no Ray), over one
in-process `Recommender`. Handlers are `async def` calling the Recommender directly: one request
computes at a time and the event loop is the queue, the least overhead one Python process can
have. What this costs less than Ray Serve is Ray Serve's overhead (proxy, handle, batching).
Binds 127.0.0.1 only. (No `from __future__ import annotations`: FastAPI must see the real types.)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and siblings by name
import harness  # noqa: E402,F401  (puts the repository on sys.path)


def make_api(recommender):
    from fastapi import FastAPI

    from serving.app import Health, RecommendRequest, RecommendResponse

    api = FastAPI(title="trustrec-bare", version="0.1.0")

    @api.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(request: RecommendRequest) -> dict:
        return recommender.recommend(request.user_id, request.k, request.exclude_seen, request.diversity)

    @api.get("/healthz", response_model=Health)
    async def healthz() -> dict:
        return {"status": "ok", "model_version": recommender.model_version, "provider": recommender.provider, "n_items": len(recommender.items)}

    return api


def main(argv=None) -> int:
    p = harness.parser(__doc__)
    p.add_argument("--model", required=True, help="artifact dir or models:/name@alias")
    p.add_argument("--tracking-uri", help="MLflow tracking URI that resolves a models:/ URI")
    p.add_argument("--store-url", help="feature store URL (omit: everyone gets popularity)")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args(argv)

    import uvicorn

    from features.store import FeatureStore
    from serving.recommender import Recommender

    store = FeatureStore(args.store_url) if args.store_url else None
    recommender = Recommender.from_uri(args.model, store, args.tracking_uri)
    uvicorn.run(make_api(recommender), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
