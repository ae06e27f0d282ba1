"""Loader for `user item item ...` files: one line per user, whitespace-separated, no header.

The format of implicit-feedback datasets published with a fixed split, such as ML-1M implicit
(../shared/data/ml-1m-implicit: train.txt, test.txt, 0-based ids). Every listed item is a
positive (rating 1.0); the files carry no time, so every row of `path` gets timestamp GIVEN_TRAIN
(0) and every row of `test_path` GIVEN_TEST (1): `split.protocol: given` keeps that test part,
the other protocols re-split everything (leave_last_n then takes a line's last items as the most
recent). Ids that are all non-negative integers are indexed in numeric order (ML-1M implicit's
user u is index u), other ids in order of first appearance; ids that appear in no line have no index
(ML-1M implicit: 3,695 items, 11 of its ids 0-3705 appear nowhere). A user listed twice has both
lines; an item listed twice for a user (or in both files) counts once, in its last place.

`users_path` joins an ML-1M `users.dat` (UserID::Gender::Age::Occupation::Zip-code, the UserID
being the lines file's user id + 1, as the ML-1M implicit README says): gender, age and
occupation; the zip code is dropped on read, as for ML-100k. Read with numpy, never copied.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from features.config import LinesConfig
from features.errors import BadRows
from features.schema import UNKNOWN_AGE, Dataset, Interactions, Items, Users
from features.splits import GIVEN_TEST, GIVEN_TRAIN
from features.vocab import Vocab

log = logging.getLogger("features.loaders")

# ML-1M README: occupation codes 0-20
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip


def ml1m_implicit_config(path: str | Path | None = None) -> LinesConfig:
    """The lines source of the ML-1M implicit folder: `path`, else $TRUSTREC_ML1M_IMPLICIT, else
    ../shared/data/ml-1m-implicit (FileNotFoundError naming the folder and what is missing)."""
    from features.sources import named_path

    root = named_path("ml1m-implicit", path)
    users = root / "users.dat"
    return LinesConfig(path=str(root / "train.txt"), test_path=str(root / "test.txt"), users_path=str(users) if users.is_file() else None)


def _read(path: Path, key: str) -> tuple[list[str], np.ndarray, list[str]]:
    """(user id per line, items per line, all item ids in file order) of one lines file."""
    if not path.is_file():
        raise FileNotFoundError(f"{key}: file not found: {path}")
    users, counts, items = [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            tokens = line.split()
            if not tokens:
                continue  # blank line
            users.append(tokens[0])
            counts.append(len(tokens) - 1)
            items.extend(tokens[1:])
    return users, np.array(counts, dtype=np.int64), items


def _vocab(ids: list[str], kind: str) -> tuple[Vocab, np.ndarray]:
    """Vocab over `ids` (numeric order when every id is a non-negative integer written plainly,
    else first appearance) and the index of every element of `ids`."""
    raw = np.asarray(ids, dtype=str)
    unique, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    if len(unique) and all(u.isdigit() and (u == "0" or u[0] != "0") for u in unique.tolist()):
        order = np.argsort(unique.astype(np.int64), kind="stable")
    else:
        order = np.argsort(first, kind="stable")
    rank = np.empty(len(unique), dtype=np.int64)
    rank[order] = np.arange(len(unique))
    return Vocab(unique[order].tolist(), kind=kind), rank[inverse.reshape(-1)]


def _read_users(path: Path, user_vocab: Vocab, bad: BadRows) -> Users:
    """Demographics from an ML-1M users.dat for the users whose lines id + 1 is its UserID."""
    n = len(user_vocab)
    age = np.full(n, UNKNOWN_AGE, dtype=np.int32)
    gender, occupation = [""] * n, [""] * n
    if not path.is_file():
        raise FileNotFoundError(f"data.lines.users_path: file not found: {path}")
    by_user_id = {int(u) + 1: i for i, u in enumerate(user_vocab.ids) if u.isdigit()}
    found = 0
    with open(path, encoding="latin-1") as f:
        for n_line, line in enumerate(f, start=1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            fields = text.split("::")
            if len(fields) != 5:
                bad.bad(n_line, f"expected 5 '::'-separated fields (UserID::Gender::Age::Occupation::Zip-code), got {len(fields)}")
                continue
            uid, g, a, occ = (x.strip() for x in fields[:4])  # fields[4], the zip code, is not kept
            if not (uid.isdigit() and g in ("F", "M") and a.isdigit() and occ.isdigit() and int(occ) < len(ML1M_OCCUPATIONS)):
                bad.bad(n_line, "bad user row: UserID and Age must be integers, Gender F or M, Occupation 0-20")
                continue
            i = by_user_id.get(int(uid))
            if i is None:
                continue  # a user without interactions here
            age[i], gender[i], occupation[i] = int(a), g, ML1M_OCCUPATIONS[int(occ)]
            found += 1
    if found < n:
        log.warning("%s: %d of %d users have no row (their demographics stay unknown)", path, n - found, n)
    return Users(age=age, gender=gender, occupation=occupation, liked_genres=[()] * n, avoided_genres=[()] * n)


def load_lines(cfg: LinesConfig, on_bad_row: Literal["error", "skip"] = "error", name: str | None = None) -> Dataset:
    """A Dataset from `cfg.path` (and `cfg.test_path`, `cfg.users_path`); see the module doc."""
    parts = [(Path(cfg.path), "data.lines.path", GIVEN_TRAIN)]
    if cfg.test_path:
        parts.append((Path(cfg.test_path), "data.lines.test_path", GIVEN_TEST))
    line_users, counts, items, stamps = [], [], [], []
    for path, key, stamp in parts:
        u, c, i = _read(path, key)
        line_users += u
        counts.append(c)
        items += i
        stamps.append(np.full(int(c.sum()), stamp, dtype=np.int64))
    counts_all = np.concatenate(counts)
    if not items:
        raise ValueError(f"data.lines.path: no interaction in {cfg.path}" + (f" and {cfg.test_path}" if cfg.test_path else ""))
    user_vocab, line_user = _vocab(line_users, "user")
    item_vocab, item = _vocab(items, "item")
    user = np.repeat(line_user, counts_all)
    inter = Interactions(user, item, np.ones(len(item), dtype=np.float32), np.concatenate(stamps)).drop_duplicate_pairs()
    n_users, n_items = len(user_vocab), len(item_vocab)
    bad = BadRows(cfg.users_path or "", on_bad_row)
    if cfg.users_path:
        users = _read_users(Path(cfg.users_path), user_vocab, bad)
    else:
        users = Users(np.full(n_users, UNKNOWN_AGE, dtype=np.int32), [""] * n_users, [""] * n_users, [()] * n_users, [()] * n_users)
    return Dataset(
        name=name or Path(cfg.path).stem,
        interactions=inter,
        items=Items(title=list(item_vocab.ids), genres=[()] * n_items, year=np.zeros(n_items, dtype=np.int32)),
        users=users,
        genre_names=[],
        user_vocab=user_vocab,
        item_vocab=item_vocab,
        skipped_rows=bad.log(),
    )
