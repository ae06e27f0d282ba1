"""Generic loader for interaction tables (CSV or Parquet with a header) and an optional items table.

Column names come from TableConfig, so any export (user,item,rating,time) works without code.
Malformed rows are reported with file and 1-based line (CSV header = line 1; Parquet: row
number) or, with on_bad_row="skip", skipped, counted and logged. Problems are reported in file
order, so under "error" the first bad line is the one named.

`detect_columns` / `detect_item_columns` map the header of a common export (MovieLens
`userId,movieId,rating,timestamp`, `user_id,item_id,...`, `user,item`, ...) to a ColumnMap.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.config import ColumnMap, ItemColumnMap, TableConfig
from features.errors import BadRows
from features.schema import UNKNOWN_AGE, Dataset, Interactions, Items, Users
from features.vocab import Vocab

_SUFFIX_FORMAT = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet"}

Problems = list[tuple[int, str]]  # (1-based line, message)


def _file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix.lower() not in _SUFFIX_FORMAT:
        raise ValueError(f"{path}: cannot infer the format from suffix {path.suffix!r}; set format: csv|parquet")
    return _SUFFIX_FORMAT[path.suffix.lower()]


# Header names detection recognises, per field, compared case-insensitively with every character
# that is not a letter or digit removed ("userId", "user_id", "User-ID" all read "userid").
_CANDIDATES: dict[str, tuple[str, ...]] = {
    "user": ("userid", "user", "uid", "customerid", "customer", "reviewerid", "visitorid", "memberid"),
    "item": ("itemid", "item", "movieid", "movie", "productid", "product", "iid", "asin", "isbn", "bookid", "trackid", "songid", "articleid"),
    "rating": ("rating", "score", "stars", "overall", "bookrating"),
    "timestamp": ("timestamp", "ts", "time", "unixtime", "unixtimestamp", "unixreviewtime"),  # unix seconds
    "title": ("title", "name", "movietitle", "itemname", "producttitle"),
    "genres": ("genres", "genre", "categories", "category", "tags"),
    "year": ("year", "releaseyear"),
}


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def read_header(path: str | Path, delimiter: str = ",") -> list[str]:
    """Column names of a Parquet file (.parquet / .pq) or of a CSV file's first row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix.lower() in (".parquet", ".pq"):
        return list(pq.read_schema(path).names)
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM is not part of the first name
        header = [h.strip() for h in next(csv.reader(f, delimiter=delimiter), [])]
    if not header or header == [""]:
        raise ValueError(f"{path}: empty file, expected a header row")
    return header


def _detect(path: Path, header: list[str], fields: dict[str, bool], key: str) -> dict[str, str | None]:
    """field -> header column (None for an optional field with no match). Every problem at once:
    a required field with no match, or a field that several columns match."""
    found: dict[str, str | None] = {}
    problems = []
    for field, required in fields.items():
        names = _CANDIDATES[field]
        hits = sorted((c for c in header if _norm(c) in names), key=lambda c: names.index(_norm(c)))
        if len(hits) > 1:
            problems.append(f"{key}.{field}: several columns could be it ({', '.join(map(repr, hits))}); set it to one of them")
        elif hits:
            found[field] = hits[0]
        elif required:
            problems.append(f"{key}.{field}: no column looks like it (looked for {', '.join(names)}, any case, ignoring '_', '-' and spaces); set it to the column's name")
        else:
            found[field] = None
    if problems:
        raise ValueError(f"{path}: could not detect the columns from the header {header}:\n  " + "\n  ".join(problems))
    return found


def detect_columns(path: str | Path, delimiter: str = ",") -> ColumnMap:
    """The interaction columns of a file, read from its header: user and item are required, rating
    and timestamp are None when no column looks like one (implicit feedback; no time order).
    Recognised (case-insensitive, '_' '-' and spaces ignored): user = userId, user_id, user, uid,
    customer_id, reviewerID, ...; item = itemId, movieId, item, movie, product_id, asin, ISBN, ...;
    rating = rating, score, stars, overall; timestamp = timestamp, ts, time, unixReviewTime.
    ValueError naming each field it could not map (or could map to several columns)."""
    path = Path(path)
    found = _detect(path, read_header(path, delimiter), {"user": True, "item": True, "rating": False, "timestamp": False}, "data.table.columns")
    return ColumnMap(**found)


def detect_item_columns(path: str | Path, delimiter: str = ",") -> ItemColumnMap:
    """The items-file columns from its header (MovieLens movies.csv: movieId,title,genres): item is
    required; title, genres and year are None when no column looks like one."""
    path = Path(path)
    fields = {"item": True, "title": False, "genres": False, "year": False}
    return ItemColumnMap(**_detect(path, read_header(path, delimiter), fields, "data.table.item_columns"))


def _check_columns(path: Path, present: list[str], wanted: dict[str, str]) -> None:
    """wanted maps config field -> column name; a missing one is a ValueError naming both and the file."""
    for field, column in wanted.items():
        if column not in present:
            raise ValueError(
                f"{path}: column {column!r} (config '{field}') not found; the file has columns {present}. "
                f"Fix the column mapping, or set '{field}' to null if the source has no such column."
            )


def _read_csv(path: Path, wanted: dict[str, str], delimiter: str) -> tuple[dict[str, list], np.ndarray, Problems]:
    """Columns (as strings) of the well-formed rows, their line numbers, and field-count problems."""
    data: dict[str, list] = {c: [] for c in wanted.values()}
    lines, problems = [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = [h.strip() for h in next(reader, [])]
        if not header:
            raise ValueError(f"{path}: empty file, expected a header row")
        _check_columns(path, header, wanted)
        pos = {c: header.index(c) for c in data}
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1  # a quoted field may span several lines
            if not row:
                continue  # blank line
            if len(row) != len(header):
                problems.append((line, f"expected {len(header)} fields, got {len(row)}"))
                continue
            for c, i in pos.items():
                data[c].append(row[i])
            lines.append(line)
    return data, np.array(lines, dtype=np.int64), problems


def _read_parquet(path: Path, wanted: dict[str, str]) -> tuple[dict[str, list], np.ndarray, Problems]:
    """Columns as Python values (None for nulls); timestamps become unix seconds. Line = 1-based row."""
    _check_columns(path, pq.read_schema(path).names, wanted)
    table = pq.read_table(path, columns=list(dict.fromkeys(wanted.values())))
    data = {}
    for c in table.column_names:
        col = table.column(c)
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.timestamp("s", tz=col.type.tz), safe=False).cast(pa.int64())
        data[c] = col.to_pylist()
    return data, np.arange(1, table.num_rows + 1, dtype=np.int64), []


def _read(path: Path, fmt: str, wanted: dict[str, str], delimiter: str):
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if _file_format(path, fmt) == "parquet":
        return _read_parquet(path, wanted)
    return _read_csv(path, wanted, delimiter)


def _ids(values: list) -> np.ndarray:
    return np.array(["" if v is None else str(v).strip() for v in values], dtype=object)


def _numbers(values: list) -> np.ndarray:
    """Float array; NaN where a value is missing or not a finite number."""
    cleaned = [v.strip() if isinstance(v, str) else v for v in values]
    parsed = pd.to_numeric(pd.Series(cleaned, dtype=object), errors="coerce")
    out = np.array(parsed.to_numpy(dtype=np.float64, na_value=np.nan))  # writable copy (pandas CoW)
    out[~np.isfinite(out)] = np.nan
    return out


def _apply_problems(bad: BadRows, lines: np.ndarray, problems: Problems, row_problems: dict[int, str]) -> np.ndarray:
    """Report every problem in line order; returns the mask of rows that are fine."""
    ok = np.ones(len(lines), dtype=bool)
    for row in row_problems:
        ok[row] = False
    merged = problems + [(int(lines[r]), msg) for r, msg in row_problems.items()]
    for line, msg in sorted(merged):
        bad.bad(line, msg)
    return ok


def _load_interactions(cfg: TableConfig, bad: BadRows):
    cols = cfg.columns
    wanted = {k: v for k, v in cols.model_dump().items() if v is not None}
    data, lines, problems = _read(Path(cfg.path), cfg.format, wanted, cfg.delimiter)
    user, item = _ids(data[cols.user]), _ids(data[cols.item])
    rating = _numbers(data[cols.rating]) if cols.rating else np.ones(len(lines))
    ts = _numbers(data[cols.timestamp]) if cols.timestamp else np.zeros(len(lines))
    checks = [
        (user == "", "empty user id"),
        (item == "", "empty item id"),
        (np.isnan(rating), "rating is missing or not a number"),
        (np.isnan(ts), "timestamp is missing or not a number"),
    ]
    row_problems: dict[int, str] = {}
    for mask, message in checks:
        for r in np.flatnonzero(mask):
            row_problems.setdefault(int(r), message)
    ok = _apply_problems(bad, lines, problems, row_problems)
    return user[ok], item[ok], rating[ok].astype(np.float32), np.floor(ts[ok]).astype(np.int64)


def _load_items(cfg: TableConfig, bad: BadRows):
    """raw item id -> (title, genre names, year) from the items file; the last row wins per id."""
    ic = cfg.item_columns
    wanted = {k: v for k, v in ic.model_dump().items() if v is not None}
    data, lines, problems = _read(Path(cfg.items_path), "auto", wanted, cfg.delimiter)
    ids = _ids(data[ic.item])
    raw_years = data[ic.year] if ic.year else [None] * len(lines)
    years = _numbers(raw_years)
    blank_year = np.array([v is None or str(v).strip() == "" for v in raw_years], dtype=bool)
    row_problems: dict[int, str] = {}
    for r in np.flatnonzero(ids == ""):
        row_problems[int(r)] = "empty item id"
    for r in np.flatnonzero(np.isnan(years) & ~blank_year):
        row_problems.setdefault(int(r), f"year {raw_years[r]!r} is not a number")
    ok = _apply_problems(bad, lines, problems, row_problems)
    table: dict[str, tuple[str, list[str], int]] = {}
    for r in np.flatnonzero(ok):
        g = data[ic.genres][r] if ic.genres else None
        names = list(g) if isinstance(g, (list, tuple)) else (g or "").split(cfg.genre_sep)
        title = data[ic.title][r] if ic.title else None
        year = 0 if np.isnan(years[r]) else int(years[r])
        table[ids[r]] = (str(title) if title is not None else ids[r], [n.strip() for n in names if n and n.strip()], year)
    return table


def load_table(cfg: TableConfig, on_bad_row: Literal["error", "skip"] = "error") -> Dataset:
    """Load a Dataset from the configured interaction file (and items file, when given)."""
    bad = BadRows(cfg.path, on_bad_row)
    user, item, rating, ts = _load_interactions(cfg, bad)
    item_bad = BadRows(cfg.items_path or "", on_bad_row)
    catalog = _load_items(cfg, item_bad) if cfg.items_path else {}

    user_vocab = Vocab(dict.fromkeys(user.tolist()), kind="user")  # first-appearance order
    item_vocab = Vocab(dict.fromkeys(list(catalog) + item.tolist()), kind="item")
    genre_names = sorted({g for _, gs, _ in catalog.values() for g in gs})
    genre_index = {g: i for i, g in enumerate(genre_names)}
    meta = [catalog.get(raw, (raw, [], 0)) for raw in item_vocab.ids]  # unknown items: title = id

    inter = Interactions(user_vocab.encode(user), item_vocab.encode(item), rating, ts).drop_duplicate_pairs()
    n_users = len(user_vocab)
    return Dataset(
        name=Path(cfg.path).stem,
        interactions=inter,
        items=Items(
            title=[m[0] for m in meta],
            genres=[tuple(sorted(genre_index[g] for g in dict.fromkeys(m[1]))) for m in meta],
            year=np.array([m[2] for m in meta], dtype=np.int32),
        ),
        users=Users(
            age=np.full(n_users, UNKNOWN_AGE, dtype=np.int32),
            gender=[""] * n_users,
            occupation=[""] * n_users,
            liked_genres=[()] * n_users,
            avoided_genres=[()] * n_users,
        ),
        genre_names=genre_names,
        user_vocab=user_vocab,
        item_vocab=item_vocab,
        skipped_rows=bad.log() + item_bad.log(),
    )
