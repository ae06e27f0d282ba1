"""`LoopBatcher`: the requests a replica's event loop has in hand become one model call.

Why not `@serve.batch`: at the rates 2 cores serve (150 requests/s per replica), a batch is almost
always one request, and Serve's batch queue (an asyncio.Queue, a background task, a future per
request, an extra loop wake-up and the hand-over to a worker thread) cost more CPU than the
recommendation itself: 0.22 ms of a replica's ~2 ms per request (docs/BENCHMARKS.md, "Load").

How it batches: a request joins `pending`; the first one schedules a flush with `call_soon`
(or `call_later(wait_s)`), so every request the loop parses in the same turn (or within `wait_s`)
runs in the same call, at most `max_batch_size` per call, in arrival order. A flush runs the
function in the loop itself (`inline`: a local store answers in microseconds, and no thread hop or
GIL hand-off is paid) or in a worker thread (a networked store could stall the loop for a round
trip); with a thread, one batch runs at a time and requests keep queueing behind it, so the next
batch takes everything that arrived meanwhile, as `@serve.batch` does.

An exception in the function fails every request of that batch with it (each caller gets it), and
never the next batch. A request whose caller went away (client disconnect: its task cancelled)
is skipped if its batch has not started.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class LoopBatcher:
    def __init__(self, fn: Callable[[list[Any]], list[Any]], max_batch_size: int = 16, wait_s: float = 0.0, inline: bool = True,
                 on_batch: Callable[[int], None] | None = None):
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError(f"max_batch_size {max_batch_size} must be >= 1 and wait_s {wait_s} >= 0")
        self.fn, self.max_batch_size, self.wait_s, self.inline, self.on_batch = fn, max_batch_size, wait_s, inline, on_batch
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._scheduled = False  # a flush is scheduled (call_soon / call_later)
        self._running = False  # a threaded batch is in flight

    async def submit(self, item: Any) -> Any:
        """`fn([... item ...])`'s answer for `item`, from the batch it joined."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future))
        if not self._scheduled and not self._running:
            self._schedule(loop)
        return await future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = True
        if self.wait_s > 0 and len(self._pending) < self.max_batch_size:
            loop.call_later(self.wait_s, self._flush)
        else:
            loop.call_soon(self._flush)

    def _take(self) -> list[tuple[Any, asyncio.Future]]:
        batch: list[tuple[Any, asyncio.Future]] = []
        while self._pending and len(batch) < self.max_batch_size:
            item, future = self._pending.pop(0)
            if not future.done():  # cancelled callers are dropped before any work is done for them
                batch.append((item, future))
        return batch

    def _flush(self) -> None:
        self._scheduled = False
        batch = self._take()
        loop = asyncio.get_running_loop()
        if batch:
            if self.inline:
                self._settle(batch, *self._call(batch))
            else:
                self._running = True
                loop.create_task(self._threaded(batch))
                return  # the next flush is scheduled when this batch is done
        if self._pending:
            self._schedule(loop)

    async def _threaded(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results, error = await asyncio.to_thread(self._call, batch)
            self._settle(batch, results, error)
        finally:
            self._running = False
            if self._pending and not self._scheduled:
                self._schedule(asyncio.get_running_loop())

    def _call(self, batch: list[tuple[Any, asyncio.Future]]) -> tuple[list[Any] | None, BaseException | None]:
        try:
            results = self.fn([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} requests")
            return results, None
        except Exception as e:  # noqa: BLE001 - handed to every caller of this batch
            return None, e

    def _settle(self, batch: list[tuple[Any, asyncio.Future]], results: list[Any] | None, error: BaseException | None) -> None:
        if self.on_batch is not None:
            self.on_batch(len(batch))
        for i, (_, future) in enumerate(batch):
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(results[i])  # type: ignore[index]
