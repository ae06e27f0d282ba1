"""Start / stop the Ray Serve app on loopback (used by `trustrec serve`, the demo and tests)."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from serving.config import AppArgs, load_serve_config

log = logging.getLogger(__name__)

APP_NAME = "trustrec"


def absolute_urls(args: AppArgs) -> AppArgs:
    """Pin relative sqlite paths and model dirs to this process's cwd: replicas run elsewhere."""

    def fix_sqlite(url: str | None) -> str | None:
        prefix = "sqlite:///"
        if url and url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(Path(url[len(prefix) :]).resolve())
        return url

    model_uri = args.model_uri if "://" in args.model_uri or args.model_uri.startswith("models:/") else str(Path(args.model_uri).resolve())
    return args.model_copy(update={"tracking_uri": fix_sqlite(args.tracking_uri), "store_url": fix_sqlite(args.store_url), "model_uri": model_uri})


def start(config_path: str | Path, model_uri: str | None = None, port: int | None = None, num_cpus: int | None = None, host: str | None = None) -> str:
    """Start Ray (if needed) and the app; returns the base URL once /healthz answers."""
    import ray
    from ray import serve

    from serving.app import make_app

    http, args, entry = load_serve_config(config_path)
    if model_uri:
        args = args.model_copy(update={"model_uri": model_uri})
    args = absolute_urls(args)
    port, host = port or http.port, host or http.host
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    options = next((dict(d) for d in entry.get("deployments") or [] if d.get("name") == "Recommender"), {})
    options.pop("name", None)
    serve.run(make_app(args.model_dump(), options), name=APP_NAME, route_prefix=entry.get("route_prefix", "/"), blocking=False)
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    _wait_healthy(url)
    return url


def _wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/healthz not ready after {timeout_s:.0f}s")
        time.sleep(0.25)


def stop() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def serve_forever(config_path: str | Path, model_uri: str | None = None, port: int | None = None, host: str | None = None) -> None:
    url = start(config_path, model_uri, port, host=host)
    print(f"trustrec serving on {url}  (OpenAPI: {url}/docs; Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
