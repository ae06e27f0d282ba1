"""`trustrec recommend` against a real bundle and a real SQLite feature store: trained here from
configs/table_example.yaml (the documented example, so this also checks it runs as shipped).

Unknown users are told so, known users never get an item they rated, and a store file that does
not exist is an error naming the flag or key, never created."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cli.main import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The table example trained as shipped, every output redirected into a temp dir."""
    from training.config import load_config
    from training.pipeline import train

    root = tmp_path_factory.mktemp("table_example")
    cfg = load_config(REPO / "configs" / "table_example.yaml", [
        f"data.table.path={REPO}/examples/table/ratings.csv", f"data.table.items_path={REPO}/examples/table/items.csv",
        "tracking.enabled=false", f"export.output_dir={root}/bundle", f"store.url=sqlite:///{root}/features.db",
        f"trainer.checkpoint_dir={root}/ckpt",
    ])  # fmt: skip
    result = train(cfg)
    return root, Path(result.artifact_dir), f"sqlite:///{root}/features.db"


def recommend(capsys, *argv: str) -> tuple[int, list[dict], str]:
    code = main(["recommend", *argv])
    out, err = capsys.readouterr()
    answers = [json.loads(chunk) for chunk in _objects(out)] if code == 0 else []
    return code, answers, err


def _objects(text: str) -> list[str]:
    """The pretty-printed JSON objects the command prints one after another."""
    chunks, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth, start = depth + 1, (i if depth == 0 else start)
        elif ch == "}":
            depth -= 1
            if depth == 0:
                chunks.append(text[start : i + 1])
    return chunks


def ids(answer: dict) -> list[str]:
    return [it["item_id"] for it in answer["items"]]


def test_known_user_never_gets_an_item_they_rated(example, capsys):
    from features.store import FeatureStore
    from serving.recommender import Recommender

    root, bundle, url = example
    with FeatureStore(url) as store:
        rated = set(store.user_history("1"))
        rec = Recommender.from_dir(bundle, store)
        ranked = ids(rec.recommend("1", k=60, exclude_seen=False))  # the whole catalog, rated items included
    assert len(rated) >= 5
    k = 20
    assert set(ranked[:k]) & rated  # without the exclusion some rated items would be in the top 20
    code, [answer], _ = recommend(capsys, "1", "-k", str(k), "--model", str(bundle), "--store-url", url, "--config", str(root / "none.yaml"))
    assert code == 0 and answer["user_id"] == "1" and answer["personalized"] is True and "reason" not in answer
    assert not set(ids(answer)) & rated
    assert ids(answer) == [i for i in ranked if i not in rated][:k]  # the model's order, rated items left out


def test_unknown_user_is_told_so(example, capsys):
    root, bundle, url = example
    manifest = json.loads((bundle / "manifest.json").read_text())
    code, [known, unknown], _ = recommend(capsys, "2", "never-seen", "-k", "5", "--model", str(bundle), "--store-url", url)
    assert code == 0 and known["personalized"] is True
    assert unknown["user_id"] == "never-seen" and unknown["personalized"] is False
    assert ids(unknown) == manifest["popularity"][:5]  # the popularity list, as the HTTP API answers
    assert unknown["reason"].startswith("unknown user: neither the model nor the feature store")


def test_a_user_the_store_has_no_history_of_is_not_called_personalized(example, capsys, tmp_path):
    """The issue's case: a model that does not read user ids, a store without the user's history.
    Every such user got the same list labelled personalized (serving/recommender.py now agrees)."""
    from features.store import FeatureStore

    _, bundle, _ = example
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "user_id" not in manifest["features"]["user"]
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    FeatureStore(empty).close()  # an existing store that holds nobody
    code, answers, _ = recommend(capsys, "1", "2", "-k", "5", "--model", str(bundle), "--store-url", empty)
    assert code == 0 and [a["personalized"] for a in answers] == [False, False]
    assert ids(answers[0]) == ids(answers[1]) == manifest["popularity"][:5]
    assert all(a["reason"].startswith("nothing to personalize from") for a in answers)  # the model knows them, the store does not


def test_missing_store_file_is_an_error_and_is_not_created(example, capsys, tmp_path):
    _, bundle, _ = example
    missing = tmp_path / "typo.db"
    code, _, err = recommend(capsys, "1", "--model", str(bundle), "--store-url", f"sqlite:///{missing}")
    assert code == 2 and not missing.exists()
    assert err.startswith(f"trustrec recommend: error: --store-url sqlite:///{missing}: no such file {missing}")
    assert "Traceback" not in err

    serve = tmp_path / "serve.yaml"  # a serve config whose store_url names no file: the key is named
    default = tmp_path / "data" / "features.db"
    serve.write_text(yaml.safe_dump({"applications": [{"name": "trustrec", "import_path": "serving.app:build_app", "args": {"store_url": f"sqlite:///{default}"}}]}))
    code, _, err = recommend(capsys, "1", "--model", str(bundle), "--config", str(serve))
    assert code == 2 and not default.exists() and not default.parent.exists()
    assert f"{serve}: args.store_url sqlite:///{default}: no such file" in err


def test_a_file_that_is_no_store_is_refused_untouched(example, capsys, tmp_path):
    import sqlite3

    _, bundle, _ = example
    other = tmp_path / "mlflow.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE runs (id TEXT)")
    before = other.read_bytes()
    code, _, err = recommend(capsys, "1", "--model", str(bundle), "--store-url", f"sqlite:///{other}")
    assert code == 2 and "is not a trustrec feature store" in err and other.read_bytes() == before
    (tmp_path / "text.db").write_text("hello")
    code, _, err = recommend(capsys, "1", "--model", str(bundle), "--store-url", f"sqlite:///{tmp_path / 'text.db'}")
    assert code == 2 and "is not a SQLite database" in err


def test_no_consent_is_the_reason_and_history_is_not_used(example, capsys, tmp_path):
    import shutil

    from features.consent import record_consent
    from features.store import FeatureStore

    root, bundle, _ = example
    copy = tmp_path / "store.db"  # the module's store stays as trained
    shutil.copy(root / "features.db", copy)
    url = f"sqlite:///{copy}"
    with FeatureStore(url) as store:
        record_consent(store, "3", {"personalization": False})
    manifest = json.loads((bundle / "manifest.json").read_text())
    code, [answer], _ = recommend(capsys, "3", "-k", "5", "--model", str(bundle), "--store-url", url)
    assert code == 0 and answer["personalized"] is False
    assert answer["reason"] == "no consent to personalization (consent regime opt_out): popularity list"
    assert ids(answer) == manifest["popularity"][:5]  # nothing of their history read, not even to exclude it


def test_a_missing_serve_config_is_named(example, capsys, tmp_path):
    _, bundle, _ = example
    code, _, err = recommend(capsys, "1", "--model", str(bundle), "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and f"--config {tmp_path / 'nope.yaml'}: no such file" in err
