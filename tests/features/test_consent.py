"""Consent ledger, stated preferences, events, access, erasure and the consent-honouring training
export, on a real SQLite file and a real PostgreSQL database (features/consent.py + features/store.py;
the backends come from tests/features/conftest.py)."""
import hashlib
import hmac
import json
import logging
import sqlite3

import numpy as np
import pytest
from sqlalchemy import MetaData, Table, Text, cast, event, func, inspect, or_, select

from features.config import ConsentConfig, DataConfig
from features.consent import (
    ConsentError, ErasedUserError, UnknownUserError, consent_history, current_consents, erase_user, export_training_data,
    export_user, preferences, record_consent, record_event, serving_view, set_preferences,
)
from features.datasets import load_dataset, snapshot_hash
from features.schema import UNKNOWN_AGE, Dataset, Interactions, Items, Users
from features.store import FeatureStore, consent_table, popularity_table
from features.vocab import Vocab

EVIL = "1'; DROP TABLE interactions;--"
SALT = "test-salt-not-secret"
GENRES = ["Comedy", "Drama", "Sci-Fi"]


def tiny_dataset(name="tiny"):
    """alice: i1 @100 (4), i3 @200 (3), i2 @300 (5); bob: i1 @150 (2), i4 @160 (1); EVIL: i3 @50 (1)."""
    inter = Interactions(
        user=np.array([0, 0, 0, 1, 1, 2], np.int64),
        item=np.array([1, 0, 2, 0, 3, 2], np.int64),
        rating=np.array([5, 4, 3, 2, 1, 1], np.float32),
        timestamp=np.array([300, 100, 200, 150, 160, 50], np.int64),
    )
    return Dataset(
        name=name,
        interactions=inter,
        items=Items(title=["One", "Two", "Three", "Four"], genres=[(0, 1), (2,), (), (1,)], year=np.array([1999, 0, 2020, 1980], np.int32)),
        users=Users(
            age=np.array([31, UNKNOWN_AGE, 20], np.int32),
            gender=["F", "", "M"],
            occupation=["artist", "", "other"],
            liked_genres=[(2,), (), ()],
            avoided_genres=[(1,), (), ()],
        ),
        genre_names=GENRES,
        user_vocab=Vocab(["alice", "bob", EVIL], kind="user"),
        item_vocab=Vocab(["i1", "i2", "i3", "i4"], kind="item"),
    )


@pytest.fixture
def url(store_url, monkeypatch):
    monkeypatch.setenv("TRUSTREC_ERASURE_SALT", SALT)
    return store_url


@pytest.fixture
def store(url):
    s = FeatureStore(url)
    s.load_dataset(tiny_dataset())
    yield s
    s.close()


def cells_equal(store, value):
    """(table, column) pairs holding `value` anywhere in the store's database: every table there,
    ours or not (SQLite: by plain sqlite3 on the file; PostgreSQL: every table the database
    reflects, each column cast to text)."""
    if not store.is_sqlite:
        hits = []
        with store.engine.connect() as conn:
            for name in inspect(conn).get_table_names():
                table = Table(name, MetaData(), autoload_with=conn)
                for col in table.columns:
                    text = cast(col, Text)
                    if conn.scalar(select(func.count()).select_from(table).where(or_(text == value, text.like(f"%{value}%")))):
                        hits.append((name, col.name))
        return hits
    con = sqlite3.connect(store.engine.url.database)
    try:
        hits = []
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            for col in [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')]:
                if con.execute(f'SELECT count(*) FROM "{table}" WHERE "{col}" = ? OR CAST("{col}" AS TEXT) LIKE ?', (value, f"%{value}%")).fetchone()[0]:
                    hits.append((table, col))
        return hits
    finally:
        con.close()


# ---- consent ledger --------------------------------------------------------------------------
def test_ledger_is_append_only_and_the_latest_record_wins(store):
    states = current_consents(store, "alice")
    assert {p: (s.granted, s.source, s.since_ms) for p, s in states.items()} == {
        "personalization": (True, "default:opt_out", None), "training": (True, "default:opt_out", None),
        "demographics": (True, "default:opt_out", None),
    }  # fmt: skip
    record_consent(store, "alice", {"training": False}, source="signup-form")
    after = record_consent(store, "alice", {"training": True, "personalization": False})
    assert after["training"].granted and after["training"].source == "api" and after["training"].since_ms is not None
    assert not after["personalization"].granted and after["demographics"].source == "default:opt_out"
    history = consent_history(store, "alice")
    assert [(h["purpose"], h["granted"], h["source"]) for h in history] == [
        ("training", False, "signup-form"), ("training", True, "api"), ("personalization", False, "api"),
    ]  # fmt: skip
    with store.engine.connect() as conn:  # the first record is still there: nothing was overwritten
        assert conn.execute(select(func.count()).select_from(consent_table)).scalar_one() == 3
    assert current_consents(store, "bob")["training"].granted  # other users untouched


def test_opt_in_regime_grants_nothing_until_asked(url, store):
    opt_in = FeatureStore(url, consent=ConsentConfig(regime="opt_in"))
    assert not any(s.granted for s in current_consents(opt_in, "alice").values())
    assert serving_view(opt_in, "alice").personalization is False
    ds, _ = export_training_data(opt_in)
    assert len(ds.interactions) == 0 and ds.n_users == 0
    with pytest.raises(ValueError, match="data.store.url: no user .* training consent"):
        load_dataset(DataConfig(source="store", store={"url": url, "consent": {"regime": "opt_in"}}))
    record_consent(opt_in, "bob", {"training": True})
    ds, _ = export_training_data(opt_in)
    assert ds.user_vocab.ids == ["bob"] and len(ds.interactions) == 2
    assert ds.users.gender == [""] and int(ds.users.age[0]) == UNKNOWN_AGE  # no demographics consent under opt-in
    opt_in.close()


@pytest.mark.parametrize("changes, source, field", [({"marketing": True}, "api", "marketing"), ({}, "api", "consents"), ({"training": True}, "", "source")])
def test_bad_consent_input_names_the_field(store, changes, source, field):
    with pytest.raises(ConsentError) as err:
        record_consent(store, "alice", changes, source=source)
    assert err.value.field == field
    assert consent_history(store, "alice") == []  # nothing written


# ---- stated preferences -------------------------------------------------------------------------
def test_preferences_are_validated_against_the_catalog(store):
    assert preferences(store, "alice") == {"liked_genres": ["Sci-Fi"], "avoided_genres": ["Drama"], "blocked_items": []}
    out = set_preferences(store, "alice", liked_genres=["Comedy", "Sci-Fi"], blocked_items=["i4", "i2", "i4"])
    assert out == {"liked_genres": ["Comedy", "Sci-Fi"], "avoided_genres": ["Drama"], "blocked_items": ["i2", "i4"]}
    for kwargs, field, needle in [
        ({"liked_genres": ["Jazz"]}, "liked_genres", "'Jazz'"),
        ({"avoided_genres": ["Comedy"]}, "avoided_genres", "'Comedy' is also liked"),
        ({"blocked_items": ["i2", "i99"]}, "blocked_items", "'i99'"),
        ({"blocked_items": [EVIL]}, "blocked_items", "unknown item id"),
    ]:
        with pytest.raises(ConsentError) as err:
            set_preferences(store, "alice", **kwargs)
        assert err.value.field == field and needle in str(err.value)
    assert preferences(store, "alice") == out  # failed calls changed nothing
    assert set_preferences(store, "alice", blocked_items=[])["blocked_items"] == []  # [] clears, None keeps
    profile = store.user_profile("alice")
    assert (profile["age"], profile["gender"]) == (31, "F")  # demographics kept
    set_preferences(store, "carol", liked_genres=["Drama"])  # a brand-new user: profile created
    assert store.user_profile("carol") == {"user_id": "carol", "age": None, "gender": None, "occupation": None, "liked_genres": ["Drama"], "avoided_genres": []}


# ---- events ----------------------------------------------------------------------------------
def test_events_are_kept_only_under_consent_and_join_the_history(store):
    assert record_event(store, "alice", "i4", rating=2, timestamp=400) == {"stored": True, "for_training": True}
    assert record_event(store, "alice", "i4", rating=1, timestamp=250) == {"stored": True, "for_training": True}
    assert store.user_history("alice") == ["i1", "i3", "i4", "i2", "i4"]  # time order, events included
    assert store.user_history("alice", limit=2) == ["i2", "i4"]
    record_consent(store, "bob", {"training": False})
    assert record_event(store, "bob", "i2", timestamp=500) == {"stored": True, "for_training": False}
    record_consent(store, "dave", {"training": False, "personalization": False})
    assert record_event(store, "dave", "i2") == {"stored": False, "for_training": False}
    assert [e["item_id"] for e in export_user(store, "bob")["events"]] == ["i2"]
    assert export_user(store, "dave")["events"] == []
    with pytest.raises(ConsentError) as err:
        record_event(store, "alice", "no-such-item")
    assert err.value.field == "item_id"


# ---- training export ---------------------------------------------------------------------------
def rows_of(ds):
    i = ds.interactions
    return sorted(zip(ds.user_vocab.decode(i.user), ds.item_vocab.decode(i.item), i.rating.tolist(), i.timestamp.tolist()))


def test_training_export_honours_training_and_demographics_consent(store):
    record_consent(store, "bob", {"training": False})
    record_consent(store, "alice", {"demographics": False})
    record_event(store, "alice", "i4", rating=2, timestamp=400)  # for training
    record_event(store, "bob", "i2", rating=5, timestamp=500)  # kept, not for training
    ds, digest = export_training_data(store)
    assert ds.user_vocab.ids == [EVIL, "alice"] and ds.item_vocab.ids == ["i1", "i2", "i3", "i4"]
    assert rows_of(ds) == [
        (EVIL, "i3", 1.0, 50),
        ("alice", "i1", 4.0, 100), ("alice", "i2", 5.0, 300), ("alice", "i3", 3.0, 200), ("alice", "i4", 2.0, 400),
    ]  # fmt: skip
    # demographics only with demographics consent; stated genres travel with training consent
    assert (ds.users.age.tolist(), ds.users.gender, ds.users.occupation) == ([20, UNKNOWN_AGE], ["M", ""], ["other", ""])
    assert ds.users.liked_genres == [(), (2,)] and ds.users.avoided_genres == [(), (1,)]
    assert ds.genre_names == GENRES and ds.items.genres == [(0, 1), (2,), (), (1,)] and ds.items.year.tolist() == [1999, 0, 2020, 1980]
    assert digest == snapshot_hash(ds) and digest.startswith("sha256:") and "alice" not in digest
    # bob says yes to training later: his loaded rows join, the event recorded under "no" does not
    record_consent(store, "bob", {"training": True})
    ds2, digest2 = export_training_data(store)
    assert ("bob", "i1", 2.0, 150) in rows_of(ds2) and ("bob", "i4", 1.0, 160) in rows_of(ds2)
    assert ("bob", "i2", 5.0, 500) not in rows_of(ds2) and digest2 != digest
    # withdrawing training consent takes out the events recorded while it held, too
    record_consent(store, "alice", {"training": False})
    assert "alice" not in export_training_data(store)[0].user_vocab


def test_store_source_is_a_data_config_and_its_own_export_is_not_loaded_back(url, store, other_store_url):
    record_consent(store, "bob", {"training": False})
    ds = load_dataset(DataConfig(source="store", store={"url": url}))
    assert ds.user_vocab.ids == [EVIL, "alice"] and ds.name == f"store:{store.store_id}"
    store.load_dataset(ds)  # the pipeline's store.load step, when the store is also the source
    assert store.user_history("bob") == ["i1", "i4"]  # untouched: a consent-filtered copy never replaces the store
    other = FeatureStore(other_store_url)
    other.load_dataset(ds)  # into another store it loads as usual
    assert not other.has_user("bob") and other.user_history("alice") == ["i1", "i3", "i2"]
    other.close()


def test_snapshot_hash_is_content_only():
    ds = tiny_dataset()
    base = snapshot_hash(ds)
    perm = np.array([5, 3, 0, 4, 2, 1])
    shuffled = Dataset("other-name", ds.interactions.take(perm), ds.items, ds.users, ds.genre_names, ds.user_vocab, ds.item_vocab)
    assert snapshot_hash(shuffled) == base  # row order and name do not matter
    fewer = Dataset("tiny", ds.interactions.take(np.arange(5)), ds.items, ds.users, ds.genre_names, ds.user_vocab, ds.item_vocab)
    older = Users(np.array([32, UNKNOWN_AGE, 20], np.int32), ds.users.gender, ds.users.occupation, ds.users.liked_genres, ds.users.avoided_genres)
    changed_profile = Dataset("tiny", ds.interactions, ds.items, older, ds.genre_names, ds.user_vocab, ds.item_vocab)
    assert len({base, snapshot_hash(fewer), snapshot_hash(changed_profile)}) == 3


# ---- access and erasure ------------------------------------------------------------------------
def test_export_user_holds_everything_and_unknown_users_are_refused(store):
    record_consent(store, "alice", {"training": False}, source="app")
    set_preferences(store, "alice", blocked_items=["i4"])
    record_event(store, "alice", "i4", rating=2, timestamp=400)
    data = export_user(store, "alice")
    assert data["profile"] == {"age": 31, "gender": "F", "occupation": "artist"}
    assert data["preferences"] == {"liked_genres": ["Sci-Fi"], "avoided_genres": ["Drama"], "blocked_items": ["i4"]}
    assert data["consents"]["regime"] == "opt_out" and data["consents"]["current"]["training"]["granted"] is False
    assert [(h["purpose"], h["granted"], h["source"]) for h in data["consents"]["history"]] == [("training", False, "app")]
    assert data["interactions"] == [
        {"item_id": "i1", "rating": 4.0, "timestamp": 100}, {"item_id": "i3", "rating": 3.0, "timestamp": 200},
        {"item_id": "i2", "rating": 5.0, "timestamp": 300},
    ]  # fmt: skip
    assert data["events"] == [{"item_id": "i4", "rating": 2.0, "timestamp": 400, "for_training": False}]
    json.dumps(data)  # JSON-ready as is
    with pytest.raises(UnknownUserError):
        export_user(store, "nobody")
    with pytest.raises(UnknownUserError):
        export_user(store, "x' OR '1'='1")


def test_erasure_removes_every_row_and_the_tombstone_keeps_the_user_out(store, caplog):
    caplog.set_level(logging.DEBUG)
    record_consent(store, "alice", {"personalization": True})
    set_preferences(store, "alice", blocked_items=["i4"])
    record_event(store, "alice", "i4", rating=2, timestamp=400)
    generation = store.generation()
    receipt = erase_user(store, "alice")
    assert receipt["deleted"] == {"users": 1, "interactions": 3, "events": 1, "consent_ledger": 1, "blocked_items": 1, "privacy_spend": 0, "exposures": 0, "outcomes": 0}
    assert receipt["popularity_adjusted_items"] == 3 and receipt["erased"] is True
    assert receipt["tombstone"] == hmac.new(SALT.encode(), b"alice", hashlib.sha256).hexdigest()  # salted, not the id
    assert store.generation() == generation + 1
    assert cells_equal(store, "alice") == []  # no cell of any table holds the id
    with store.engine.connect() as conn:  # popularity without alice's rows: i1 2->1, i2 1->0, i3 2->1, i4 1
        assert dict(conn.execute(select(popularity_table.c.item_id, popularity_table.c["count"])).all()) == {"i1": 1, "i2": 0, "i3": 1, "i4": 1}
    assert store.user_history("bob") == ["i1", "i4"] and store.has_user(EVIL)  # nobody else touched
    with pytest.raises(UnknownUserError):
        export_user(store, "alice")
    with pytest.raises(UnknownUserError):
        erase_user(store, "alice")
    for write in (lambda: record_consent(store, "alice", {"training": True}), lambda: set_preferences(store, "alice", liked_genres=["Drama"]),
                  lambda: record_event(store, "alice", "i1")):  # fmt: skip
        with pytest.raises(ErasedUserError):
            write()
    assert not any(s.granted for s in current_consents(store, "alice").values())
    assert serving_view(store, "alice") == serving_view(store, "alice").__class__(False, False, [], True)
    # a later import of a dataset that still holds alice leaves her out, and so does training
    store.load_dataset(tiny_dataset())
    assert not store.has_user("alice") and store.user_history("alice") == [] and store.user_history("bob") == ["i1", "i4"]
    assert cells_equal(store, "alice") == []
    assert "alice" not in export_training_data(store)[0].user_vocab
    assert store.popular_items(4) == ["i1", "i3", "i4", "i2"]  # counts from the import without alice: 1, 1, 1, 0
    assert "alice" not in caplog.text


def test_erasure_is_one_transaction(store):
    record_event(store, "alice", "i4", timestamp=400)

    def fail_on_events(conn, cursor, statement, params, context, executemany):
        if statement.lstrip().upper().startswith("DELETE FROM EVENTS"):
            raise RuntimeError("disk on fire")

    event.listen(store.engine, "before_cursor_execute", fail_on_events)
    try:
        with pytest.raises(RuntimeError, match="disk on fire"):
            erase_user(store, "alice")  # users and interactions were already deleted inside the transaction
    finally:
        event.remove(store.engine, "before_cursor_execute", fail_on_events)
    assert store.has_user("alice") and store.user_history("alice") == ["i1", "i3", "i2", "i4"] and not store.is_erased("alice")


def interleave_before_the_write(store, monkeypatch, action):
    """Run `action` (its own committed transaction) between a write call's checks and its write
    transaction: the moment another replica's erasure or revocation can commit."""
    original, fired = store.transaction, []

    def transaction():
        if not fired:
            fired.append(True)
            action()  # runs its own store.transaction(), now the original one
        return original()

    monkeypatch.setattr(store, "transaction", transaction)


@pytest.mark.parametrize("write", ["consent", "preferences", "event"])
def test_an_erasure_that_commits_during_a_write_keeps_the_user_out(store, monkeypatch, write):
    record_event(store, "alice", "i4", timestamp=400)
    interleave_before_the_write(store, monkeypatch, lambda: erase_user(store, "alice"))
    calls = {
        "consent": lambda: record_consent(store, "alice", {"training": True}),
        "preferences": lambda: set_preferences(store, "alice", liked_genres=["Comedy"]),
        "event": lambda: record_event(store, "alice", "i1"),
    }
    with pytest.raises(ErasedUserError):
        calls[write]()
    assert store.is_erased("alice") and cells_equal(store, "alice") == []  # nothing came back under the tombstone


def test_a_revocation_that_commits_during_an_event_keeps_the_event_out(store, monkeypatch):
    record_consent(store, "bob", {"personalization": True, "training": True})
    interleave_before_the_write(store, monkeypatch, lambda: record_consent(store, "bob", {"personalization": False, "training": False}))
    assert record_event(store, "bob", "i2", timestamp=500) == {"stored": False, "for_training": False}
    assert store.user_history("bob") == ["i1", "i4"]  # the import's rows only: no event under withdrawn consent


def test_salt_kept_in_the_store_when_no_env_var(store_url, monkeypatch, caplog):
    monkeypatch.delenv("TRUSTREC_ERASURE_SALT", raising=False)
    url = store_url
    with FeatureStore(url) as a, caplog.at_level(logging.WARNING):
        a.load_dataset(tiny_dataset())
        first = erase_user(a, "bob")["tombstone"]
    assert "TRUSTREC_ERASURE_SALT is not set" in caplog.text and "bob" not in caplog.text
    with FeatureStore(url) as b:  # a new process sees the same salt, so the tombstone still matches
        assert b.subject_hash("bob") == first and b.is_erased("bob")
        b.load_dataset(tiny_dataset())
        assert not b.has_user("bob")
    assert first != hmac.new(SALT.encode(), b"bob", hashlib.sha256).hexdigest()


def test_injection_shaped_ids_are_plain_data(store):
    record_consent(store, EVIL, {"training": False})
    set_preferences(store, EVIL, liked_genres=["Comedy"])
    assert export_user(store, EVIL)["interactions"] == [{"item_id": "i3", "rating": 1.0, "timestamp": 50}]
    with pytest.raises(UnknownUserError):
        erase_user(store, "' OR 1=1;--")
    assert erase_user(store, EVIL)["deleted"]["interactions"] == 1
    assert store.user_history("alice") == ["i1", "i3", "i2"] and store.user_history("bob") == ["i1", "i4"]
    assert cells_equal(store, EVIL) == []


# ---- operator CLI: the same code path ---------------------------------------------------------
def test_cli_export_user_and_forget(store, url, tmp_path, capsys):
    from cli.main import main

    missing_config = str(tmp_path / "none.yaml")  # --store-url alone is enough
    assert main(["export-user", "alice", "--store-url", url, "--config", missing_config]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["user_id"] == "alice" and len(printed["interactions"]) == 3
    out = tmp_path / "alice.json"
    assert main(["export-user", "alice", "--store-url", url, "--config", missing_config, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["preferences"] == printed["preferences"]
    capsys.readouterr()
    assert main(["forget", "alice", "--store-url", url, "--config", missing_config]) == 0
    receipt = json.loads(capsys.readouterr().out)
    assert receipt["deleted"]["interactions"] == 3 and receipt["tombstone"] == store.subject_hash("alice")
    assert main(["forget", "alice", "--store-url", url, "--config", missing_config]) == 1
    assert "no data" in capsys.readouterr().err
    assert cells_equal(store, "alice") == []
