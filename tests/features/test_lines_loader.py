"""The `lines` source (`user item item ...` per line, features/lines.py): vocabularies, rows, the
given split, the ML-1M users.dat join, errors naming the config key, and the real ML-1M implicit
folder when it is there."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from features.config import DataConfig, LinesConfig, SplitConfig
from features.datasets import drop_users, load_dataset
from features.errors import DataFormatError
from features.lines import load_lines
from features.sources import named_path
from features.splits import split, stratified_split

TRAIN = "0 5 3 5\n2 3\n\n1 7\n"  # user 0 lists item 5 twice; a blank line
TEST = "0 7\n3 5 9\n"  # user 3 appears only here, item 9 too


def pairs(ds, inter):
    return [(ds.user_vocab.ids[u], ds.item_vocab.ids[i]) for u, i in zip(inter.user, inter.item)]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "train.txt").write_text(TRAIN)
    (tmp_path / "test.txt").write_text(TEST)
    return tmp_path


def test_rows_vocabularies_and_timestamps_by_hand(files):
    ds = load_lines(LinesConfig(path=str(files / "train.txt"), test_path=str(files / "test.txt")))
    # users 0, 1, 2, 3 and items 3, 5, 7, 9 in numeric order: index = rank of the id
    assert ds.user_vocab.ids == ["0", "1", "2", "3"] and ds.item_vocab.ids == ["3", "5", "7", "9"]
    # train rows (0,5) (0,3) (0,5) (2,3) (1,7), test rows (0,7) (3,5) (3,9); the repeated (0,5) keeps its last place
    assert pairs(ds, ds.interactions) == [("0", "3"), ("0", "5"), ("2", "3"), ("1", "7"), ("0", "7"), ("3", "5"), ("3", "9")]
    assert ds.interactions.timestamp.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert ds.interactions.rating.tolist() == [1.0] * 7  # implicit: every listed item is a positive
    assert ds.items.title == ["3", "5", "7", "9"] and ds.items.year.tolist() == [0] * 4 and ds.genre_names == []
    assert ds.users.age.tolist() == [-1] * 4 and ds.users.gender == [""] * 4 and ds.name == "train"


def test_given_split_is_the_test_file_exactly(files):
    ds = load_dataset(DataConfig(source="lines", lines=LinesConfig(path=str(files / "train.txt"), test_path=str(files / "test.txt"))))
    s = split(ds.interactions, SplitConfig(protocol="given", val_fraction=0))
    assert pairs(ds, s.test) == [("0", "7"), ("3", "5"), ("3", "9")]
    assert pairs(ds, s.train) == [("0", "3"), ("0", "5"), ("2", "3"), ("1", "7")] and s.val is None
    # validation is carved from the given train part as stratified does it: per item, seed + 1
    s = split(ds.interactions, SplitConfig(protocol="given", val_fraction=0.5, seed=4))
    train, val = stratified_split(ds.interactions.take(ds.interactions.timestamp == 0), 0.5, "item", 5)
    assert pairs(ds, s.train) == pairs(ds, train) and pairs(ds, s.val) == pairs(ds, val)
    assert pairs(ds, s.test) == [("0", "7"), ("3", "5"), ("3", "9")]
    # erasing a user keeps the split marks of everyone else
    kept = drop_users(ds, {"3"})
    assert pairs(kept, split(kept.interactions, SplitConfig(protocol="given", val_fraction=0)).test) == [("0", "7")]


def test_without_a_test_file_every_protocol_but_given_applies(files):
    ds = load_lines(LinesConfig(path=str(files / "train.txt")))
    assert ds.n_users == 3 and ds.n_items == 3 and len(ds.interactions) == 4
    with pytest.raises(ValueError, match="split.protocol: 'given' needs data published with a fixed test part"):
        split(ds.interactions, SplitConfig(protocol="given"))
    # leave_last_n: without time, a line's last item counts as the most recent (user 0: item 5, listed last)
    s = split(ds.interactions, SplitConfig(protocol="leave_last_n", val_fraction=0))
    assert pairs(ds, s.test) == [("0", "5")]


def test_other_ids_keep_their_first_appearance(tmp_path):
    (tmp_path / "l.txt").write_text("bob x y\nann\ttz x\n07 y\n")  # tabs split too; "07" is not a plain integer
    ds = load_lines(LinesConfig(path=str(tmp_path / "l.txt")))
    assert ds.user_vocab.ids == ["bob", "ann", "07"] and ds.item_vocab.ids == ["x", "y", "tz"]
    assert pairs(ds, ds.interactions) == [("bob", "x"), ("bob", "y"), ("ann", "tz"), ("ann", "x"), ("07", "y")]


USERS = "1::F::25::12::12345\n2::M::1::0::00000\n4::M::56::20::99999\n9::F::18::3::55555\n"


def test_users_dat_joined_by_user_id_plus_one(files):
    (files / "users.dat").write_text(USERS)
    ds = load_lines(LinesConfig(path=str(files / "train.txt"), test_path=str(files / "test.txt"), users_path=str(files / "users.dat")))
    # user 0 <- UserID 1, user 1 <- 2, user 2 has no row (UserID 3), user 3 <- 4; UserID 9 has no user here
    assert ds.users.age.tolist() == [25, 1, -1, 56]
    assert ds.users.gender == ["F", "M", "", "M"]
    assert ds.users.occupation == ["programmer", "other", "", "writer"]


def test_bad_users_row_names_the_file_and_line_without_the_id(files):
    (files / "users.dat").write_text(USERS + "7::X::25::1::secret\n")
    cfg = LinesConfig(path=str(files / "train.txt"), users_path=str(files / "users.dat"))
    with pytest.raises(DataFormatError) as e:
        load_lines(cfg)
    assert e.value.line == 5 and "users.dat:5" in str(e.value) and "7::" not in str(e.value) and "secret" not in str(e.value)
    assert load_lines(cfg, on_bad_row="skip").skipped_rows == 1


def test_errors_name_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.lines.path: file not found"):
        load_lines(LinesConfig(path=str(tmp_path / "nope.txt")))
    (tmp_path / "t.txt").write_text("0 1\n")
    with pytest.raises(FileNotFoundError, match="data.lines.test_path: file not found"):
        load_lines(LinesConfig(path=str(tmp_path / "t.txt"), test_path=str(tmp_path / "nope.txt")))
    (tmp_path / "empty.txt").write_text("\n0\n")
    with pytest.raises(ValueError, match="data.lines.path: no interaction"):
        load_lines(LinesConfig(path=str(tmp_path / "empty.txt")))
    with pytest.raises(ValidationError, match="data.lines"):
        DataConfig(source="lines")
    with pytest.raises(ValidationError, match="test_pth"):
        DataConfig.model_validate({"source": "lines", "lines": {"path": "x", "test_pth": "y"}})


def test_named_ml1m_implicit_source_reads_the_folder(files, monkeypatch):
    (files / "users.dat").write_text(USERS)
    monkeypatch.setenv("TRUSTREC_ML1M_IMPLICIT", str(files))
    ds = load_dataset(DataConfig(source="ml1m-implicit"))
    assert ds.name == "ml-1m-implicit" and ds.n_users == 4 and ds.n_items == 4 and ds.users.gender[0] == "F"
    assert load_dataset(DataConfig(source="ml1m-implicit", path=str(files))).n_users == 4  # data.path wins
    monkeypatch.setenv("TRUSTREC_ML1M_IMPLICIT", str(files / "nowhere"))
    with pytest.raises(FileNotFoundError, match="ml1m-implicit not found at .*nowhere.*TRUSTREC_ML1M_IMPLICIT; missing train.txt, test.txt"):
        load_dataset(DataConfig(source="ml1m-implicit"))


def _ml1m() -> tuple[Path | None, str]:
    try:
        return named_path("ml1m-implicit"), ""
    except FileNotFoundError as e:  # its message names the folder tried and the env var to set
        return None, f"skipped: {e}"


ML1M, ML1M_ABSENT = _ml1m()


@pytest.mark.skipif(ML1M is None, reason=ML1M_ABSENT)
def test_real_ml1m_implicit_matches_its_readme():
    ds = load_dataset(DataConfig(source="ml1m-implicit", path=str(ML1M)))
    # README: 6,040 users, 720,152 + 200,041 interactions, train and test disjoint; 3,695 of the ids 0-3705 appear
    assert ds.n_users == 6040 and ds.n_items == 3695 and len(ds.interactions) == 920_193
    s = split(ds.interactions, SplitConfig(protocol="given"))
    assert len(s.test) == 200_041 and len(s.train) + len(s.val) == 720_152
    assert ds.user_vocab.ids[:3] == ["0", "1", "2"] and ds.users.gender[0] == "F" and ds.users.age[1] == 56  # users.dat rows 1 and 2
    assert np.all(ds.users.age > 0)  # every user has a users.dat row
