"""The exposure log of experiments and the outcomes that join to it.

Every list served inside an experiment is one exposure: a random id (returned to the client, which
sends it back with outcomes), the time, the user's subject hash (`FeatureStore.subject_hash`: never
the id), experiment, assigned and served arm, model version, whether the logging policy explored,
and per shown item its id, score and propensity (bundle/policy.py). Outcomes (`POST /v1/events`
with an `exposure_id`: click, rating, purchase, dwell) join by that id.

Writes leave the request path: `ExposureLog.append` puts the row on a bounded in-memory queue
(O(1), no I/O) and a background thread inserts batches; when the queue is full the row is dropped
and counted (`dropped`), never blocking a request — the report states drops, so a lossy log is
visible. Both tables are append-only; erasure deletes a user's rows by subject hash
(features/consent.py `erase_user`), so erased users leave every later analysis.
"""
from __future__ import annotations

import hmac
import json
import logging
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select

from features.consent import now_ms
from features.store import FeatureStore, exposures_table, outcomes_table

log = logging.getLogger(__name__)

OUTCOME_KINDS = ("click", "rating", "purchase", "dwell")


class OutcomeError(ValueError):
    """A bad outcome, naming the field (`exposure_id`, `kind`, `value`, `item_id`): a 4xx, never a 500."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def new_exposure_id() -> str:
    return secrets.token_hex(16)


@dataclass(frozen=True)
class Exposure:
    exposure_id: str
    subject: str
    experiment: str
    arm: str
    served: str | None
    model_version: str | None
    explored: bool
    items: list[tuple[str, float, float]]  # (item id, score, propensity) in position order
    ts_ms: int

    def row(self) -> dict[str, Any]:
        return {"exposure_id": self.exposure_id, "ts_ms": self.ts_ms, "subject": self.subject, "experiment": self.experiment,
                "arm": self.arm, "served": self.served, "model_version": self.model_version, "explored": self.explored,
                "items": json.dumps([[i, round(float(s), 6), float(p)] for i, s, p in self.items], separators=(",", ":"))}  # fmt: skip


class ExposureLog:
    """Bounded, append-only, off the request path (module docstring). One per replica."""

    def __init__(self, store: FeatureStore, capacity: int = 10_000, batch: int = 1_000, interval_s: float = 0.1):
        self.store, self.capacity, self.batch, self.interval_s = store, capacity, batch, interval_s
        self.dropped = 0
        self.written = 0
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._flush_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="exposure-log", daemon=True)
        self._thread.start()

    def append(self, exposure: Exposure) -> bool:
        """Queue one exposure; False (and counted) when the queue is full."""
        if len(self._queue) >= self.capacity:
            self.dropped += 1
            return False
        self._queue.append(exposure.row())
        if len(self._queue) >= self.batch:
            self._wake.set()
        return True

    def flush(self) -> int:
        """Write everything queued now (also called before an outcome's lookup misses)."""
        n = 0
        with self._flush_lock:
            while self._queue:
                rows = [self._queue.popleft() for _ in range(min(self.batch, len(self._queue)))]
                try:
                    with self.store.transaction() as conn:
                        conn.execute(insert(exposures_table), rows)
                except Exception:  # the store is down: these rows are lost, counted, and the request path never noticed
                    self.dropped += len(rows)
                    log.exception("exposure log: %d rows dropped (store write failed)", len(rows))
                    continue
                n += len(rows)
        self.written += n
        return n

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._queue:
                self.flush()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.flush()


def record_outcome(store: FeatureStore, user_id: str, exposure_id: str, kind: str, value: float = 1.0, item_id: str | None = None,
                   exposure_log: ExposureLog | None = None, wait_s: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """Join an outcome to the user's exposure. An id that is not this user's exposure is refused as
    unknown (it never says whose it is); the item must be one the exposure showed.

    An exposure may still sit in a replica's queue: this replica's (`exposure_log`) is flushed at
    once; another replica's is written within its flush interval, so a miss is looked up again for
    up to `wait_s` (serving passes twice the interval) before the id is called unknown."""
    if kind not in OUTCOME_KINDS:
        raise OutcomeError("kind", f"must be one of {', '.join(OUTCOME_KINDS)}")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise OutcomeError("value", "must be a finite number")
    if kind in ("click", "purchase") and value not in (0, 1):
        raise OutcomeError("value", f"a {kind} is 1 (or 0 for an explicit non-{kind})")
    if kind == "dwell" and value < 0:
        raise OutcomeError("value", "dwell seconds cannot be negative")
    if not isinstance(exposure_id, str) or not 1 <= len(exposure_id) <= 64:
        raise OutcomeError("exposure_id", "must be the id a recommendation returned")
    query = select(exposures_table.c.subject, exposures_table.c["items"]).where(exposures_table.c.exposure_id == exposure_id)
    with store.reading() as conn:
        row = conn.execute(query).first()
    if row is None and exposure_log is not None and exposure_log.flush():  # still queued here: write it, then look again
        with store.reading() as conn:
            row = conn.execute(query).first()
    deadline = time.monotonic() + wait_s
    while row is None and time.monotonic() < deadline:  # queued on another replica: its writer is due within wait_s
        time.sleep(0.01)
        with store.reading() as conn:
            row = conn.execute(query).first()
    subject = store.subject_hash(user_id)
    if row is None or not hmac.compare_digest(row.subject, subject):
        raise OutcomeError("exposure_id", "unknown exposure for this user")
    position = None
    if item_id is not None:
        shown = [entry[0] for entry in json.loads(row.items)]
        if str(item_id) not in shown:
            raise OutcomeError("item_id", "was not shown in this exposure")
        position = shown.index(str(item_id))
    out = {"exposure_id": exposure_id, "subject": subject, "ts_ms": now_ms(), "kind": kind, "item_id": None if item_id is None else str(item_id),
           "position": position, "value": float(value)}  # fmt: skip
    with store.transaction() as conn:
        conn.execute(insert(outcomes_table), [out])
    return {"exposure_id": exposure_id, "kind": kind, "position": position, "recorded": True}


def exposures(store: FeatureStore, experiment: str) -> list[dict[str, Any]]:
    """The experiment's exposures, oldest first, with items decoded: what the report reads."""
    query = select(exposures_table).where(exposures_table.c.experiment == experiment).order_by(exposures_table.c.ts_ms, exposures_table.c.exposure_id)
    with store.snapshot() as conn:
        return [{**dict(r._mapping), "items": json.loads(r.items)} for r in conn.execute(query)]


def outcomes(store: FeatureStore, experiment: str) -> list[dict[str, Any]]:
    """The outcomes joined to the experiment's exposures, oldest first."""
    e, o = exposures_table, outcomes_table
    query = select(o).select_from(o.join(e, o.c.exposure_id == e.c.exposure_id)).where(e.c.experiment == experiment).order_by(o.c.id)
    with store.snapshot() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]
