"""In-process Recommender over the real exported bundle, real ONNX Runtime and real SQLite store."""
import numpy as np
import pytest

from features.store import FeatureStore
from serving.recommender import Recommender


@pytest.fixture(scope="module")
def store(trained_run):
    s = FeatureStore(trained_run.store_url)
    yield s
    s.close()


def own_store(trained_run, tmp_path) -> tuple[FeatureStore, Recommender]:
    """A copy of the session's store (tests that write to it) and a Recommender over it."""
    import sqlite3

    path = tmp_path / "features.db"
    with sqlite3.connect(trained_run.root / "features.db") as src, sqlite3.connect(path) as dst:
        src.backup(dst)
    store = FeatureStore(f"sqlite:///{path}")
    return store, Recommender.from_dir(trained_run.result.artifact_dir, store=store)


@pytest.fixture(scope="module")
def rec(trained_run, store):
    return Recommender.from_dir(trained_run.result.artifact_dir, store=store)


def test_known_user_gets_personalized_scores_that_match_the_bundle(rec, store):
    answer = rec.recommend("u1", k=10)
    assert answer["personalized"] is True and answer["provider"] == "CPUExecutionProvider"
    scores = [it["score"] for it in answer["items"]]
    assert len(scores) == 10 and scores == sorted(scores, reverse=True)
    # the same scores computed by hand: ONNX user vector . item matrix, history excluded
    state = rec.user_state("u1")
    history = rec.item_vocab.encode(store.user_history("u1"))
    assert np.array_equal(state.items, history)
    user_vec = rec.user_vectors([state], [rec.user_oov])[0]
    manual = rec.item_vectors @ user_vec
    manual[history] = -np.inf
    avoided = [rec.genre_index[g] for g in store.user_profile("u1")["avoided_genres"]]
    manual[rec.genre_mask[:, avoided].any(1)] = -np.inf  # avoided genres never appear, whatever the model
    expected = rec.item_vocab.decode(np.argsort(-manual, kind="stable")[:10])
    assert [it["item_id"] for it in answer["items"]] == expected
    np.testing.assert_allclose(scores, np.sort(manual)[::-1][:10], atol=1e-5)


def test_seen_items_are_excluded_unless_asked(rec, store):
    seen = set(store.user_history("u2"))
    assert seen
    assert not seen & {it["item_id"] for it in rec.recommend("u2", k=50)["items"]}
    assert seen & {it["item_id"] for it in rec.recommend("u2", k=50, exclude_seen=False)["items"]}


def test_unknown_user_gets_flagged_popularity_fallback(rec, trained_run):
    answer = rec.recommend("nobody-we-know", k=5)
    assert answer["personalized"] is False
    assert [it["item_id"] for it in answer["items"]] == rec.manifest["popularity"][:5]
    assert all(it["title"] for it in answer["items"])


def test_a_short_answer_says_so(rec, store):
    full = rec.recommend("u2", k=10)
    assert len(full["items"]) == 10 and "short" not in full
    n_items = len(rec.items)
    history = rec.item_vocab.encode(store.user_history("u2"))
    avoided = [rec.genre_index[g] for g in store.user_profile("u2")["avoided_genres"]]
    left = n_items - len(np.union1d(history, np.flatnonzero(rec.genre_mask[:, avoided].any(1))))
    whole = rec.recommend("u2", k=n_items)  # the whole catalog: seen items and avoided genres are left out
    assert len(whole["items"]) == left < n_items
    assert (whole["short"]["requested"], whole["short"]["returned"]) == (n_items, left) and "model's catalog" in whole["short"]["reason"]
    n_pop = len(rec.manifest["popularity"])
    fallback = rec.recommend("nobody-we-know", k=n_pop + 5)  # the fallback holds the bundle's popularity list only
    assert fallback["short"]["returned"] == len(fallback["items"]) == n_pop and "popularity list" in fallback["short"]["reason"]


def test_items_carry_titles_from_the_bundle(rec):
    titles = {it["item_id"]: it["title"] for it in rec.items}
    for item in rec.recommend("u3", k=5)["items"]:
        assert item["title"] == titles[item["item_id"]]


def test_batch_equals_single_requests(rec):
    users = ["u1", "u7", "stranger", "u9"]
    batched, single = rec.recommend_many(users, k=4), [rec.recommend(u, k=4) for u in users]
    for b, s in zip(batched, single):
        assert b["personalized"] == s["personalized"]
        assert [it["item_id"] for it in b["items"]] == [it["item_id"] for it in s["items"]]
        np.testing.assert_allclose([it["score"] for it in b["items"]], [it["score"] for it in s["items"]], atol=1e-5)
    assert [b["personalized"] for b in batched] == [True, True, False, True]


def test_loads_champion_from_mlflow_registry(trained_run, store):
    rec = Recommender.from_uri("models:/trustrec@champion", store=store, tracking_uri=trained_run.tracking_uri)
    assert rec.model_version == trained_run.result.model_version
    local = Recommender.from_dir(trained_run.result.artifact_dir, store=store)
    assert rec.recommend("u5", k=10)["items"] == local.recommend("u5", k=10)["items"]


def test_pyfunc_model_predicts(trained_run):
    import mlflow

    mlflow.set_tracking_uri(trained_run.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/trustrec@champion")
    out = model.predict({"user_id": ["u1", "new-user"], "k": [3, 3]})
    assert [len(o["items"]) for o in out] == [3, 3]
    assert out[1]["personalized"] is False  # no store attached in the pyfunc: history-less users fall back


def test_unsupported_manifest_schema_is_refused(trained_run, tmp_path):
    import json
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(trained_run.result.artifact_dir, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="schema_version 99"):
        Recommender.from_dir(bundle)


def _genre_ild(rec, answer):
    by_id = {it["item_id"]: set(it["genres"]) for it in rec.items}
    sets = [by_id[it["item_id"]] for it in answer["items"]]
    pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1 :]]
    return np.mean([1 - len(a & b) / max(len(a | b), 1) for a, b in pairs])


def test_mmr_diversity_parameter(rec, store):
    plain = rec.recommend("u4", k=10)
    assert rec.recommend("u4", k=10, diversity=1.0) == plain  # lambda 1 is the plain ranking
    diverse = rec.recommend("u4", k=10, diversity=0.3)
    assert len(diverse["items"]) == 10 and diverse["personalized"]
    assert [i["item_id"] for i in diverse["items"]] != [i["item_id"] for i in plain["items"]]
    assert _genre_ild(rec, diverse) > _genre_ild(rec, plain)
    assert not set(store.user_history("u4")) & {i["item_id"] for i in diverse["items"]}
    # re-ranked from the model's own top candidates, keeping their model scores
    pool = {i["item_id"]: i["score"] for i in rec.recommend("u4", k=50)["items"]}
    assert all(pool[i["item_id"]] == i["score"] for i in diverse["items"])


def test_default_diversity_comes_from_the_recommender(trained_run, store):
    diverse_by_default = Recommender.from_dir(trained_run.result.artifact_dir, store=store, diversity=0.3)
    explicit = Recommender.from_dir(trained_run.result.artifact_dir, store=store)
    assert diverse_by_default.recommend("u4", k=10) == explicit.recommend("u4", k=10, diversity=0.3)


def test_an_item_bias_bundle_scores_with_the_bias_and_compares_items_without_it(tmp_path):
    """model.item_bias exports one more coordinate (user 1, item b): scores use it, item-to-item
    likeness (MMR, explanations) must not, or two popular items would look alike."""
    from tests.conftest import REPO, tiny_overrides
    from training.config import load_config
    from training.pipeline import train

    cfg = load_config(REPO / "configs" / "two_tower.yaml", tiny_overrides(tmp_path) + [
        "trainer.epochs=3", "model.item_bias=true", "tracking.register_model=false",
        "data.synthetic.n_users=150", "data.synthetic.n_items=60"])  # fmt: skip
    result = train(cfg)
    store = FeatureStore(f"sqlite:///{tmp_path}/features.db")
    try:
        rec = Recommender.from_dir(result.artifact_dir, store=store)
        d = cfg.model.output_dim
        assert rec.item_vectors.shape[1] == d + 1 and rec.manifest["output"]["item_bias"] is True
        assert np.array_equal(rec.similarity_vectors, rec.item_vectors[:, :d])
        state = rec.user_state("u1")
        user_vec = rec.user_vectors([state], [rec.user_oov])[0]
        assert user_vec[-1] == pytest.approx(1.0)  # the constant coordinate that meets each bias
        answer = rec.recommend("u1", k=5, diversity=0.5)
        by_hand = rec.item_vectors @ user_vec  # cosine part + bias, as trained
        ids = [rec.item_vocab.ids.index(it["item_id"]) for it in answer["items"]]
        assert [it["score"] for it in answer["items"]] == pytest.approx(by_hand[ids].tolist(), abs=1e-5)
    finally:
        store.close()


def test_the_user_cache_reads_nothing_twice_and_never_serves_past_a_change(trained_run, tmp_path):
    """Per-replica cache keyed by the store's change counter: an unchanged store costs one read
    (the counter) per request; any change shows on the very next request."""
    from sqlalchemy import event

    from features.consent import record_consent, set_preferences

    store, rec = own_store(trained_run, tmp_path)
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda conn, cur, stmt, *a: statements.append(stmt))

    first = rec.recommend("u3", k=10)
    cold_reads = len(statements)
    statements.clear()
    counter_reads: list[str] = []
    store.generation()  # opens this thread's counter connection (plain sqlite3, outside SQLAlchemy)
    store._counter_local.conn.set_trace_callback(counter_reads.append)
    assert rec.recommend("u3", k=10) == first
    # nothing committed since: not even the change counter is read (the WAL-index header says so)
    assert statements == [] and counter_reads == []
    assert cold_reads > 1

    other = FeatureStore(str(store.engine.url))  # another replica's connection
    record_consent(other, "u3", {"personalization": False})
    assert rec.recommend("u3", k=10)["personalized"] is False  # the very next request
    record_consent(other, "u3", {"personalization": True})
    blocked = first["items"][0]["item_id"]
    set_preferences(store, "u3", blocked_items=[blocked])  # and this replica's own write
    other.close()
    again = rec.recommend("u3", k=10)
    assert again["personalized"] is True and blocked not in [it["item_id"] for it in again["items"]]

    rec.cache_size = 2  # bounded: least recently used users leave first
    for user in ("u4", "u5", "u6"):
        rec.recommend(user, k=3)
    assert list(rec._cache) == ["u5", "u6"]
    store.close()


def test_a_repeated_request_reuses_its_answer_until_the_store_changes(trained_run, tmp_path):
    """The answer is memoized on the cached user state: a repeat runs neither the user tower nor
    the top-k; each caller gets its own copy; a store change or another (k, exclude_seen, λ)
    computes afresh; at most MAX_MEMO_ANSWERS answers are kept per user."""
    from features.consent import set_preferences
    from serving.recommender import MAX_MEMO_ANSWERS

    store, rec = own_store(trained_run, tmp_path)
    runs: list[int] = []
    session_run = rec.session.run

    class CountingSession:  # the real session, counted
        def run(self, *args, **kwargs):
            runs.append(1)
            return session_run(*args, **kwargs)

    rec.session = CountingSession()
    first = rec.recommend("u3", k=10)
    assert len(runs) == 1
    first["items"][0]["title"] = "changed by a caller"
    first["extra"] = True
    again = rec.recommend("u3", k=10)
    assert len(runs) == 1  # no second tower call
    assert "extra" not in again and again["items"][0]["title"] != "changed by a caller"
    assert again == Recommender.from_dir(trained_run.result.artifact_dir, store=store).recommend("u3", k=10)  # what a fresh replica answers

    rec.recommend("u3", k=5)
    rec.recommend("u3", k=10, diversity=0.5)
    assert len(runs) == 3  # other (k, λ): computed

    blocked = again["items"][0]["item_id"]
    set_preferences(store, "u3", blocked_items=[blocked])  # the change counter moves
    after = rec.recommend("u3", k=10)
    assert len(runs) == 4 and blocked not in [it["item_id"] for it in after["items"]]

    for k in range(1, MAX_MEMO_ANSWERS + 4):
        rec.recommend("u3", k=k)
    assert len(rec._cache["u3"].memo["answers"]) == MAX_MEMO_ANSWERS
    store.close()


def test_users_nothing_is_known_about_share_one_answer_and_a_stated_taste_leaves_it(trained_run, tmp_path):
    """New visitors (no row in the model, nothing in the store) all get the same popularity answer,
    computed once per (k, exclude_seen, λ); one who states a taste gets their own."""
    from features.consent import set_preferences

    store, rec = own_store(trained_run, tmp_path)
    calls: list[int] = []
    popular = rec._popular
    rec._popular = lambda *a, **kw: calls.append(1) or popular(*a, **kw)
    first = rec.recommend("new-visitor-1", k=10, diversity=0.5)
    assert rec.recommend("new-visitor-2", k=10, diversity=0.5) == first and len(calls) == 1
    assert first["personalized"] is False
    genre = rec.items[int(rec.popular[-1])]["genres"][0]  # a genre of a not-so-popular item
    set_preferences(store, "new-visitor-3", liked_genres=[genre])
    steered = rec.recommend("new-visitor-3", k=10, diversity=0.5)
    assert len(calls) == 2 and steered["personalized"] is True and steered != first  # stated tastes steer the list
    store.close()
