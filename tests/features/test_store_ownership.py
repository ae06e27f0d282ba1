"""What a dataset import may change and what it must keep (issue 13): the store owns what customers
told it, erasure survives any environment, and erased users leave every data source. Real SQLite files
and real PostgreSQL databases (tests/features/conftest.py)."""
import numpy as np
import pytest
from sqlalchemy import create_engine, inspect

from features.config import SyntheticConfig
from features.consent import erase_user, export_user, preferences, record_consent, set_preferences
from features.datasets import apply_erasures, drop_users
from features.store import ErasureSaltError, FeatureStore
from features.synthetic import generate
from tests.features.test_consent import tiny_dataset

SALT_ENV = "TRUSTREC_ERASURE_SALT"


@pytest.fixture
def url(store_url, monkeypatch):
    monkeypatch.setenv(SALT_ENV, "salt-a")
    return store_url


def test_an_import_keeps_stated_preferences_and_api_users_and_replaces_the_rest(url):
    with FeatureStore(url) as s:
        s.load_dataset(tiny_dataset())
        assert preferences(s, "alice")["avoided_genres"] == ["Drama"]  # the dataset's default
        set_preferences(s, "alice", avoided_genres=["Comedy", "Sci-Fi"], liked_genres=[])  # alice says otherwise
        set_preferences(s, "newbie-1", liked_genres=["Drama"])  # a user only the API knows
        set_preferences(s, "bob", blocked_items=["i2"])  # blocking items is not a genre statement
        s.load_dataset(tiny_dataset(name="retrain"))  # what `trustrec train` does at its end

        assert preferences(s, "alice") == {"liked_genres": [], "avoided_genres": ["Comedy", "Sci-Fi"], "blocked_items": []}
        assert s.user_profile("alice")["age"] == 31  # demographics still come from the dataset
        assert preferences(s, "newbie-1")["liked_genres"] == ["Drama"]
        assert export_user(s, "newbie-1")["preferences"]["liked_genres"] == ["Drama"]
        assert preferences(s, "bob")["blocked_items"] == ["i2"]


def test_an_import_still_drops_imported_users_it_no_longer_holds_but_never_api_users(url):
    from tests.features.test_feature_store import EVIL
    from tests.features.test_feature_store import tiny_dataset as three_users

    with FeatureStore(url) as s:
        s.load_dataset(three_users())
        set_preferences(s, "newbie-1", liked_genres=["Comedy"])
        s.upsert_user("operator-made", age=40)
        set_preferences(s, EVIL, avoided_genres=["Drama"])  # an imported user (age 20) states a preference...
        s.load_dataset(three_users(user_ids=("dave", "erin", "frank")))  # ...and the next dataset no longer holds them
        assert not s.has_user("alice") and s.has_user("dave")  # imported rows are the dataset's to replace
        assert s.has_user("newbie-1") and s.user_profile("operator-made")["age"] == 40
        assert preferences(s, EVIL)["avoided_genres"] == ["Drama"]  # what they said stays...
        assert s.user_profile(EVIL)["age"] is None  # ...the dataset's demographics go with the dataset


def test_a_store_from_before_the_ownership_columns_is_migrated(url):
    old = create_engine(url)
    with old.begin() as db:  # the users table as trustrec wrote it before this change
        db.exec_driver_sql("CREATE TABLE users (user_id TEXT PRIMARY KEY, age INTEGER, gender TEXT, occupation TEXT, liked_genres TEXT NOT NULL, avoided_genres TEXT NOT NULL)")
        db.exec_driver_sql("INSERT INTO users VALUES ('old-user', 33, NULL, NULL, 'Comedy', '')")
    with FeatureStore(url) as s:
        profile = s.user_profile("old-user")
        assert profile["age"] == 33 and profile["liked_genres"] == ["Comedy"]
        s.load_dataset(tiny_dataset())
        assert not s.has_user("old-user")  # an old row counts as imported
    with old.connect() as db:
        assert {"origin", "stated_ms"} <= {c["name"] for c in inspect(db).get_columns("users")}
    old.dispose()


# ---- erasure with no environment precondition --------------------------------------------------
def test_without_the_salt_an_import_is_refused_and_the_erased_user_stays_gone(url, monkeypatch):
    with FeatureStore(url) as s:
        s.load_dataset(tiny_dataset())
        erase_user(s, "bob")
    monkeypatch.delenv(SALT_ENV)  # the retrain of the issue: same store, no salt in the environment
    with FeatureStore(url) as s:
        with pytest.raises(ErasureSaltError, match=f"{SALT_ENV} is not set"):
            s.load_dataset(tiny_dataset())
        with pytest.raises(ErasureSaltError):
            s.check_erasure_salt()
    monkeypatch.setenv(SALT_ENV, "salt-b")  # a different salt is no better
    with FeatureStore(url) as s:
        with pytest.raises(ErasureSaltError, match="differs"):
            s.load_dataset(tiny_dataset())
        assert not s.holds_user("bob")  # nothing was loaded by the refused imports
    monkeypatch.setenv(SALT_ENV, "salt-a")
    with FeatureStore(url) as s:
        s.load_dataset(tiny_dataset())
        assert not s.holds_user("bob") and s.has_user("alice")


def test_a_store_kept_salt_is_recognised_and_an_env_salt_set_later_is_refused(url, monkeypatch):
    monkeypatch.delenv(SALT_ENV)
    with FeatureStore(url) as s:
        s.load_dataset(tiny_dataset())
        erase_user(s, "bob")  # under the salt the store generated and keeps
    with FeatureStore(url) as s:
        s.load_dataset(tiny_dataset())  # still no env var: the kept salt matches its fingerprint
        assert not s.holds_user("bob")
    monkeypatch.setenv(SALT_ENV, "a-new-salt")
    with FeatureStore(url) as s, pytest.raises(ErasureSaltError, match="differs"):
        s.check_erasure_salt()


def test_a_store_without_erasures_needs_no_salt(url, monkeypatch):
    monkeypatch.delenv(SALT_ENV)
    with FeatureStore(url) as s:
        s.load_dataset(tiny_dataset())
        s.check_erasure_salt()
        record_consent(s, "alice", {"training": False})


# ---- erased users leave every data source ------------------------------------------------------
def test_drop_users_renumbers_the_rest_and_keeps_their_rows():
    ds = generate(SyntheticConfig(n_users=30, n_items=40, n_genres=4, mean_interactions_per_user=8, seed=1))
    out = drop_users(ds, {"u3", "u17"})
    assert out.n_users == 28 and "u3" not in out.user_vocab and "u17" not in out.user_vocab
    removed = int(np.isin(ds.interactions.user, [ds.user_vocab.index("u3"), ds.user_vocab.index("u17")]).sum())
    assert len(out.interactions) == len(ds.interactions) - removed
    # every remaining row is the same (raw user, raw item, rating, time) as before
    before = {(ds.user_vocab.ids[u], ds.item_vocab.ids[i], float(r), int(t)) for u, i, r, t in zip(*(getattr(ds.interactions, f) for f in ("user", "item", "rating", "timestamp")))}
    after = {(out.user_vocab.ids[u], out.item_vocab.ids[i], float(r), int(t)) for u, i, r, t in zip(*(getattr(out.interactions, f) for f in ("user", "item", "rating", "timestamp")))}
    assert after == {row for row in before if row[0] not in ("u3", "u17")}
    j, k = ds.user_vocab.index("u18"), out.user_vocab.index("u18")
    assert (ds.users.age[j], ds.users.gender[j], ds.users.liked_genres[j]) == (out.users.age[k], out.users.gender[k], out.users.liked_genres[k])


def test_apply_erasures_removes_erased_ids_from_a_synthetic_dataset(url, tmp_path):
    ds = generate(SyntheticConfig(n_users=30, n_items=40, n_genres=4, mean_interactions_per_user=8, seed=1))
    with FeatureStore(url) as s:
        s.load_dataset(ds)
        erase_user(s, "u4")
    out, applied = apply_erasures(ds, url)
    assert applied == {"erasures_applied": 1, "tombstones": 1} and "u4" not in out.user_vocab and out.n_users == 29
    # a store file that does not exist holds no erasures, and is not created by asking
    missing = tmp_path / "nowhere" / "features.db"
    assert apply_erasures(ds, f"sqlite:///{missing}")[1] == {"erasures_applied": 0, "tombstones": 0} and not missing.exists()
