"""MovieLens-100k loader (u.data, u.item, u.user).

The GroupLens licence forbids redistributing the data, so it is never copied into the repo:
it is read in place from $TRUSTREC_ML100K or <repo>/../shared/data/ml-100k. Zip codes are
dropped on read (a quasi-identifier the recommender does not need).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np

from features.errors import BadRows
from features.schema import Dataset, Interactions, Items, Users
from features.vocab import Vocab

ENV_VAR = "TRUSTREC_ML100K"
DOWNLOAD_URL = "https://grouplens.org/datasets/movielens/100k/"
DEFAULT_PATH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]
_REQUIRED = ("u.data", "u.item", "u.user")


def resolve_ml100k_path(path: str | Path | None = None) -> Path:
    """The ML-100k directory: explicit path, else $TRUSTREC_ML100K, else the shared default.

    Raises FileNotFoundError saying where to download the data and which env var to set.
    """
    source = "argument" if path is not None else ENV_VAR if os.environ.get(ENV_VAR) else "default location"
    root = Path(path if path is not None else os.environ.get(ENV_VAR) or DEFAULT_PATH).expanduser()
    missing = [f for f in _REQUIRED if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MovieLens-100k not found at {root} ({source}; missing {', '.join(missing)}). "
            f"Download ml-100k.zip from {DOWNLOAD_URL}, unzip it, and set {ENV_VAR}=/path/to/ml-100k "
            f"(or pass the path explicitly)."
        )
    return root


def _lines(path: Path, encoding: str):
    """(1-based line number, stripped text) for every non-blank line."""
    with open(path, encoding=encoding, newline="") as f:
        for n, line in enumerate(f, start=1):
            text = line.rstrip("\r\n")
            if text.strip():
                yield n, text


def _read_users(path: Path, bad: BadRows):
    ids, age, gender, occupation, seen = [], [], [], [], set()
    for n, line in _lines(path, "latin-1"):
        f = line.split("|")
        if len(f) != 5:
            bad.bad(n, f"expected 5 '|'-separated fields (id|age|gender|occupation|zip), got {len(f)}")
            continue
        if not f[0].strip() or not f[1].strip().isdigit() or f[2] not in ("F", "M"):
            bad.bad(n, f"bad user row: id={f[0]!r} age={f[1]!r} gender={f[2]!r}")
            continue
        if f[0].strip() in seen:
            bad.bad(n, f"duplicate user id {f[0]!r}")
            continue
        seen.add(f[0].strip())
        ids.append(f[0].strip())
        age.append(int(f[1]))
        gender.append(f[2])
        occupation.append(f[3].strip())  # f[4], the zip code, is deliberately not kept
    return ids, age, gender, occupation


def _read_items(path: Path, bad: BadRows):
    n_fields = 5 + len(ML100K_GENRES)
    ids, titles, genres, years, seen = [], [], [], [], set()
    for n, line in _lines(path, "latin-1"):
        f = line.split("|")
        if len(f) != n_fields:
            bad.bad(n, f"expected {n_fields} '|'-separated fields, got {len(f)}")
            continue
        flags = f[5:]
        date = f[2].strip()
        if not f[0].strip() or any(x not in ("0", "1") for x in flags) or (date and not date[-4:].isdigit()):
            bad.bad(n, f"bad item row: id={f[0]!r} release date={f[2]!r} genre flags must be 0/1")
            continue
        if f[0].strip() in seen:
            bad.bad(n, f"duplicate item id {f[0]!r}")
            continue
        seen.add(f[0].strip())
        ids.append(f[0].strip())
        titles.append(f[1])
        genres.append(tuple(g for g, x in enumerate(flags) if x == "1"))
        years.append(int(date[-4:]) if date else 0)
    return ids, titles, genres, years


def _read_ratings(path: Path, bad: BadRows, users: Vocab, items: Vocab):
    u, i, r, t = [], [], [], []
    for n, line in _lines(path, "latin-1"):
        f = line.split("\t")
        if len(f) != 4:
            bad.bad(n, f"expected 4 tab-separated fields (user item rating timestamp), got {len(f)}")
            continue
        try:
            rating, ts = float(f[2]), int(f[3])
        except ValueError:
            bad.bad(n, f"non-numeric rating {f[2]!r} or timestamp {f[3]!r}")
            continue
        ui, ii = users.get(f[0].strip()), items.get(f[1].strip())
        if ui is None or ii is None:
            bad.bad(n, f"user {f[0]!r} or item {f[1]!r} is not listed in u.user / u.item")
            continue
        u.append(ui)
        i.append(ii)
        r.append(rating)
        t.append(ts)
    return u, i, r, t


def load_ml100k(path: str | Path | None = None, on_bad_row: Literal["error", "skip"] = "error") -> Dataset:
    """Load MovieLens-100k as a Dataset; malformed lines raise DataFormatError(file, line) or are skipped."""
    root = resolve_ml100k_path(path)
    bads = [BadRows(root / name, on_bad_row) for name in ("u.user", "u.item", "u.data")]
    uids, age, gender, occupation = _read_users(root / "u.user", bads[0])
    iids, titles, genres, years = _read_items(root / "u.item", bads[1])
    user_vocab, item_vocab = Vocab(uids, kind="user"), Vocab(iids, kind="item")
    u, i, r, t = _read_ratings(root / "u.data", bads[2], user_vocab, item_vocab)
    inter = Interactions(
        np.array(u, dtype=np.int64), np.array(i, dtype=np.int64),
        np.array(r, dtype=np.float32), np.array(t, dtype=np.int64),
    ).drop_duplicate_pairs()
    return Dataset(
        name="ml-100k",
        interactions=inter,
        items=Items(title=titles, genres=genres, year=np.array(years, dtype=np.int32)),
        users=Users(
            age=np.array(age, dtype=np.int32),
            gender=gender,
            occupation=occupation,
            liked_genres=[()] * len(uids),  # MovieLens has no stated preferences
            avoided_genres=[()] * len(uids),
        ),
        genre_names=list(ML100K_GENRES),
        user_vocab=user_vocab,
        item_vocab=item_vocab,
        skipped_rows=sum(b.log() for b in bads),
    )
