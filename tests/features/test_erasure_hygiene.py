"""Storage hygiene of erasure (features/store.py `_sqlite_pragmas`, `FeatureStore.checkpoint`;
features/consent.py `erase_user`): after an erasure the erased id is in no byte of the SQLite
database, its WAL or its shared-memory index, not merely absent from query results.

The controls run the same scenario with `secure_delete` off or without the checkpoint and find the
id on disk: the scan does detect leftovers, so its passing case means something. (The control sets
secure_delete off explicitly: some SQLite builds, this venv's included, default it to on; others do not.)"""
import hashlib
import hmac
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select

import features.store as store_module
from features.audit import AuditLog
from features.config import SyntheticConfig
from features.consent import erase_user, record_consent, record_event, set_preferences
from features.schema import Dataset
from features.store import FeatureStore, audit_table, tombstones_table
from features.synthetic import generate
from features.vocab import Vocab

ERASED = "erase-me-7f3a9c"
SALT = "hygiene-test-salt"


def dataset_with_erased_user() -> Dataset:
    """Synthetic data (300 users, 200 items: several pages per table and index) whose first user is ERASED."""
    ds = generate(SyntheticConfig(n_users=300, n_items=200, mean_interactions_per_user=20, seed=3))
    ids = [ERASED] + list(ds.user_vocab.ids[1:])
    return Dataset(ds.name, ds.interactions, ds.items, ds.users, ds.genre_names, Vocab(ids, kind="user"), ds.item_vocab)


def files_holding(db: Path, needle: bytes) -> list[str]:
    """Names of the database file, WAL and shared-memory index (those that exist) containing `needle`."""
    return [p.name for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")) if p.exists() and needle in p.read_bytes()]


def scenario(tmp_path: Path, monkeypatch) -> tuple[FeatureStore, Path, AuditLog]:
    """A store file holding ERASED everywhere: bulk-loaded profile and history, consent records
    (one with the id in its free-text source), stated genres, blocked items, recorded events."""
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", SALT)
    db = tmp_path / "features.db"
    store = FeatureStore(f"sqlite:///{db}")
    ds = dataset_with_erased_user()
    store.load_dataset(ds)
    audit = AuditLog(store, table=True, path=tmp_path / "audit.jsonl")
    record_consent(store, ERASED, {"training": True, "personalization": True}, source=f"form:{ERASED}", audit=audit)
    set_preferences(store, ERASED, liked_genres=[ds.genre_names[0]], avoided_genres=[ds.genre_names[1]], blocked_items=["i3", "i7"], audit=audit)
    for n in range(25):
        record_event(store, ERASED, f"i{n + 1}", rating=4.0, timestamp=1_700_000_000 + n, audit=audit)
    return store, db, audit


def test_secure_delete_is_on_for_every_store_connection(tmp_path):
    with FeatureStore(f"sqlite:///{tmp_path / 'fs.db'}") as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA secure_delete").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    # whatever the build's default (SQLITE_SECURE_DELETE is a compile-time option, on in some
    # distributions' SQLite and off in others), the store's connect hook turns it on
    raw = sqlite3.connect(tmp_path / "raw.db")
    raw.execute("PRAGMA secure_delete=OFF")
    store_module._sqlite_pragmas(raw, None)
    assert raw.execute("PRAGMA secure_delete").fetchone() == (1,)
    raw.close()


def test_erased_id_is_in_no_byte_of_the_database_wal_or_shm(tmp_path, monkeypatch):
    store, db, audit = scenario(tmp_path, monkeypatch)
    needle = ERASED.encode()
    assert files_holding(db, needle)  # before: the scan finds it
    receipt = erase_user(store, ERASED, audit=audit)
    # still open, as a serving replica keeps it: closing the last connection would checkpoint by itself
    assert files_holding(db, needle) == []
    assert db.with_name("features.db-wal").stat().st_size == 0  # checkpoint(TRUNCATE) emptied the WAL
    subject = hmac.new(SALT.encode(), needle, hashlib.sha256).hexdigest()
    assert receipt["tombstone"] == subject and receipt["deleted"]["events"] == 25 and receipt["deleted"]["blocked_items"] == 2
    with store.engine.connect() as conn:  # what is left says who was erased only as the salted hash
        assert list(conn.scalars(select(tombstones_table.c.subject_hash))) == [subject]
        assert list(conn.scalars(select(audit_table.c.action).where(audit_table.c.subject == subject).order_by(audit_table.c.id))) == (
            ["consent", "preferences"] + ["event"] * 25 + ["erasure"]
        )
    assert needle not in (tmp_path / "audit.jsonl").read_bytes()
    store.close()
    assert files_holding(db, needle) == []


def _no_secure_delete(dbapi_conn, record):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA secure_delete=OFF")  # explicit: some SQLite builds default it to on
    cur.close()


@pytest.mark.parametrize("without", ["secure_delete", "checkpoint"])
def test_control_without_either_measure_the_id_stays_on_disk(tmp_path, monkeypatch, without):
    if without == "secure_delete":
        monkeypatch.setattr(store_module, "_sqlite_pragmas", _no_secure_delete)  # read when the engine is made
    else:
        monkeypatch.setattr(FeatureStore, "checkpoint", lambda self: True)
    store, db, audit = scenario(tmp_path, monkeypatch)
    erase_user(store, ERASED, audit=audit)
    left = files_holding(db, ERASED.encode())
    store.close()
    # without secure_delete the freed cells keep their bytes in the database file (the checkpoint
    # copied those pages there); without the checkpoint the WAL keeps every earlier page version
    assert ("features.db" in left) if without == "secure_delete" else ("features.db-wal" in left)


# ---- PostgreSQL: the planner's sample values -------------------------------------------------------
def pg_stats_holding(store: FeatureStore, needle: str) -> list[str]:
    """table.column of every pg_stats row (the planner's most common values and histogram bounds,
    sampled from the rows by ANALYZE) holding `needle`."""
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT tablename, attname, most_common_vals::text, histogram_bounds::text FROM pg_stats WHERE schemaname = current_schema()"
        ).all()
    return sorted(f"{t}.{c}" for t, c, mcv, bounds in rows if needle in (mcv or "") + (bounds or ""))


@pytest.mark.postgres
@pytest.mark.parametrize("checkpoint", [True, False], ids=["analyzed", "control"])
def test_postgres_statistics_forget_the_erased_id(pg_url, monkeypatch, checkpoint):
    """After (auto)ANALYZE, pg_statistic holds sample values of every column, the erased id among
    them; the erasure's checkpoint re-analyzes, so only the rows left are sampled. Another user keeps
    rows in every user table here (ANALYZE skips a table left empty: features/store.py checkpoint).
    The control, without the checkpoint, finds the id still there: the scan does detect it."""
    if not checkpoint:
        monkeypatch.setattr(FeatureStore, "checkpoint", lambda self: True)
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", SALT)
    store = FeatureStore(pg_url)
    ds = dataset_with_erased_user()
    store.load_dataset(ds)
    for user in (ERASED, ds.user_vocab.ids[1]):
        record_consent(store, user, {"training": True}, source=f"form:{user}")
        set_preferences(store, user, blocked_items=["i3", "i7"])
        for n in range(25):
            record_event(store, user, f"i{n + 1}", timestamp=1_700_000_000 + n)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")  # what autovacuum does after a bulk load
    before = pg_stats_holding(store, ERASED)
    assert {"blocked_items.user_id", "consent_ledger.source", "consent_ledger.user_id", "events.user_id"} <= set(before), before
    erase_user(store, ERASED)
    assert pg_stats_holding(store, ERASED) == ([] if checkpoint else before)
    store.close()
