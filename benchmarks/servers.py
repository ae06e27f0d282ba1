"""The servers under test of the HTTP benchmarks (serve_load, serve_faults, fuzz, consent_latency), on 127.0.0.1.

`prepared_model` gives the model named by --model/--tracking-uri/--store-url, or trains a small
synthetic one (MLflow sqlite registry + feature store, about a minute on 2 cores) into a temporary
directory; `ray_serve` starts trustrec on a Ray of its own from a Serve config (serving.launch.start)
and stops it; `bare_server` runs benchmarks/bare_server.py (FastAPI + ONNX Runtime, no Ray) in a
subprocess; `private_ray_token` gives every Ray a process starts one token in a private file.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from harness import REPO

INGRESSES = ("haproxy", "proxy")


@dataclass
class Model:
    uri: str | None  # None: the one the Serve config names
    tracking_uri: str | None
    store_url: str | None


def model_flags(p: argparse.ArgumentParser, ingress: bool = False) -> None:
    """--model, --tracking-uri, --store-url, --config and, with `ingress`, --ingress."""
    p.add_argument("--model", help="artifact dir or models:/name@alias (default: train a small synthetic model)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI resolving --model")
    p.add_argument("--store-url", help="feature store URL (user histories)")
    p.add_argument("--config", default=str(REPO / "configs" / "serve.yaml"), help="Ray Serve config (default configs/serve.yaml)")
    if ingress:
        p.add_argument("--ingress", choices=INGRESSES, default="haproxy",
                       help="HTTP data plane of every Ray target: haproxy (Ray Serve 2.60's HAProxy, direct to replicas; default) or proxy (Ray's Python proxy)")


def train_small_model(root: Path, epochs: int = 5) -> Model:
    """A real synthetic training run (registry alias champion, feature store) into `root`."""
    from training.config import load_config
    from training.pipeline import train

    overrides = [
        f"tracking.tracking_uri=sqlite:///{root}/mlflow.db",
        f"export.output_dir={root}/artifacts",
        f"store.url=sqlite:///{root}/features.db",
        f"trainer.checkpoint_dir={root}/checkpoints",
        f"trainer.epochs={epochs}",
        "trainer.progress=false",
    ]
    train(load_config(REPO / "configs" / "two_tower.yaml", overrides))
    return Model("models:/trustrec@champion", f"sqlite:///{root}/mlflow.db", f"sqlite:///{root}/features.db")


@contextlib.contextmanager
def prepared_model(args: argparse.Namespace) -> Iterator[Model]:
    """The model named by --model/--tracking-uri/--store-url, or a freshly trained small one."""
    if args.model:
        yield Model(args.model, args.tracking_uri, args.store_url)
        return
    with tempfile.TemporaryDirectory(prefix="trustrec-bench-") as tmp:
        print("training a small synthetic model (no --model given) ...", flush=True)
        started = time.perf_counter()
        model = train_small_model(Path(tmp))
        print(f"  trained in {time.perf_counter() - started:.0f} s", flush=True)
        yield model


@contextlib.contextmanager
def private_ray_token() -> Iterator[str | None]:
    """Ray >= 2.60 token auth for every Ray this process starts, with one random token in a private
    0600 file (never ~/.ray), removed at the end; a caller's own RAY_AUTH_* wins (yields None).
    One token for the whole run: serving.launch.stop() removes a token file it created but leaves
    RAY_AUTH_TOKEN_PATH naming it, so a second start() in the same process would find it gone."""
    if any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="trustrec-bench-auth-"))  # 0700
    token = folder / "ray_auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"], os.environ["RAY_AUTH_TOKEN_PATH"] = "token", str(token)
    try:
        yield str(token)
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        shutil.rmtree(folder, ignore_errors=True)


def trustrec_app(raw: dict) -> dict:
    """The trustrec application of a parsed Serve config."""
    return next(a for a in raw["applications"] if a.get("name", "trustrec") == "trustrec")


@contextlib.contextmanager
def ray_serve(config: str | Path, model: Model, num_cpus: int | None = None, ingress: str = "proxy") -> Iterator[str]:
    """Ray Serve from `config` (its deployments, replicas, batching) serving `model` through
    `ingress` (serving/ingress.py) on a free port; yields the base URL."""
    import yaml

    from serving.ingress import free_port  # below the ephemeral range: Ray's own sockets cannot take it first
    from serving.launch import start, stop

    os.environ.setdefault("RAY_ADDRESS", "local")  # a cluster of our own, never one already running on the machine
    raw = yaml.safe_load(Path(config).read_text())
    args = trustrec_app(raw).setdefault("args", {})
    args.pop("model_uri", None)  # the model comes through start(model_uri=...)
    args["store_url"] = model.store_url
    if model.tracking_uri:
        args["tracking_uri"] = model.tracking_uri
    with tempfile.TemporaryDirectory(prefix="trustrec-serve-") as tmp:
        path = Path(tmp) / "serve.yaml"
        path.write_text(yaml.safe_dump(raw))
        try:
            yield start(path, model_uri=model.uri, port=free_port(), num_cpus=num_cpus or os.cpu_count(), ingress=ingress)
        finally:
            stop()


@contextlib.contextmanager
def bare_server(model: Model, timeout_s: float = 120.0) -> Iterator[str]:
    """benchmarks/bare_server.py in a subprocess; yields its base URL once /healthz answers."""
    import requests

    from serving.ingress import free_port

    port = free_port()
    cmd = [sys.executable, str(REPO / "benchmarks" / "bare_server.py"), "--model", model.uri, "--port", str(port)]
    cmd += ["--tracking-uri", model.tracking_uri] if model.tracking_uri else []
    cmd += ["--store-url", model.store_url] if model.store_url else []
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bare_server.py exited with {proc.returncode}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}/healthz not ready after {timeout_s:.0f} s")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
