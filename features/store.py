"""Online feature store: what serving needs per request (history, item metadata, popularity, profile).

SQLAlchemy Core over any URL (SQLite by default, PostgreSQL where several hosts share one store):
only portable constructs and bound parameters, never SQL built from strings, so ids cannot inject
SQL. Bulk loads replace everything in one transaction, so readers never see a half-written store.
Both backends are tested (tests/features run every store test on each; tests/pg.py starts the server).

What differs per backend, and why it is the same contract:
- write transactions (`transaction`): SQLite's BEGIN IMMEDIATE takes the one write lock first;
  PostgreSQL takes a transaction-scoped advisory lock first, so writers run one at a time there too
  and a count read inside a write cannot go stale before the write that uses it (erasure receipts,
  popularity adjustments), without serialization failures to retry;
- read snapshots (`snapshot`): SQLite's deferred BEGIN; PostgreSQL REPEATABLE READ, read-only;
- ids sort bytewise on both (PostgreSQL columns use the "C" collation; a database's default
  collation, en_US or ICU, would reorder ties in popularity and the training export's vocabularies);
- the change counter read on every request (`generation`): a plain sqlite3 connection on a SQLite
  file; on PostgreSQL one autocommit SELECT from a small pool of its own (no BEGIN / ROLLBACK round trips).

Customer control lives here too (the logic in features/consent.py): an append-only consent
ledger, blocked items, events recorded through the API, erasure tombstones (salted hashes, never
ids) and a change counter. A bulk load replaces the catalog, profiles and histories but keeps
those, and never brings back a user who was erased.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import mmap
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from sqlalchemy import (
    BigInteger, Boolean, Column, Float, Index, Integer, MetaData, Table, Text, bindparam, cast, create_engine, delete,
    event, func, insert, literal, select, union_all, update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

from features.schema import UNKNOWN_AGE, Dataset, Interactions

if TYPE_CHECKING:
    from features.config import ConsentConfig

log = logging.getLogger(__name__)

_CHUNK = 10_000  # rows per executemany batch
_IN_CHUNK = 500  # ids per IN (...) list, below every backend's bound-parameter limit

# Ids (user, item, subject hash, purpose, meta key): bytewise order on every backend. PostgreSQL's
# default collation comes from the cluster's locale; "C" is what SQLite does and the fastest to compare.
_Id = Text().with_variant(Text(collation="C"), "postgresql")
metadata = MetaData()
items_table = Table(
    "items", metadata,
    Column("item_id", _Id, primary_key=True),
    Column("title", Text, nullable=False),
    Column("genres", Text, nullable=False),  # genre names joined with "|"
    Column("year", Integer),  # NULL when unknown
)
users_table = Table(
    "users", metadata,
    Column("user_id", _Id, primary_key=True),
    Column("age", Integer),  # NULL when unknown
    Column("gender", Text),
    Column("occupation", Text),
    Column("liked_genres", Text, nullable=False),  # stated preferences, "|"-joined names
    Column("avoided_genres", Text, nullable=False),
    # Who owns the row (see FeatureStore.load_dataset): "import" rows come from a dataset load and
    # may be replaced by the next one; "api" rows were created by the user (or an operator) through
    # the API or CLI and no import deletes them. NULL: a row written before the column existed (import).
    Column("origin", Text),
    # When the user last stated liked/avoided genres through the API (unix ms); set, the store owns
    # those two columns and imports keep them. NULL: the dataset's values, which the next import replaces.
    Column("stated_ms", BigInteger),
)
interactions_table = Table(
    "interactions", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),  # chronological per user; tie-break
    Column("user_id", _Id, nullable=False),
    Column("item_id", _Id, nullable=False),
    Column("rating", Float, nullable=False),
    Column("ts", BigInteger, nullable=False),
    Index("ix_interactions_user_ts", "user_id", "ts", "seq"),
)
popularity_table = Table(
    "item_popularity", metadata,
    Column("item_id", _Id, primary_key=True),
    Column("count", Integer, nullable=False),
)
consent_table = Table(  # append-only: a change is a new row; only erasure deletes
    "consent_ledger", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),  # order of record, tie-break of equal times
    Column("user_id", _Id, nullable=False),
    Column("purpose", _Id, nullable=False),  # features.consent.PURPOSES
    Column("granted", Boolean, nullable=False),
    Column("ts_ms", BigInteger, nullable=False),  # unix milliseconds
    Column("source", Text, nullable=False),  # who recorded it: "api", "cli", a form name, ...
    Index("ix_consent_user_purpose", "user_id", "purpose", "id"),
)
blocked_table = Table(  # stated preference: items a user never wants to see
    "blocked_items", metadata,
    Column("user_id", _Id, primary_key=True),
    Column("item_id", _Id, primary_key=True),
)
events_table = Table(  # interactions recorded through the API after the last bulk load
    "events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", _Id, nullable=False),
    Column("item_id", _Id, nullable=False),
    Column("rating", Float, nullable=False),
    Column("ts", BigInteger, nullable=False),  # unix seconds, like interactions.ts
    Column("for_training", Boolean, nullable=False),  # `training` consent held when it was recorded
    Index("ix_events_user_ts", "user_id", "ts", "id"),
)
tombstones_table = Table(  # erased users: a salted hash of the id, never the id
    "tombstones", metadata,
    Column("subject_hash", _Id, primary_key=True),
    Column("erased_ms", BigInteger, nullable=False),
)
meta_table = Table(  # store id, salt fallback, genre order, change counter
    "store_meta", metadata,
    Column("key", _Id, primary_key=True),
    Column("value", Text, nullable=False),
)
audit_table = Table(  # append-only (features/audit.py): keyed by a hash of the id, so erasure keeps it
    "audit_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),  # order of record, tie-break of equal times
    Column("ts_ms", BigInteger, nullable=False),  # unix milliseconds
    Column("action", Text, nullable=False),  # features.audit.ACTIONS
    Column("subject", _Id),  # FeatureStore.subject_hash(user id), never the id; NULL: about no user (model swap)
    Column("actor", Text, nullable=False),  # admin / user / anonymous / cli / replica:<id>; never a token
    Column("detail", Text, nullable=False),  # JSON object: counts, purposes, versions; no ids
    Index("ix_audit_subject_ts", "subject", "ts_ms"),
)
privacy_ledger_table = Table(  # append-only (features/privacy_ledger.py): one row per private model released
    "privacy_ledger", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts_ms", BigInteger, nullable=False),  # unix milliseconds
    Column("snapshot", Text, nullable=False),  # features.datasets.snapshot_hash of the training data
    Column("mechanism", Text, nullable=False),  # e.g. "dp-sgd (opacus)", "federated client-level dp"
    Column("accountant", Text, nullable=False),
    Column("epsilon", Float, nullable=False),
    Column("delta", Float, nullable=False),
    Column("users", Integer, nullable=False),  # users the release covered when it was recorded
    Column("run_id", Text),  # the MLflow run, when tracked
)
privacy_spend_table = Table(  # who each release covered: the subject hash, never the id; erasure deletes a user's rows
    "privacy_spend", metadata,
    Column("entry_id", Integer, nullable=False),
    Column("subject_hash", _Id, nullable=False),
    Index("ix_privacy_spend_subject", "subject_hash"),
)
exposures_table = Table(  # append-only (features/exposures.py): each list served inside an experiment
    "exposures", metadata,
    Column("exposure_id", _Id, primary_key=True),  # 128 random bits, hex: the client's handle for outcomes
    Column("ts_ms", BigInteger, nullable=False),  # unix milliseconds
    Column("subject", _Id, nullable=False),  # FeatureStore.subject_hash(user id), never the id; erasure deletes by it
    Column("experiment", Text, nullable=False),
    Column("arm", Text, nullable=False),  # the assigned arm, or "holdout"
    Column("served", Text),  # the arm whose list was shown (NULL: the usual path: holdout, or no consent and no fallback)
    Column("model_version", Text),  # of the model that ranked the list (NULL for a baseline)
    Column("explored", Boolean, nullable=False),  # the logging policy's random branch drew the list
    Column("items", Text, nullable=False),  # JSON [[item_id, score, propensity], ...] in position order
    Index("ix_exposures_subject", "subject"),
    Index("ix_exposures_experiment_ts", "experiment", "ts_ms"),
)
outcomes_table = Table(  # append-only: what happened after an exposure (POST /v1/events with an exposure_id)
    "outcomes", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("exposure_id", _Id, nullable=False),
    Column("subject", _Id, nullable=False),  # as in exposures: a keyed hash, erasure deletes by it
    Column("ts_ms", BigInteger, nullable=False),
    Column("kind", Text, nullable=False),  # features.exposures.OUTCOME_KINDS
    Column("item_id", _Id),  # the shown item it is about (NULL: the list as a whole)
    Column("position", Integer),  # that item's position in the list, 0 first
    Column("value", Float, nullable=False),  # 1 for a click or purchase, the rating, the dwell seconds
    Index("ix_outcomes_exposure", "exposure_id"),
    Index("ix_outcomes_subject", "subject"),
)
# every table holding rows keyed by a user id: what erasure empties
USER_TABLES = (users_table, interactions_table, events_table, consent_table, blocked_table)
_EVENT_SEQ_OFFSET = 1 << 40  # events sort after bulk-loaded rows of the same timestamp


# Per-request reads, built once: composing a SQLAlchemy statement (the history's union in
# particular) cost more than running it, about 1 ms of the 1.4 ms a recommendation took
# (cProfile over Recommender.recommend, benchmarks/serve_load.py's model). `:uid` is bound per call.
def _history_rows() -> Any:
    t, e = interactions_table, events_table
    uid = bindparam("uid")
    return union_all(
        select(t.c.item_id, t.c.rating, t.c.ts, t.c.seq.label("seq")).where(t.c.user_id == uid),
        select(e.c.item_id, e.c.rating, e.c.ts, (e.c.id + literal(_EVENT_SEQ_OFFSET)).label("seq")).where(e.c.user_id == uid),
    ).subquery()


_rows = _history_rows()
HISTORY_OLDEST_FIRST = select(_rows.c.item_id, _rows.c.rating).order_by(_rows.c.ts, _rows.c.seq)
HISTORY_NEWEST_FIRST = select(_rows.c.item_id, _rows.c.rating).order_by(_rows.c.ts.desc(), _rows.c.seq.desc()).limit(bindparam("limit"))
PROFILE = select(users_table).where(users_table.c.user_id == bindparam("uid"))
ANY_TOMBSTONE = select(tombstones_table.c.subject_hash).limit(1)
TOMBSTONE = select(tombstones_table.c.subject_hash).where(tombstones_table.c.subject_hash == bindparam("h"))
META = select(meta_table.c.value).where(meta_table.c.key == bindparam("key"))
_GENERATION_SQL = f"SELECT value FROM {meta_table.name} WHERE key = 'generation'"
# PostgreSQL: the advisory lock every write transaction takes first (FeatureStore.transaction), one
# per database; a fixed 63-bit key (the first 8 bytes of sha256("trustrec.features.store")).
_PG_WRITE_LOCK = select(func.pg_advisory_xact_lock(int.from_bytes(hashlib.sha256(b"trustrec.features.store").digest()[:8], "big") >> 1))
del _rows


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL lets web-server readers proceed while a bulk load writes. secure_delete overwrites deleted
    rows with zeros (in their page and in freed pages): without it an erased user's id and history
    stay readable in the file's free space until SQLite happens to reuse it (FeatureStore.checkpoint
    then clears the WAL; tests/features/test_erasure_hygiene.py scans the raw bytes)."""
    cur = dbapi_conn.cursor()
    try:
        _set_wal(cur)
        cur.execute("PRAGMA secure_delete=ON")
    finally:
        cur.close()


def _set_wal(cur: Any, wait_s: float = 10.0) -> None:
    """Switch the file to WAL once (the mode persists in the file: later connections only read it).
    The switch needs the file to itself, and SQLite answers "database is locked" at once, without
    its busy handler, when connections opening a new file together all try it (its deadlock
    avoidance; replicas starting together hit it): so retry with a short backoff, bounded."""
    deadline = time.monotonic() + wait_s
    delay = 0.005
    while True:
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


class ErasureSaltError(ValueError):
    """The erasure salt at hand cannot match the store's tombstones (missing or different)."""


def salt_fingerprint(salt: bytes) -> str:
    """What the store keeps to recognise its erasure salt: an HMAC of a fixed text, not the salt."""
    return hmac.new(salt, b"trustrec-erasure-salt-fingerprint", hashlib.sha256).hexdigest()


def _split_genres(text: str | None) -> list[str]:
    return [g for g in (text or "").split("|") if g]


def _chunks(rows: Iterator[dict], size: int = _CHUNK) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class FeatureStore:
    """Point-query feature store; one instance may be shared by the threads of a web server."""

    def __init__(self, url: str, consent: "ConsentConfig | None" = None):
        from features.config import ConsentConfig

        self.consent = consent or ConsentConfig()
        self._salt: bytes | None = None
        parsed = make_url(url)
        kwargs: dict[str, Any] = {}
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False}
            if parsed.database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool  # one shared connection, else each sees its own empty db
            else:
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        if parsed.password:
            log.warning("the feature store URL holds a password: it would reach MLflow params (store.url) and error messages; "
                        "give PostgreSQL's password through PGPASSWORD or a passfile (?passfile=PATH) instead")
        self.engine = create_engine(parsed, **kwargs)
        # PostgreSQL's change-counter reads (every request): a small pool of its own whose connections are
        # autocommit from the start, read through a DBAPI cursor: one round trip, no BEGIN / ROLLBACK and no
        # per-checkout isolation switch (40-50 us against ~200 us through the main pool; 127.0.0.1, 2 busy cores)
        self._counter_engine = None if self.is_sqlite else create_engine(
            parsed, isolation_level="AUTOCOMMIT", pool_reset_on_return=None, pool_size=2, max_overflow=8)
        # the change counter is read on every request (serving's user cache): on a SQLite file, through
        # a plain sqlite3 connection per thread (2 us instead of SQLAlchemy's ~35 us; quiet cpu-2c)
        self._counter_db = str(Path(parsed.database).expanduser()) if self.is_sqlite and parsed.database not in (None, "", ":memory:") and not parsed.query else None
        self._counter_local = threading.local()
        self._counter_conns: list[sqlite3.Connection] = []
        self._counter_lock = threading.Lock()
        self._wal_index: mmap.mmap | None = None  # the -shm file's header, mapped read-only (generation())
        self._seen: tuple[bytes, int] | None = None  # (WAL-index header, counter) of the last counter read
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        # under the write lock, in one transaction (DDL is transactional on both): replicas starting
        # together on a new store create it once (unlocked, the second one's CREATE TABLE failed on SQLite)
        with self.transaction() as conn:
            metadata.create_all(conn)
            self._add_missing_columns(conn)
        self.store_id = self._meta_default("store_id", secrets.token_hex(8))  # tells a store's own exports apart
        self._meta_default("generation", "0")
        if not os.environ.get(self.consent.salt_env) and not self._has_tombstones():
            # the fallback salt is written now, not on first use: first use may be inside a write
            # transaction (an audit entry, an erasure), where a second writer would wait on it
            self._meta_default("erasure_salt", secrets.token_hex(32))

    def _add_missing_columns(self, conn: Any) -> None:
        """Bring a store created by an older trustrec up to this schema: create_all makes missing
        tables, not missing columns. Only nullable columns are ever added, so old rows stay valid."""
        from sqlalchemy import inspect

        insp = inspect(conn)
        for table in metadata.sorted_tables:
            have = {c["name"] for c in insp.get_columns(table.name)}
            for col in table.columns:
                if col.name not in have:
                    assert col.nullable, f"{table.name}.{col.name}: only nullable columns can be added to an existing store"
                    type_sql = col.type.compile(dialect=self.engine.dialect)
                    conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{col.name}" {type_sql}')  # names from our own schema, never input

    # ---- transactions ---------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """A write transaction whose reads are isolated too: it takes the store's write lock first
        (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction-scoped advisory lock), so writers run one
        at a time and a count read inside one cannot go stale before the delete that follows.
        Never open one inside another on the same thread: the inner one would wait on the outer."""
        with self.engine.begin() as conn:
            if self.is_sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:  # READ COMMITTED after the lock: every statement sees every writer that came before
                conn.execute(_PG_WRITE_LOCK)
            yield conn

    @contextmanager
    def snapshot(self) -> Iterator[Any]:
        """A read-only connection that sees one consistent state across several queries."""
        with self.engine.connect() as conn:
            if self.is_sqlite:
                conn.exec_driver_sql("BEGIN")  # pysqlite would otherwise run each SELECT on its own
            else:  # the snapshot is taken at the first SELECT; read-only refuses a stray write
                conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            yield conn

    # ---- store metadata, change counter, tombstone hashes ------------------------------------
    def _meta_default(self, key: str, value: str) -> str:
        """store_meta[key], set to `value` first if absent (safe when several replicas start at once)."""
        current = self.meta(key)
        if current is not None:
            return current
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(meta_table), [{"key": key, "value": value}])
        except IntegrityError:  # another process won the race; take its value
            pass
        return self.meta(key)  # type: ignore[return-value]

    def meta(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.scalar(META, {"key": key})

    def generation(self) -> int:
        """Counter bumped by every change to a user's data (consent, preferences, events, erasure,
        bulk load). A per-replica cache compares it per request to stay correct across replicas."""
        if self._counter_engine is not None:  # PostgreSQL: one autocommit SELECT, the latest committed value
            conn = self._counter_engine.raw_connection()
            try:
                cur = conn.cursor()
                cur.execute(_GENERATION_SQL)
                row = cur.fetchone()
                cur.close()
            except Exception:
                conn.invalidate()  # a broken connection (server restart) leaves the pool instead of failing again
                raise
            finally:
                conn.close()  # back to the pool
            return int(row[0]) if row else 0
        if self._counter_db is None:  # in-memory SQLite (one shared connection) or a URL with options
            return int(self.meta("generation") or 0)
        conn = getattr(self._counter_local, "conn", None)
        if conn is None:
            # autocommit (isolation_level None): each SELECT sees the last committed counter and holds no lock after it
            conn = sqlite3.connect(self._counter_db, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
            self._counter_local.conn = conn
            with self._counter_lock:
                self._counter_conns.append(conn)
        header = self._wal_header()
        seen = self._seen
        if header is not None and seen is not None and header == seen[0]:
            return seen[1]  # no transaction committed since that read: the counter cannot have moved
        row = conn.execute(_GENERATION_SQL).fetchone()
        value = int(row[0]) if row else 0
        if header is not None:
            self._seen = (header, value)  # the header read *before* the SELECT: a commit in between only makes the next check read again
        return value

    def _wal_header(self) -> bytes | None:
        """Both copies of the WAL-index header of this SQLite store (the first 96 bytes of its `-shm`
        file; https://www.sqlite.org/walformat.html, "The WAL-Index Header"), from a shared read-only
        mapping, or None where it cannot be trusted.

        Why: every write transaction that commits in WAL mode rewrites this header (its frame count,
        checksums and salts change with each commit, and with each WAL restart), and readers of
        every process learn of commits from it. So while it is byte-for-byte what it was at the
        last counter read, nothing has committed since, and the counter is what that read returned.
        Reading it is a memory access with the GIL held; the SELECT it replaces released the GIL,
        and in a replica whose HTTP thread is busy, getting the GIL back took up to Python's 5 ms
        switch interval (py-spy at 600 requests/s: 11 % of the replica's request time; a busy
        thread beside it: 2.4 µs alone, 0.8 ms mean). A header whose two copies differ (a writer
        is updating it), or one not initialised, means "read the counter". Only for a store in
        WAL mode (this class sets it) opened through this process's counter connection, which
        keeps the `-shm` file in place (SQLite removes or resets it only when no connection holds it)."""
        m = self._wal_index
        if m is None:
            m = self._map_wal_index()
            if m is None:
                return None
        header = m[:96]
        if header[:48] != header[48:] or header[12] != 1:  # copies disagree (a commit in flight) / isInit unset
            return None
        return header

    def _map_wal_index(self) -> mmap.mmap | None:
        """Map the `-shm` file's first 136 bytes read-only (after the counter connection has opened
        it: it holds the file in place); None when the store is not in WAL mode or has no such file yet."""
        if self._counter_db is None or getattr(self._counter_local, "conn", None) is None:
            return None
        with self._counter_lock:
            if self._wal_index is None:
                try:
                    fd = os.open(self._counter_db + "-shm", os.O_RDONLY)
                except OSError:
                    return None
                try:
                    if os.fstat(fd).st_size < 136:
                        return None
                    self._wal_index = mmap.mmap(fd, 136, mmap.MAP_SHARED, mmap.PROT_READ)
                finally:
                    os.close(fd)
        return self._wal_index

    @staticmethod
    def bump_generation(conn: Any) -> None:
        """Increment the change counter inside the caller's transaction (one atomic UPDATE)."""
        t = meta_table
        # BigInteger: SQLite's INTEGER is 64-bit already, PostgreSQL's is 32 (2^31 changes: weeks of events)
        conn.execute(update(t).where(t.c.key == "generation").values(value=cast(cast(t.c.value, BigInteger) + 1, Text)))

    def _erasure_salt(self) -> bytes:
        """The salt of tombstone hashes: $salt_env, else a random one kept in the store.

        A tombstone can only be matched with the salt it was written under, so a wrong salt would
        silently let an erased user back in (an import, a training run). The store keeps a
        fingerprint of the salt its tombstones use (`erasure_salt_fingerprint`, an HMAC of a fixed
        text: it does not reveal the salt) and refuses any other salt while tombstones exist."""
        if self._salt is not None:
            return self._salt
        env = os.environ.get(self.consent.salt_env) or None
        expected = self.meta("erasure_salt_fingerprint")
        stored = self.meta("erasure_salt")
        if env is not None:
            salt = env.encode()
        elif stored is not None:
            salt = stored.encode()
        elif expected is not None or self._has_tombstones():
            raise ErasureSaltError(
                f"{self.consent.salt_env} is not set, and this store holds erasure tombstones written under it: without that "
                f"salt, erased users cannot be recognised and would come back. Set {self.consent.salt_env} to the salt used at erasure."
            )
        else:
            salt = self._meta_default("erasure_salt", secrets.token_hex(32)).encode()  # normally written in __init__
        if env is None:
            log.warning("%s is not set: erasure tombstones use a salt kept in the store itself", self.consent.salt_env)
        if expected is not None and not hmac.compare_digest(expected, salt_fingerprint(salt)):
            where = f"{self.consent.salt_env} differs from" if env is not None else f"{self.consent.salt_env} is not set, and the store's own salt is not"
            raise ErasureSaltError(
                f"{where} the salt this store's erasure tombstones or privacy-ledger entries were written with: erased users would "
                f"not be recognised and would come back, and spent privacy budgets would read as unspent. Set {self.consent.salt_env} "
                f"to the salt used before (the store keeps its fingerprint)."
            )
        self._salt = salt
        return salt

    def _has_tombstones(self, conn: Any = None) -> bool:
        with self.reading(conn) as c:
            return c.scalar(ANY_TOMBSTONE) is not None

    def check_erasure_salt(self) -> None:
        """Raise ErasureSaltError now (at start-up, before any import, training or request) when the
        salt cannot match this store's tombstones; no-op for a store without erasures."""
        if self._has_tombstones() or self.meta("erasure_salt_fingerprint") is not None:
            self._erasure_salt()

    def record_salt_fingerprint(self, conn: Any) -> None:
        """Inside an erasure's transaction: remember which salt the store's tombstones use."""
        t = meta_table
        if conn.scalar(select(t.c.value).where(t.c.key == "erasure_salt_fingerprint")) is None:
            conn.execute(insert(t), [{"key": "erasure_salt_fingerprint", "value": salt_fingerprint(self._erasure_salt())}])

    def tombstone_count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(tombstones_table)) or 0)

    def subject_hash(self, user_id: str) -> str:
        """HMAC-SHA256 of the user id under the erasure salt: the tombstone key, and the only form
        of an id that may appear in logs."""
        return hmac.new(self._erasure_salt(), str(user_id).encode(), hashlib.sha256).hexdigest()

    def tombstoned(self, user_ids: list[str]) -> set[str]:
        """The subset of `user_ids` that were erased."""
        with self.engine.connect() as conn:
            if conn.scalar(select(tombstones_table.c.subject_hash).limit(1)) is None:
                return set()  # nothing erased yet: no hashing
            by_hash = {self.subject_hash(u): u for u in user_ids}
            found: set[str] = set()
            hashes = list(by_hash)
            for lo in range(0, len(hashes), _IN_CHUNK):
                part = hashes[lo:lo + _IN_CHUNK]
                found.update(conn.scalars(select(tombstones_table.c.subject_hash).where(tombstones_table.c.subject_hash.in_(part))))
        return {by_hash[h] for h in found}

    def is_erased(self, user_id: str, conn: Any = None) -> bool:
        """Whether the id was erased (on `conn` when the caller holds one)."""
        with self.reading(conn) as c:
            if c.scalar(ANY_TOMBSTONE) is None:
                return False  # nothing erased yet: no hashing
            return c.scalar(TOMBSTONE, {"h": self.subject_hash(user_id)}) is not None

    @contextmanager
    def reading(self, conn: Any = None) -> Iterator[Any]:
        """`conn` when the caller passes one (a snapshot, a transaction), else a pooled connection."""
        if conn is not None:
            yield conn
        else:
            with self.engine.connect() as c:
                yield c

    # ---- writes -------------------------------------------------------------------------
    def load_dataset(self, ds: Dataset, interactions: Interactions | None = None) -> None:
        """Import a dataset (and `interactions`, e.g. the train split) atomically, merging it with what
        customers told the store. Who owns what:

        - the dataset: the catalog (items, genres), bulk-loaded histories and popularity, and the
          demographics and default genre preferences of the users it holds; these are replaced;
        - the store (what users said through the API or CLI): the consent ledger, blocked items,
          recorded events, tombstones, genre preferences once stated (`users.stated_ms`), and users
          the API created (`users.origin = 'api'`), which no import deletes.

        Erased users (tombstones) are left out. A dataset exported from this very store (training
        with `data.source: store`) is not loaded back: it is a consent-filtered copy of it."""
        if ds.name == f"store:{self.store_id}":
            log.info("dataset %s was exported from this store; not loading it back", ds.name)
            return
        inter = ds.interactions if interactions is None else interactions
        if len(inter) and (inter.user.min() < 0 or inter.user.max() >= ds.n_users or inter.item.min() < 0 or inter.item.max() >= ds.n_items):
            raise ValueError("interactions reference user/item indices outside the dataset's vocabularies")
        erased = self.tombstoned(ds.user_vocab.ids)
        keep_user = np.array([u not in erased for u in ds.user_vocab.ids], dtype=bool)
        if erased:
            inter = inter.take(keep_user[inter.user])
            log.info("left out %d erased user(s) and their rows", len(erased))
        u = users_table
        with self.transaction() as conn:
            owned = {r.user_id: r for r in conn.execute(select(u).where((u.c.origin == "api") | u.c.stated_ms.is_not(None)))}
            for table in (popularity_table, interactions_table, users_table, items_table):
                conn.execute(delete(table))
            imported = (self._merged(r, owned.pop(r["user_id"], None)) for r, keep in zip(self._user_rows(ds), keep_user) if keep)
            for table, rows in (
                (items_table, self._item_rows(ds)),
                (users_table, imported),
                (interactions_table, self._interaction_rows(ds, inter)),
                (popularity_table, self._popularity_rows(ds, inter)),
            ):
                for batch in _chunks(rows):
                    conn.execute(insert(table), batch)
            # users the dataset does not hold: API-created rows stay whole; an imported user's stated
            # genres stay too, without the demographics the dataset no longer vouches for
            kept = [dict(r._mapping) if r.origin == "api" else {**r._mapping, "age": None, "gender": None, "occupation": None} for r in owned.values()]
            if kept:
                conn.execute(insert(users_table), kept)
            conn.execute(delete(meta_table).where(meta_table.c.key == "genre_names"))
            conn.execute(insert(meta_table), [{"key": "genre_names", "value": json.dumps(ds.genre_names)}])
            self.bump_generation(conn)

    @staticmethod
    def _merged(row: dict, owned: Any) -> dict:
        """A dataset user row merged with the store's row for the same id, where the store owns parts of it."""
        if owned is None:
            return row
        merged = {**row, "origin": owned.origin or "import"}
        if owned.stated_ms is not None:  # the user stated genres: theirs, not the dataset's
            merged.update(liked_genres=owned.liked_genres, avoided_genres=owned.avoided_genres, stated_ms=owned.stated_ms)
        return merged

    def upsert_user(
        self,
        user_id: str,
        *,
        age: int | None = None,
        gender: str | None = None,
        occupation: str | None = None,
        liked_genres: list[str] | tuple[str, ...] = (),
        avoided_genres: list[str] | tuple[str, ...] = (),
    ) -> None:
        """Create or replace one user's profile (demographics + stated genre preferences) as the
        user's own statement: the store owns the row from now on (no import replaces or deletes it)."""
        row = {
            "user_id": str(user_id), "age": age, "gender": gender or None, "occupation": occupation or None,
            "liked_genres": "|".join(liked_genres), "avoided_genres": "|".join(avoided_genres),
            "origin": "api", "stated_ms": time.time_ns() // 1_000_000,
        }  # fmt: skip
        with self.transaction() as conn:
            conn.execute(delete(users_table).where(users_table.c.user_id == row["user_id"]))
            conn.execute(insert(users_table), [row])
            self.bump_generation(conn)

    @staticmethod
    def _item_rows(ds: Dataset) -> Iterator[dict]:
        for i, item_id in enumerate(ds.item_vocab.ids):
            year = int(ds.items.year[i])
            yield {
                "item_id": item_id,
                "title": ds.items.title[i],
                "genres": "|".join(ds.genre_names[g] for g in ds.items.genres[i]),
                "year": year or None,
            }

    @staticmethod
    def _user_rows(ds: Dataset) -> Iterator[dict]:
        u = ds.users
        for i, user_id in enumerate(ds.user_vocab.ids):
            liked = u.liked_genres[i] if i < len(u.liked_genres) else ()
            avoided = u.avoided_genres[i] if i < len(u.avoided_genres) else ()
            yield {
                "user_id": user_id,
                "age": None if int(u.age[i]) == UNKNOWN_AGE else int(u.age[i]),
                "gender": u.gender[i] or None,
                "occupation": u.occupation[i] or None,
                "liked_genres": "|".join(ds.genre_names[g] for g in liked),
                "avoided_genres": "|".join(ds.genre_names[g] for g in avoided),
                "origin": "import",
                "stated_ms": None,
            }

    @staticmethod
    def _interaction_rows(ds: Dataset, inter: Interactions) -> Iterator[dict]:
        order = np.lexsort((np.arange(len(inter)), inter.timestamp, inter.user))  # seq = time order
        user_ids, item_ids = ds.user_vocab.ids, ds.item_vocab.ids
        for seq, r in enumerate(order.tolist()):
            yield {
                "seq": seq,
                "user_id": user_ids[inter.user[r]],
                "item_id": item_ids[inter.item[r]],
                "rating": float(inter.rating[r]),
                "ts": int(inter.timestamp[r]),
            }

    @staticmethod
    def _popularity_rows(ds: Dataset, inter: Interactions) -> Iterator[dict]:
        counts = np.bincount(inter.item, minlength=ds.n_items)
        for item_id, c in zip(ds.item_vocab.ids, counts.tolist()):
            yield {"item_id": item_id, "count": c}

    # ---- reads --------------------------------------------------------------------------
    def user_history(self, user_id: str, limit: int | None = None) -> list[str]:
        """Raw item ids the user interacted with, oldest -> newest; `limit` keeps the most recent."""
        return [item for item, _ in self.user_interactions(user_id, limit)]

    def user_interactions(self, user_id: str, limit: int | None = None, conn: Any = None) -> list[tuple[str, float]]:
        """(raw item id, rating) pairs, oldest -> newest, bulk-loaded rows and recorded events
        together; `limit` keeps the most recent. On `conn` when the caller holds one."""
        if limit is not None and limit <= 0:
            return []
        with self.reading(conn) as c:
            if limit is None:
                return [(r.item_id, r.rating) for r in c.execute(HISTORY_OLDEST_FIRST, {"uid": str(user_id)})]
            newest_first = [(r.item_id, r.rating) for r in c.execute(HISTORY_NEWEST_FIRST, {"uid": str(user_id), "limit": int(limit)})]
        return newest_first[::-1]

    def item_metadata(self, item_ids: list[str]) -> dict[str, dict]:
        """{item_id: {"title", "genres": [names], "year": int | None}}; unknown ids are left out."""
        t = items_table
        ids = list(dict.fromkeys(str(i) for i in item_ids))
        out: dict[str, dict] = {}
        with self.engine.connect() as conn:
            for lo in range(0, len(ids), _IN_CHUNK):
                for row in conn.execute(select(t).where(t.c.item_id.in_(ids[lo:lo + _IN_CHUNK]))):
                    out[row.item_id] = {"title": row.title, "genres": _split_genres(row.genres), "year": row.year}
        return out

    def popular_items(self, k: int) -> list[str]:
        """The k most interacted-with items (ties by item id), for cold-start fallbacks."""
        if k <= 0:
            return []
        t = popularity_table
        with self.engine.connect() as conn:
            return list(conn.scalars(select(t.c.item_id).order_by(t.c["count"].desc(), t.c.item_id).limit(k)))

    def user_profile(self, user_id: str, conn: Any = None) -> dict | None:
        """Demographics and stated preferences (None for unknown fields), or None for an unknown user."""
        with self.reading(conn) as c:
            row = c.execute(PROFILE, {"uid": str(user_id)}).first()
        if row is None:
            return None
        return {
            "user_id": row.user_id,
            "age": row.age,
            "gender": row.gender,
            "occupation": row.occupation,
            "liked_genres": _split_genres(row.liked_genres),
            "avoided_genres": _split_genres(row.avoided_genres),
        }

    def has_user(self, user_id: str) -> bool:
        t = users_table
        with self.engine.connect() as conn:
            return conn.execute(select(t.c.user_id).where(t.c.user_id == str(user_id)).limit(1)).first() is not None

    def holds_user(self, user_id: str) -> bool:
        """Any row about the user in any table (profile, history, events, consent, blocked items)."""
        with self.engine.connect() as conn:
            return any(
                conn.execute(select(t.c.user_id).where(t.c.user_id == str(user_id)).limit(1)).first() is not None for t in USER_TABLES
            )

    def genre_names(self) -> list[str]:
        """The catalog's genres: in the loaded dataset's order, else sorted from the items table."""
        stored = self.meta("genre_names")
        if stored is not None:
            return json.loads(stored)
        with self.engine.connect() as conn:
            return sorted({g for text in conn.scalars(select(items_table.c.genres)) for g in _split_genres(text)})

    def known_items(self, item_ids: list[str]) -> set[str]:
        """The subset of `item_ids` that are in the catalog."""
        t = items_table
        ids = list(dict.fromkeys(str(i) for i in item_ids))
        found: set[str] = set()
        with self.engine.connect() as conn:
            for lo in range(0, len(ids), _IN_CHUNK):
                found.update(conn.scalars(select(t.c.item_id).where(t.c.item_id.in_(ids[lo:lo + _IN_CHUNK]))))
        return found

    def checkpoint(self) -> bool:
        """After an erasure, take the erased rows' copies out of what the backend keeps beside its tables.

        SQLite: copy the WAL into the database file and truncate the WAL to zero bytes, so the
        pre-change pages it still holds (an erased user's rows) are gone from disk too; waits for
        readers up to the busy timeout. True when done; False, with a warning, when a reader kept it
        from completing (the next checkpoint finishes it).

        PostgreSQL: ANALYZE the user tables. Its planner statistics (pg_statistic) keep sample values
        of each column, user ids and the consent ledger's `source` among them, from the last
        (auto)ANALYZE; a fresh one samples only the rows left. Two limits, the server's to manage:
        ANALYZE skips a table the erasure left empty (its old statistics stay until it holds rows
        again), and the deleted rows' bytes stay in dead tuples until vacuum reuses the space and in
        WAL segments until they are recycled (encrypted volumes, WAL retention). Returns True."""
        if not self.is_sqlite:
            with self.engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE " + ", ".join(t.name for t in USER_TABLES))  # our own table names
            return True
        with self.engine.connect() as conn:  # outside any transaction: a checkpoint cannot run inside one
            busy, _log_frames, _done = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        if busy:
            log.warning("WAL checkpoint incomplete: a reader held the log; erased rows remain in the WAL until the next checkpoint")
        return not busy

    def close(self) -> None:
        with self._counter_lock:
            for conn in self._counter_conns:
                conn.close()
            self._counter_conns.clear()
        self._counter_local = threading.local()
        if self._wal_index is not None:
            self._wal_index.close()
            self._wal_index, self._seen = None, None
        if self._counter_engine is not None:
            self._counter_engine.dispose()
        self.engine.dispose()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def existing_store(url: str, where: str) -> str:
    """`url` when it names an existing trustrec feature store; a SQLite file that is missing (which
    opening would create, empty) or holds no store is a ValueError naming `where` (flag or config key)."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - SQLAlchemy's ArgumentError; say which setting holds it
        raise ValueError(f"{where}: not a database URL (e.g. sqlite:///data/features.db or postgresql://...)") from None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return url
    path = Path(parsed.database).expanduser()
    if not path.is_file():
        raise ValueError(f"{where}: no such file {path} (not created: an empty store knows no user); "
                         "`trustrec train` loads a store at store.url, or pass --store-url with an existing one")  # fmt: skip
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{where}: {path} is not a SQLite database ({e})") from None
    if not {"store_meta", "users"} <= tables:
        raise ValueError(f"{where}: {path} is not a trustrec feature store (no store_meta / users tables)")
    return url
