"""Hybrid model served from its bundle: stated genres steer a brand-new user, demographics are
optional inputs, and the ONNX feed built by serving matches what training evaluated."""
from pathlib import Path

import numpy as np
import pytest

from features.store import FeatureStore
from serving.recommender import Recommender

REPO = Path(__file__).resolve().parents[2]
LIKED = ["Comedy", "Horror"]


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    from training.config import load_config
    from training.pipeline import train

    root = tmp_path_factory.mktemp("hybrid")
    cfg = load_config(REPO / "configs" / "hybrid.yaml", [
        "tracking.enabled=false", "trainer.progress=false", "trainer.epochs=25",
        f"export.output_dir={root}/bundle", f"store.url=sqlite:///{root}/features.db", f"trainer.checkpoint_dir={root}/ckpt",
    ])  # fmt: skip
    result = train(cfg)
    store = FeatureStore(f"sqlite:///{root}/features.db")
    yield Recommender.from_dir(result.artifact_dir, store=store), store, result
    store.close()


def genres_of(rec: Recommender, answer: dict) -> list[set[str]]:
    by_id = {it["item_id"]: set(it["genres"]) for it in rec.items}
    return [by_id[it["item_id"]] for it in answer["items"]]


def test_brand_new_user_with_stated_genres_gets_them(hybrid):
    rec, store, _ = hybrid
    store.upsert_user("fresh-user", liked_genres=LIKED)
    answer = rec.recommend("fresh-user", k=10)
    assert answer["personalized"] is True  # from stated preferences alone
    share = np.mean([bool(g & set(LIKED)) for g in genres_of(rec, answer)])
    assert share >= 0.8, share
    # the popularity list a stranger gets does not match those genres nearly as well
    stranger = rec.recommend("someone-else", k=10)
    assert stranger["personalized"] is False
    assert np.mean([bool(g & set(LIKED)) for g in genres_of(rec, stranger)]) < share


def test_stated_genres_change_the_list(hybrid):
    rec, store, _ = hybrid
    store.upsert_user("switcher", liked_genres=["Comedy"])
    comedy = rec.recommend("switcher", k=10)
    store.upsert_user("switcher", liked_genres=["Horror"])
    horror = rec.recommend("switcher", k=10)
    assert [i["item_id"] for i in comedy["items"]] != [i["item_id"] for i in horror["items"]]
    assert sum("Horror" in g for g in genres_of(rec, horror)) > sum("Horror" in g for g in genres_of(rec, comedy))


def test_demographics_are_inputs_of_the_served_tower(hybrid):
    rec, store, _ = hybrid
    state = rec.user_state("u3")
    assert state.profile and state.profile["gender"] in ("F", "M")
    feed = rec.feed([state], [rec.user_oov])
    assert feed["gender"][0] > 0 and feed["age"][0] > 0  # 0 would mean "missing"
    blank = type(state)(state.items, state.ratings, {**state.profile, "gender": None, "age": None, "occupation": None})
    assert not np.allclose(rec.user_vectors([state], [rec.user_oov]), rec.user_vectors([blank], [rec.user_oov]))


def test_served_vectors_match_training_evaluation(hybrid):
    """The feed serving builds from the store equals the feed training built from the dataset."""
    rec, _, result = hybrid
    for user in ["u1", "u2", "u3"]:
        assert rec.recommend(user, k=5)["personalized"] is True
    assert result.manifest["parity"]["parity/torchrec_vs_onnx"] <= 1e-5
    assert set(result.manifest["features"]["user"]) >= {"history", "age", "gender", "occupation", "liked", "avoided"}


def test_avoided_genres_never_appear(hybrid):
    rec, store, _ = hybrid
    profile = store.user_profile("u5")
    store.upsert_user("u5", age=profile["age"], gender=profile["gender"], occupation=profile["occupation"],
                      liked_genres=profile["liked_genres"], avoided_genres=["Horror", "Comedy"])  # fmt: skip
    for kwargs in ({}, {"diversity": 0.3}):
        answer = rec.recommend("u5", k=50, **kwargs)
        assert answer["personalized"] and len(answer["items"]) == 50
        assert not any(g & {"Horror", "Comedy"} for g in genres_of(rec, answer))
    store.upsert_user("picky-new", liked_genres=["Drama"], avoided_genres=["Horror"])
    assert not any("Horror" in g for g in genres_of(rec, rec.recommend("picky-new", k=30)))


def test_cold_user_lists_lead_with_liked_genres_even_when_diversified(hybrid):
    rec, store, _ = hybrid
    store.upsert_user("fresh-diverse", liked_genres=["Comedy"])
    for kwargs in ({}, {"diversity": 0.5}):
        answer = rec.recommend("fresh-diverse", k=10, **kwargs)
        assert all("Comedy" in g for g in genres_of(rec, answer))
