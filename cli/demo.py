"""`trustrec demo` / `make demo`: train on synthetic data, register @champion, serve it with
Ray Serve on 127.0.0.1, ask for a few recommendations over HTTP, shut down cleanly. It drives both
wings (training.pipeline, then serving.launch), so it lives in cli/, above them."""
from __future__ import annotations

import time

import requests

from training.config import load_config
from training.pipeline import train


def _print_answer(user_id: str, answer: dict) -> None:
    kind = "personalized" if answer["personalized"] else "popularity fallback (unknown user)"
    print(f"\nPOST /v1/recommend user_id={user_id!r}: {kind}; model version {answer['model_version']} on {answer['provider']}")
    for rank, item in enumerate(answer["items"], 1):
        print(f"  {rank:>2}. {item['item_id']:<8} {item['title'][:48]:<48} score {item['score']:.3f}")


def run_demo(config: str, serve_config: str, overrides: list[str]) -> int:
    from serving.launch import start, stop

    started = time.monotonic()
    result = train(load_config(config, overrides))
    test = {k: v for k, v in result.metrics.items() if k.startswith(("test/", "baseline/popularity/ndcg"))}
    print("\nTest metrics: " + "  ".join(f"{k}={v:.3f}" for k, v in test.items()))
    print(f"MLflow run {result.run_id}; registered model version {result.model_version} (alias champion)")

    url = start(serve_config)
    try:
        print(f"\nRay Serve is up at {url} (OpenAPI: {url}/docs); health: {requests.get(f'{url}/healthz', timeout=10).json()}")
        for user_id in ("u1", "u42", "someone-new"):
            response = requests.post(f"{url}/v1/recommend", json={"user_id": user_id, "k": 5}, timeout=30)
            response.raise_for_status()
            _print_answer(user_id, response.json())
    finally:
        stop()
    print(f"\nRay Serve stopped. Demo took {time.monotonic() - started:.0f}s.")
    print("Compare runs in the MLflow UI: `make mlflow-ui`, then open http://127.0.0.1:5000")
    return 0
