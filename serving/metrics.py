"""trustrec's own Prometheus metrics, next to Ray Serve's built-ins (`ray_serve_*`).

Ray's metrics agent exports them on the node's metrics port (`ray.init(_metrics_export_port=N)`,
then `curl 127.0.0.1:N/metrics`) with a `ray_` prefix and the deployment / replica / application
tags Ray Serve adds, e.g. `ray_trustrec_request_latency_ms_bucket{route="/v1/recommend",...}`.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ray.serve import metrics

log = logging.getLogger(__name__)

# request latency buckets (ms): the goals are p99 <= 20 ms, so resolution sits below that
LATENCY_BOUNDARIES_MS = [1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 100, 250, 500, 1000, 2500]


class Deferred:
    """Metric records taken off the request path: queued, and written by one event-loop callback
    `delay_s` later (or at once outside an event loop, e.g. in a worker thread).

    Why: a Ray metric record costs ~50-65 µs of replica CPU when the replica was idle (py-spy at
    100 requests/s), two per request, and ran before the answer left the replica. Deferred, the
    same records are written after the answer is sent, mostly in idle time; Prometheus scrapes
    every few seconds, so a 50 ms lag is invisible there."""

    def __init__(self, delay_s: float = 0.05):
        self.delay_s = delay_s
        self._queue: list[tuple[Callable, tuple]] = []

    def __call__(self, fn: Callable, *args) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: record now (the queue belongs to the loop's thread)
            fn(*args)
            return
        self._queue.append((fn, args))
        if len(self._queue) == 1:
            loop.call_later(self.delay_s, self.flush)

    def flush(self) -> None:
        queue, self._queue = self._queue, []
        for fn, args in queue:
            try:
                fn(*args)
            except Exception:  # one bad record must not lose the others (nor surface in a request)
                log.exception("metric record failed")


class RouteMetrics:
    """What the HTTP routes see: latency per route inside the replica, model call included."""

    def __init__(self) -> None:
        self.latency = metrics.Histogram(
            "trustrec_request_latency_ms",
            description="Latency of trustrec HTTP routes inside the replica (ms), batching and model call included.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("route", "status"),
        )

    def observe(self, route: str, status: str, seconds: float) -> None:
        self.latency.observe(seconds * 1000.0, tags={"route": route, "status": status})


class ModelMetrics:
    """What the model deployment sees: fallbacks (popularity, execution provider) and the provider in use."""

    def __init__(self) -> None:
        self.fallbacks = metrics.Counter(
            "trustrec_fallbacks",
            description="Fallbacks: kind=popularity (user unknown, popularity list served), "
            "kind=provider (ONNX Runtime fell back from the preferred execution provider).",
            tag_keys=("kind",),
        )
        self.provider = metrics.Gauge(
            "trustrec_onnx_provider",
            description="1 for the ONNX Runtime execution provider and model version this replica serves with, 0 for the ones it stopped using.",
            tag_keys=("provider", "model_version"),
        )
        self.batch_size = metrics.Histogram(
            "trustrec_batch_size",
            description="Requests per ONNX call (serving/batching.py LoopBatcher).",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        self._current: tuple[str, str] | None = None

    def popularity_fallbacks(self, n: int) -> None:
        if n:
            self.fallbacks.inc(n, tags={"kind": "popularity"})

    def refresh(self) -> None:
        """Re-record the provider gauge (called every health check): Ray drops series not recorded for a while."""
        if self._current:
            self.provider.set(1, tags={"provider": self._current[0], "model_version": self._current[1]})

    def serving_with(self, provider: str, model_version: str, requested: str | None) -> None:
        """Record a (re)loaded model: provider gauge moves to it; a provider fallback is counted."""
        if self._current and self._current != (provider, model_version):
            self.provider.set(0, tags={"provider": self._current[0], "model_version": self._current[1]})
        self.provider.set(1, tags={"provider": provider, "model_version": model_version})
        self._current = (provider, model_version)
        if requested and requested != provider:
            self.fallbacks.inc(1, tags={"kind": "provider"})
