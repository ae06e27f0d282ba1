"""The audit log: who did what to whose data, and which model served, append-only.

Entries: consent and preference changes, events accepted, data exports, erasures (features/consent.py,
called by both the HTTP API and the CLI), model swaps and authentication failures (serving/).
An entry is `{ts_ms, at, action, subject, actor, detail}`:

- `subject`: `FeatureStore.subject_hash(user_id)`, the HMAC of the id under the erasure salt (the
  value the user's tombstone holds), never the id itself; None for entries about no user (model swaps).
  `trustrec audit-log --user ID` hashes ID the same way to find them, before and after an erasure.
- `actor`: "admin", "user", "anonymous", "cli" or "replica:<id>"; never a token.
- `detail`: counts, purposes, flags and versions only. No user ids, item ids, genre names or
  free text a client sent: the entries outlive an erasure, so they must hold nothing erasure removes.

Sinks (both optional, see serving/config.py AuditArgs): the store table `audit_log`, where an entry
about a change to the store is written in the same transaction as the change (`record(..., conn=)`),
so neither exists without the other; and a JSON-lines file, one line per entry appended with a
single write, after the change committed. Erasure never deletes audit rows (they are keyed by
`subject`, not `user_id`, and `audit_log` is not one of the store's USER_TABLES).
No torch, no serving imports: the CLI and every replica use this module as is.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from sqlalchemy import insert, select

from features.store import FeatureStore, audit_table

log = logging.getLogger(__name__)

ACTIONS = ("consent", "preferences", "event", "export", "erasure", "model_swap", "model_swap_refused", "auth_failure", "promotion_gate")


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


class AuditLog:
    """Writes entries to the store table and/or a JSON-lines file; reads them back (`entries`).

    `store` hashes user ids (`subject`) and, with `table=True`, holds the `audit_log` table. With
    neither sink (no store or table=False, and no path) recording is a no-op."""

    def __init__(self, store: FeatureStore | None, table: bool = True, path: str | Path | None = None):
        self.store = store
        self.table = bool(table) and store is not None
        self.path = Path(path).expanduser() if path else None

    @property
    def enabled(self) -> bool:
        return self.table or self.path is not None

    def subject(self, user_id: str) -> str | None:
        """The keyed hash an entry holds for `user_id` (None without a store to hash with)."""
        return self.store.subject_hash(str(user_id)) if self.store is not None else None

    def record(self, action: str, subject: str | None, actor: str, detail: dict | None = None, conn: Any = None) -> dict:
        """Append one entry; returns it. `subject` is a hash from `subject()`, never a raw id.

        With `conn` (the caller's open store transaction) the table row joins that transaction and
        the file line is NOT written here: the caller passes the entry to `committed()` once the
        transaction committed, so a change that rolled back leaves no line. Without `conn` both
        sinks are written now (the table row in a transaction of its own)."""
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r} (one of {', '.join(ACTIONS)})")
        ts = time.time_ns() // 1_000_000
        entry = {"ts_ms": ts, "at": _iso(ts), "action": action, "subject": subject, "actor": str(actor), "detail": dict(detail or {})}
        if self.table:
            row = {k: entry[k] for k in ("ts_ms", "action", "subject", "actor")} | {"detail": json.dumps(entry["detail"], sort_keys=True)}
            if conn is not None:
                conn.execute(insert(audit_table), [row])
            else:
                with self.store.transaction() as c:  # type: ignore[union-attr]
                    c.execute(insert(audit_table), [row])
        if conn is None:
            self.committed(entry)
        return entry

    def committed(self, entry: dict | None) -> None:
        """Write the file line of an entry recorded inside a transaction that has now committed."""
        if entry is None or self.path is None:
            return
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        # O_APPEND and one write(2) per line: replicas and the CLI may append at once without
        # interleaving; opened per entry, so a rotated file is simply created again; 0600: the
        # entries say who exercised which right when.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:  # its directory is not there yet
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, flags, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    # ---- reading ------------------------------------------------------------------------------
    def entries(self, subject: str | None = None, action: str | None = None, since_ms: int | None = None) -> list[dict]:
        """Entries oldest first, filtered by subject hash, action and time (ms, inclusive); from the
        table when it is a sink (the transactional record), else from the file."""
        if self.table:
            rows = self._table_entries(subject, action, since_ms)
        else:
            rows = (e for e in self._file_entries() if (subject is None or e.get("subject") == subject)
                    and (action is None or e.get("action") == action) and (since_ms is None or int(e.get("ts_ms", 0)) >= since_ms))
        return list(rows)

    def _table_entries(self, subject: str | None, action: str | None, since_ms: int | None) -> Iterator[dict]:
        t = audit_table
        q = select(t).order_by(t.c.ts_ms, t.c.id)
        if subject is not None:
            q = q.where(t.c.subject == subject)
        if action is not None:
            q = q.where(t.c.action == action)
        if since_ms is not None:
            q = q.where(t.c.ts_ms >= since_ms)
        with self.store.engine.connect() as conn:  # type: ignore[union-attr]
            rows = conn.execute(q).all()
        for r in rows:
            yield {"ts_ms": int(r.ts_ms), "at": _iso(int(r.ts_ms)), "action": r.action, "subject": r.subject, "actor": r.actor, "detail": json.loads(r.detail)}

    def _file_entries(self) -> Iterable[dict]:
        if self.path is None or not self.path.exists():
            return []
        out = []
        with self.path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:  # a torn line (a crash mid-write) is skipped, with a warning
                        log.warning("%s:%d: not a JSON line; skipped", self.path, n)
        return sorted(out, key=lambda e: int(e.get("ts_ms", 0)))  # stable: file order breaks ties
