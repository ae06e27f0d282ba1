"""MovieLens-100k loader: real data when present (never copied), hand-written ML-format files otherwise.

The tiny files below are made-up rows in the ML-100k layout, not MovieLens content.
"""
import dataclasses

import numpy as np
import pytest

from features.errors import DataFormatError
from features.movielens import ENV_VAR, load_ml100k, resolve_ml100k_path
from features.store import FeatureStore

FLAGS_NONE = "|".join(["0"] * 19)


def _flags(*genres):
    f = ["0"] * 19
    for g in genres:
        f[g] = "1"
    return "|".join(f)


def write_ml_dir(root, data=None, items=None, users=None):
    root.mkdir(parents=True, exist_ok=True)
    users = users or ["1|30|F|writer|00001", "2|41|M|engineer|00002"]
    items = items or [
        f"1|Made Up Film (2001)|01-Jan-2001||http://example.invalid/1|{_flags(1, 15)}",
        f"2|Another Fake (1999)|15-Mar-1999||http://example.invalid/2|{_flags(5)}",
        f"3|No Date Fake|||http://example.invalid/3|{_flags(0)}",
    ]
    data = data or ["1\t1\t5\t1000", "1\t2\t3\t900", "2\t3\t4\t1100", "2\t1\t2\t1200"]
    (root / "u.user").write_text("\n".join(users) + "\n", encoding="latin-1")
    (root / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
    (root / "u.data").write_text("\n".join(data) + "\n", encoding="latin-1")
    return root


@pytest.mark.ml100k
def test_real_ml100k(tmp_path):
    try:
        root = resolve_ml100k_path()
    except FileNotFoundError as e:
        pytest.skip(f"MovieLens-100k absent; set {ENV_VAR} to the ml-100k directory to run this test ({e})")
    ds = load_ml100k(root)
    assert len(ds.interactions) == 100_000
    assert ds.n_users == 943 and ds.n_items == 1682 and len(ds.genre_names) == 19
    assert ds.skipped_rows == 0
    assert set(np.unique(ds.interactions.rating).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert ds.user_vocab.ids[:3] == ["1", "2", "3"]
    assert "zip" not in {f.name for f in dataclasses.fields(ds.users)}
    zips = {line.rstrip("\n").split("|")[4] for line in (root / "u.user").read_text(encoding="latin-1").splitlines()}
    kept = set(ds.users.occupation) | set(ds.users.gender) | {str(a) for a in ds.users.age}
    assert len(zips) > 700 and not zips & kept
    store = FeatureStore(f"sqlite:///{tmp_path / 'fs.db'}")
    store.load_dataset(ds)
    profile = store.user_profile("1")
    assert "zip" not in str(profile).lower() and not any(str(v) in zips for v in profile.values() if v)
    store.close()


def test_tiny_ml_dir_parses(tmp_path):
    ds = load_ml100k(write_ml_dir(tmp_path / "ml"))
    assert ds.user_vocab.ids == ["1", "2"] and ds.item_vocab.ids == ["1", "2", "3"]
    assert ds.items.title[0] == "Made Up Film (2001)"
    assert ds.items.year.tolist() == [2001, 1999, 0]
    assert ds.items.genres == [(1, 15), (5,), (0,)]
    assert ds.genre_names[1] == "Action" and ds.genre_names[15] == "Sci-Fi"
    assert ds.users.age.tolist() == [30, 41] and ds.users.gender == ["F", "M"]
    assert ds.users.occupation == ["writer", "engineer"]
    it = ds.interactions
    assert it.user.tolist() == [0, 0, 1, 1] and it.item.tolist() == [0, 1, 2, 0]
    assert it.rating.tolist() == [5.0, 3.0, 4.0, 2.0] and it.timestamp.tolist() == [1000, 900, 1100, 1200]
    assert "00001" not in repr(ds.users)


@pytest.mark.parametrize(
    "data, line",
    [
        (["1\t1\t5\t1000", "1\t2\t3\t900", "2\t3\tfive\t1100"], 3),  # non-numeric rating
        (["1\t1\t5\t1000", "1\t2\t3"], 2),  # missing field
        (["1\t1\t5\t1000", "1\t2\t3\t900", "2\t3\t4\t1100", "2\t99\t2\t1200"], 4),  # unknown item
    ],
)
def test_malformed_data_line_names_file_and_line(tmp_path, data, line):
    root = write_ml_dir(tmp_path / "ml", data=data)
    with pytest.raises(DataFormatError) as e:
        load_ml100k(root)
    assert e.value.file == str(root / "u.data") and e.value.line == line
    assert f"u.data:{line}:" in str(e.value)


def test_malformed_item_line(tmp_path):
    items = [f"1|Fake (2001)|01-Jan-2001||x|{FLAGS_NONE}", "2|Short row|01-Jan-2001"]
    with pytest.raises(DataFormatError) as e:
        load_ml100k(write_ml_dir(tmp_path / "ml", items=items, data=["1\t1\t3\t5"]))
    assert e.value.file.endswith("u.item") and e.value.line == 2


def test_skip_mode_counts_bad_lines(tmp_path, caplog):
    root = write_ml_dir(tmp_path / "ml", data=["1\t1\t5\t1000", "garbage", "2\t3\tx\t5", "2\t1\t2\t1200"])
    with caplog.at_level("WARNING"):
        ds = load_ml100k(root, on_bad_row="skip")
    assert ds.skipped_rows == 2 and len(ds.interactions) == 2
    assert "skipped 2" in caplog.text and "u.data" in caplog.text


def test_resolve_path_env_var_and_clear_error(tmp_path, monkeypatch):
    root = write_ml_dir(tmp_path / "ml")
    monkeypatch.setenv(ENV_VAR, str(root))
    assert resolve_ml100k_path() == root
    assert resolve_ml100k_path(root) == root
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as e:
        resolve_ml100k_path()
    msg = str(e.value)
    assert "https://grouplens.org/datasets/movielens/100k/" in msg and ENV_VAR in msg and "nowhere" in msg
