"""The servers under test of the HTTP benchmarks (serve_load, serve_faults, fuzz, consent_latency,
experiment_overhead), on 127.0.0.1, and their open-loop load client.

`prepared_model` gives the model named by --model/--tracking-uri/--store-url, or trains a small
synthetic one (MLflow sqlite registry + feature store, about a minute on 2 cores) into a temporary
directory; `ray_serve` starts trustrec on a Ray of its own from a Serve config (serving.launch.start)
and stops it; `bare_server` runs benchmarks/bare_server.py (FastAPI + ONNX Runtime, no Ray) in a
subprocess; `private_ray_token` gives every Ray a process starts one token in a private file.
`open_loop_run` fires POST /v1/recommend on a fixed schedule (aiohttp on uvloop; serve_load.py's
doc says how it counts), `settle` waits for a server to drain its backlog.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import harness
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


def train_small_model(root: Path) -> Model:
    """A real synthetic training run (registry alias champion, feature store) into `root`."""
    from training.config import load_config
    from training.pipeline import train

    tracking, store = f"sqlite:///{root}/mlflow.db", f"sqlite:///{root}/features.db"
    overrides = [f"tracking.tracking_uri={tracking}", f"export.output_dir={root}/artifacts", f"store.url={store}",
                 f"trainer.checkpoint_dir={root}/checkpoints", "trainer.epochs=5", "trainer.progress=false"]  # fmt: skip
    train(load_config(REPO / "configs" / "two_tower.yaml", overrides))
    return Model("models:/trustrec@champion", tracking, store)


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
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
            os.environ.pop(key, None)
        shutil.rmtree(folder, ignore_errors=True)


def trustrec_app(raw: dict) -> dict:
    """The trustrec application of a parsed Serve config."""
    return next(a for a in raw["applications"] if a.get("name", "trustrec") == "trustrec")


@contextlib.contextmanager
def ray_serve(config: str | Path, model: Model, ingress: str = "proxy", **app_args) -> Iterator[str]:
    """Ray Serve from `config` (its deployments, replicas, batching) serving `model` through
    `ingress` (serving/ingress.py) on a free port, on every core, `app_args` set in the app's
    args (experiment=...); yields the base URL."""
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
    args.update(app_args)
    with tempfile.TemporaryDirectory(prefix="trustrec-serve-") as tmp:
        path = Path(tmp) / "serve.yaml"
        path.write_text(yaml.safe_dump(raw))
        try:
            yield start(path, model_uri=model.uri, port=free_port(), ingress=ingress)
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
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.25)
        else:  # no break: it exited, or never answered
            why = f"exited with {proc.returncode}" if proc.returncode is not None else f"{url}/healthz not ready after {timeout_s:.0f} s"
            raise RuntimeError(f"bare_server.py: {why}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------- the open-loop load client


@dataclass
class Outcome:
    sent_at: float  # the scheduled send, time.perf_counter()
    latency_ms: float  # from the scheduled send
    ok: bool  # HTTP 200
    detail: str = ""  # what failed: "STATUS body" or the transport error


def request_body(user_id: str, k: int, diversity: float | None) -> dict:
    """POST /v1/recommend's body: no "diversity" field for None (the config's default)."""
    return {"user_id": user_id, "k": k} if diversity is None else {"user_id": user_id, "k": k, "diversity": diversity}


def summarize(latencies_ms: list[float], errors: int, n: int, seconds: float) -> dict:
    """Percentiles of the successful requests (None when there were none)."""
    achieved = round(len(latencies_ms) / seconds, 1) if seconds > 0 else 0.0
    return {"requests": n, "ok": len(latencies_ms), "errors": errors, "achieved_rps": achieved, **harness.stats(latencies_ms)}


def latency_summary(values_ms: list[float]) -> dict:
    return harness.stats(values_ms, ("n", "p50", "p99", "max"))


TIMEOUT_KINDS = ("timeout", "unfinished")  # error kinds (lower case, substring) that are timeouts


def error_classes(kinds: dict[str, int]) -> dict[str, int]:
    """Error kinds as open_loop counts them ("HTTP 503", "ServerTimeoutError", "unfinished", ...) in
    three classes: 503 (shed by admission control), timeout (no answer in time), other."""
    out = {"503": 0, "timeout": 0, "other": 0}
    for kind, n in kinds.items():
        out["503" if kind == "HTTP 503" else "timeout" if any(t in kind.lower() for t in TIMEOUT_KINDS) else "other"] += n
    return out


async def open_loop(url: str, users: list[str], k: int, rate: float, duration: float, timeout: float, diversity: float | None = None,
                    stop: threading.Event | None = None, outcomes: list[Outcome] | None = None) -> dict:
    """Fire POST /v1/recommend at `rate` per second for `duration` s (or until `stop` is set) on a
    fixed schedule, request i for users[i % len(users)]; see serve_load.py's doc. `outcomes`: one
    Outcome per request appended as it answers."""
    import aiohttp

    n = max(1, int(rate * duration))
    body = {u: json.dumps(request_body(u, k, diversity)).encode() for u in dict.fromkeys(users)}
    by_status: dict[int, list[float]] = {200: []}  # latency of every answer, by HTTP status
    # the same from the moment the client really sent it: what the server took, without the client's own lag
    since_send: dict[int, list[float]] = {200: []}
    samples: dict[str, str] = {}  # the first body of each non-200 status: who answered it (replica, HAProxy, proxy)
    errors: Counter = Counter()
    lag: list[float] = []
    conn = aiohttp.TCPConnector(limit=1024, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    async with aiohttp.ClientSession(connector=conn, timeout=client_timeout, headers={"content-type": "application/json"}) as session:
        async def one(i: int, scheduled: float) -> None:
            sent, detail = time.perf_counter(), ""
            lag.append((sent - scheduled) * 1e3)
            try:
                async with session.post(f"{url}/v1/recommend", data=body[users[i % len(users)]]) as r:
                    data = await r.read()
                    done = time.perf_counter()
                    by_status.setdefault(r.status, []).append((done - scheduled) * 1e3)
                    since_send.setdefault(r.status, []).append((done - sent) * 1e3)
                    if r.status != 200:
                        errors[f"HTTP {r.status}"] += 1
                        samples.setdefault(str(r.status), data[:120].decode(errors="replace"))
                        detail = f"{r.status} {data[:200].decode(errors='replace')}"
            except Exception as e:  # timeouts, resets: all count as errors, by kind
                errors[type(e).__name__] += 1
                detail = repr(e)[:200]
            if outcomes is not None:  # a failure always has a detail
                outcomes.append(Outcome(scheduled, (time.perf_counter() - scheduled) * 1e3, not detail, detail))

        # times from perf_counter: uvloop's loop.time() is libuv's cached millisecond clock, which
        # rounded every latency to whole milliseconds (and to the loop's last wake-up)
        t0 = time.perf_counter() + 0.05
        tasks = []
        for i in range(n):
            if stop is not None and stop.is_set():
                break
            scheduled = t0 + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, scheduled)))
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            errors["unfinished"] += len(pending)
        elapsed = time.perf_counter() - t0
    out = summarize(by_status[200], sum(errors.values()), len(tasks), elapsed)
    out.update(target_rps=rate, diversity=diversity, error_kinds=dict(errors), error_classes=error_classes(errors))
    out["non_200_latency_ms"] = {str(s): latency_summary(v) for s, v in sorted(by_status.items()) if s != 200}
    out["latency_since_send_ms"] = {str(s): latency_summary(v) for s, v in sorted(since_send.items()) if v}
    out["non_200_body_sample"] = samples
    out["client_send_lag_p99_ms"] = harness.stats(lag, ("p99",))["p99_ms"]
    return out


def open_loop_run(*args, **kwargs) -> dict:
    """open_loop on uvloop's event loop, the client's own garbage collector off while it fires: a full
    collection over its tens of thousands of pending tasks paused it for ~0.5 s, and it then sent the
    backlog as one burst (a stall and a spike charged to whichever server was under test, the bare one included)."""
    import gc

    import uvloop

    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(open_loop(*args, **kwargs))
    finally:
        gc.enable()
        gc.unfreeze()
        gc.collect()


def settle(url: str, limit_s: float = 60.0) -> float:
    """Wait until /healthz answers within 100 ms (a server left with a backlog by the previous
    rate drains it first, so each rate starts from an idle server); returns the seconds waited."""
    import requests

    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        t = time.monotonic()
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200 and time.monotonic() - t < 0.1:
                break
        time.sleep(0.5)
    return round(time.monotonic() - started, 1)
