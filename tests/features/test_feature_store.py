"""FeatureStore on a real SQLite file: reads, atomic reloads, hostile ids, threads."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from sqlalchemy import event, func, select

from features.schema import UNKNOWN_AGE, Dataset, Interactions, Items, Users
from features.store import FeatureStore, interactions_table
from features.vocab import Vocab

EVIL = "1'; DROP TABLE interactions;--"


def tiny_dataset(user_ids=("alice", "bob", EVIL), name="tiny"):
    genres = ["Comedy", "Drama", "Sci-Fi"]
    # alice: i2 @ 300, i1 @ 100, i3 @ 200 (deliberately not in time order); bob: i1; EVIL: i3.
    inter = Interactions(
        user=np.array([0, 0, 0, 1, 2], np.int64),
        item=np.array([1, 0, 2, 0, 2], np.int64),
        rating=np.array([5, 4, 3, 2, 1], np.float32),
        timestamp=np.array([300, 100, 200, 150, 50], np.int64),
    )
    n = len(user_ids)
    return Dataset(
        name=name,
        interactions=inter,
        items=Items(title=["One", "Two", "Three"], genres=[(0, 1), (2,), ()], year=np.array([1999, 0, 2020], np.int32)),
        users=Users(
            age=np.array([31, UNKNOWN_AGE, 20][:n], np.int32),
            gender=["F", "", "M"][:n],
            occupation=["artist", "", "other"][:n],
            liked_genres=[(2, 0), (), ()][:n],
            avoided_genres=[(1,), (), ()][:n],
        ),
        genre_names=genres,
        user_vocab=Vocab(user_ids, kind="user"),
        item_vocab=Vocab(["i1", "i2", "i3"], kind="item"),
    )


@pytest.fixture
def store(tmp_path):
    s = FeatureStore(f"sqlite:///{tmp_path / 'nested' / 'dir' / 'features.db'}")  # parent dirs created
    s.load_dataset(tiny_dataset())
    yield s
    s.close()


def test_history_in_time_order_with_limit(store):
    assert store.user_history("alice") == ["i1", "i3", "i2"]
    assert store.user_history("alice", limit=2) == ["i3", "i2"]
    assert store.user_history("alice", limit=10) == ["i1", "i3", "i2"]
    assert store.user_history("alice", limit=0) == []
    assert store.user_history("bob") == ["i1"]


def test_item_metadata_and_popularity(store):
    meta = store.item_metadata(["i3", "i1", "nope", "i1"])
    assert meta == {
        "i1": {"title": "One", "genres": ["Comedy", "Drama"], "year": 1999},
        "i3": {"title": "Three", "genres": [], "year": 2020},
    }
    assert store.item_metadata(["i2"])["i2"]["year"] is None
    assert store.item_metadata([]) == {}
    # counts: i1 = 2 (alice, bob), i3 = 2 (alice, EVIL), i2 = 1; ties broken by item id
    assert store.popular_items(3) == ["i1", "i3", "i2"]
    assert store.popular_items(1) == ["i1"] and store.popular_items(0) == []


def test_profiles_and_unknown_users(store):
    assert store.user_profile("alice") == {
        "user_id": "alice", "age": 31, "gender": "F", "occupation": "artist",
        "liked_genres": ["Sci-Fi", "Comedy"], "avoided_genres": ["Drama"],
    }
    bob = store.user_profile("bob")
    assert bob["age"] is None and bob["gender"] is None and bob["liked_genres"] == []
    assert store.has_user("alice") and not store.has_user("carol")
    assert store.user_history("carol") == [] and store.user_profile("carol") is None


def test_load_with_explicit_interactions_subset(tmp_path):
    ds = tiny_dataset()
    with FeatureStore(f"sqlite:///{tmp_path / 'fs.db'}") as s:
        s.load_dataset(ds, interactions=ds.interactions.take(np.array([0, 3])))  # alice->i2, bob->i1
        assert s.user_history("alice") == ["i2"]
        assert s.popular_items(3)[:2] == ["i1", "i2"]
        assert s.has_user(EVIL) and s.user_history(EVIL) == []


def test_reload_replaces_previous_content(store):
    store.load_dataset(tiny_dataset(user_ids=("dave", "erin", "frank"), name="second"))
    assert not store.has_user("alice") and store.user_history("alice") == []
    assert store.user_history("dave") == ["i1", "i3", "i2"]


def _row_count(store):
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(interactions_table)).scalar_one()


def test_failure_mid_load_leaves_previous_content(store):
    def fail_on_interactions(conn, cursor, statement, params, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO INTERACTIONS"):
            raise RuntimeError("disk on fire")

    event.listen(store.engine, "before_cursor_execute", fail_on_interactions)
    try:
        with pytest.raises(RuntimeError, match="disk on fire"):
            store.load_dataset(tiny_dataset(user_ids=("dave", "erin", "frank")))  # items/users already written
    finally:
        event.remove(store.engine, "before_cursor_execute", fail_on_interactions)
    assert store.has_user("alice") and not store.has_user("dave")
    assert store.user_history("alice") == ["i1", "i3", "i2"] and _row_count(store) == 5
    assert store.popular_items(1) == ["i1"]


def test_bad_data_mid_load_leaves_previous_content(store):
    ds = tiny_dataset(user_ids=("dave", "erin", "frank"))
    broken = Interactions(np.array([0, 1]), np.array([0, 99]), np.ones(2, np.float32), np.array([1, 2]))
    with pytest.raises(ValueError, match="outside"):
        store.load_dataset(ds, interactions=broken)  # item 99 does not exist
    assert store.has_user("alice") and not store.has_user("dave") and _row_count(store) == 5


def test_injection_shaped_ids_are_plain_data(store):
    assert store.has_user(EVIL)
    assert store.user_history(EVIL) == ["i3"]
    assert store.user_profile(EVIL)["user_id"] == EVIL
    assert store.user_history("x' OR '1'='1") == [] and not store.has_user("x' OR '1'='1")
    assert store.item_metadata([EVIL, "i1') OR 1=1;--"]) == {}
    assert _row_count(store) == 5  # the table still exists and is intact
    assert store.user_history("alice") == ["i1", "i3", "i2"]


def test_sqlite_wal_and_concurrent_reads(store):
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar().lower() == "wal"
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: store.user_history("alice"), range(64)))
    assert all(r == ["i1", "i3", "i2"] for r in results)


def test_in_memory_sqlite_url_works():
    with FeatureStore("sqlite://") as s:
        s.load_dataset(tiny_dataset())
        assert s.user_history("alice", limit=1) == ["i2"]


def test_upsert_user_creates_then_replaces_a_profile(tmp_path):
    store = FeatureStore(f"sqlite:///{tmp_path}/upsert.db")
    assert store.user_profile("new") is None
    store.upsert_user("new", liked_genres=["Comedy", "Horror"], avoided_genres=["Drama"])
    assert store.user_profile("new") == {
        "user_id": "new", "age": None, "gender": None, "occupation": None,
        "liked_genres": ["Comedy", "Horror"], "avoided_genres": ["Drama"],
    }
    store.upsert_user("new", age=30, gender="F", liked_genres=["Action"])
    profile = store.user_profile("new")
    assert (profile["age"], profile["gender"], profile["liked_genres"], profile["avoided_genres"]) == (30, "F", ["Action"], [])
    assert store.user_history("new") == []
    store.close()


def test_reload_keeps_customer_control_tables_and_bumps_the_change_counter(store):
    from features.consent import consent_history, preferences, record_consent, record_event, set_preferences

    record_consent(store, "alice", {"training": False})
    set_preferences(store, "alice", blocked_items=["i2"])
    record_event(store, "alice", "i3", timestamp=400)
    before = store.generation()
    store.load_dataset(tiny_dataset(name="again"))  # replaces catalog, profiles, histories...
    assert store.generation() == before + 1
    assert [h["granted"] for h in consent_history(store, "alice")] == [False]  # ...but not the ledger,
    assert preferences(store, "alice")["blocked_items"] == ["i2"]  # blocked items
    assert store.user_history("alice") == ["i1", "i3", "i2", "i3"]  # or recorded events
    assert store.holds_user("alice") and not store.holds_user("carol")
    assert store.genre_names() == ["Comedy", "Drama", "Sci-Fi"] and store.known_items(["i1", "i9", EVIL]) == {"i1"}


def test_genre_names_fall_back_to_the_items_table(tmp_path):
    with FeatureStore(f"sqlite:///{tmp_path / 'fs.db'}") as s:
        assert s.genre_names() == []
        s.load_dataset(tiny_dataset())
        with s.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM store_meta WHERE key = 'genre_names'")  # a store loaded before the key existed
        assert s.genre_names() == ["Comedy", "Drama", "Sci-Fi"]  # sorted, from items.genres
