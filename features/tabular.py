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
from features.errors import BadRows, logger
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

_INTERACTION_FIELDS = {"user": True, "item": True, "rating": False, "timestamp": False}  # field -> required
_ITEM_FIELDS = {"item": True, "title": False, "genres": False, "year": False}


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def read_header(path: str | Path, delimiter: str = ",", fmt: str = "auto") -> list[str]:
    """Column names of a Parquet file (fmt parquet, or auto and a .parquet / .pq suffix) or of a
    CSV file's first row (any other suffix)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if fmt == "parquet" or (fmt == "auto" and path.suffix.lower() in (".parquet", ".pq")):
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
    return ColumnMap(**_detect(path, read_header(path, delimiter), _INTERACTION_FIELDS, "data.table.columns"))


def detect_item_columns(path: str | Path, delimiter: str = ",") -> ItemColumnMap:
    """The items-file columns from its header (MovieLens movies.csv: movieId,title,genres): item is
    required; title, genres and year are None when no column looks like one."""
    path = Path(path)
    return ItemColumnMap(**_detect(path, read_header(path, delimiter), _ITEM_FIELDS, "data.table.item_columns"))


# What to do about a configured column the file lacks: required ones must be mapped, optional
# ones may be null (and what null then means).
_ADVICE = {
    "user": "required: set it to the column that holds user ids",
    "item": "required: set it to the column that holds item ids",
    "rating": "set it to the file's rating column, or to null if there is none (implicit feedback: every rating 1.0)",
    "timestamp": "set it to the file's column of unix seconds, or to null if there is none (every timestamp 0)",
    "title": "set it to the file's title column, or to null if there is none (the item id is the title)",
    "genres": "set it to the file's genre column, or to null if there is none (no genres)",
    "year": "set it to the file's year column, or to null if there is none (years come from titles ending in '(YYYY)', else 0)",
}


def _check_columns(path: Path, present: list[str], wanted: dict[str, str], key: str) -> None:
    """wanted maps config field -> column name; every missing one is named in ONE ValueError, by
    its full config key (`key`.field), with the file's columns and what to set it to."""
    missing = [(field, column) for field, column in wanted.items() if column not in present]
    if not missing:
        return
    lines = [f"{key}.{field}: column {column!r} not found; {_ADVICE[field]}" for field, column in missing]
    raise ValueError(
        f"{path}: {len(missing)} configured column(s) not in the file, which has columns {present}:\n  "
        + "\n  ".join(lines)
        + f"\n  (or remove the whole {key} block to have the columns detected from the header)"
    )


def _read_csv(path: Path, wanted: dict[str, str], delimiter: str, key: str) -> tuple[dict[str, list], np.ndarray, Problems]:
    """Columns (as strings) of the well-formed rows, their line numbers, and field-count problems."""
    data: dict[str, list] = {c: [] for c in wanted.values()}
    lines, problems = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM is not part of the first name
        reader = csv.reader(f, delimiter=delimiter)
        header = [h.strip() for h in next(reader, [])]
        if not header:
            raise ValueError(f"{path}: empty file, expected a header row")
        _check_columns(path, header, wanted, key)
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


def _read_parquet(path: Path, wanted: dict[str, str], key: str) -> tuple[dict[str, list], np.ndarray, Problems]:
    """Columns as Python values (None for nulls); timestamps become unix seconds. Line = 1-based row."""
    _check_columns(path, pq.read_schema(path).names, wanted, key)
    table = pq.read_table(path, columns=list(dict.fromkeys(wanted.values())))
    data = {}
    for c in table.column_names:
        col = table.column(c)
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.timestamp("s", tz=col.type.tz), safe=False).cast(pa.int64())
        data[c] = col.to_pylist()
    return data, np.arange(1, table.num_rows + 1, dtype=np.int64), []


def _read(path: Path, fmt: str, wanted: dict[str, str], delimiter: str, key: str):
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if _file_format(path, fmt) == "parquet":
        return _read_parquet(path, wanted, key)
    return _read_csv(path, wanted, delimiter, key)


def _resolve(path: Path, fmt: str, delimiter: str, given, key: str):
    """The column map to read `path` with. A map left at its defaults (the config has no `key`
    block, or spells out exactly the defaults) is kept when the header has every default column,
    else the columns are detected from the header; an explicit map is used as given."""
    default = type(given)()
    if given != default:
        return given
    header = read_header(path, delimiter, _file_format(path, fmt) if path.is_file() else fmt)
    if all(c in header for c in default.model_dump().values()):
        return given
    try:
        found = type(given)(**_detect(path, header, _INTERACTION_FIELDS if isinstance(given, ColumnMap) else _ITEM_FIELDS, key))
    except ValueError as e:
        raise ValueError(f"{e}\n  ({key} is not set, so its columns were looked for in the header)") from None
    mapping = ", ".join(f"{f}={c!r}" for f, c in found.model_dump().items())
    logger.info("%s: %s not set; detected from the header: %s", path, key, mapping)
    return found


def _ids(values: list) -> np.ndarray:
    return np.array(["" if v is None else str(v).strip() for v in values], dtype=object)


def _numbers(values: list) -> np.ndarray:
    """Float array; NaN where a value is missing or not a finite number."""
    cleaned = [v.strip() if isinstance(v, str) else v for v in values]
    parsed = pd.to_numeric(pd.Series(cleaned, dtype=object), errors="coerce")
    out = np.array(parsed.to_numpy(dtype=np.float64, na_value=np.nan))  # writable copy (pandas CoW)
    out[~np.isfinite(out)] = np.nan
    return out


def _apply_problems(bad: BadRows, lines: np.ndarray, problems: Problems, row_problems: dict[int, str],
                    sinks: dict[int, BadRows] | None = None) -> np.ndarray:  # fmt: skip
    """Report every problem in line order (to `bad`, or to sinks[row] for the rows named there);
    returns the mask of rows that are fine."""
    ok = np.ones(len(lines), dtype=bool)
    for row in row_problems:
        ok[row] = False
    sinks = sinks or {}
    merged = [(line, msg, bad) for line, msg in problems]
    merged += [(int(lines[r]), msg, sinks.get(r, bad)) for r, msg in row_problems.items()]
    for line, msg, sink in sorted(merged, key=lambda m: (m[0], m[1])):
        sink.bad(line, msg)
    return ok


class _UnknownItems:
    """Interaction rows whose item the items file does not list: a bad row under data.on_bad_row
    (error: DataFormatError at the first; skip: left out), counted and logged on their own."""

    def __init__(self, cfg: TableConfig, on_bad_row: str):
        self.rows = BadRows(cfg.path, on_bad_row)
        self.items_path = cfg.items_path
        self.items: set[str] = set()
        self.first_line = 0

    def message(self, item: str) -> str:
        shown = item if len(item) <= 40 else item[:40] + "..."
        return (f"item {shown!r} is not in the items file {self.items_path} (data.table.items_path); add it there, "
                f"or set data.on_bad_row: skip to leave such rows out (they are counted and logged)")  # fmt: skip

    def log(self) -> int:
        if self.rows.count:
            logger.warning(
                "%s: skipped %d row(s) whose item is not in the items file %s (data.on_bad_row: skip): %d distinct item(s); first at line %d",
                self.rows.file, self.rows.count, self.items_path, len(self.items), self.first_line,
            )  # fmt: skip
        return self.rows.count


def _load_interactions(cfg: TableConfig, bad: BadRows, catalog: dict | None, unknown: _UnknownItems):
    path = Path(cfg.path)
    cols = _resolve(path, cfg.format, cfg.delimiter, cfg.columns, "data.table.columns")
    wanted = {k: v for k, v in cols.model_dump().items() if v is not None}
    data, lines, problems = _read(path, cfg.format, wanted, cfg.delimiter, "data.table.columns")
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
    sinks: dict[int, BadRows] = {}
    if catalog is not None:  # an items file was given: every other item is a bad row
        for r in np.flatnonzero(~pd.Series(item).isin(catalog.keys()).to_numpy() & (item != "")):
            if int(r) not in row_problems:
                row_problems[int(r)], sinks[int(r)] = unknown.message(item[r]), unknown.rows
                unknown.items.add(item[r])
                unknown.first_line = unknown.first_line or int(lines[r])
    ok = _apply_problems(bad, lines, problems, row_problems, sinks)
    return user[ok], item[ok], rating[ok].astype(np.float32), np.floor(ts[ok]).astype(np.int64)


# A title's trailing "(YYYY)" (MovieLens: "Heat (1995)", also with trailing spaces, after another
# parenthesis, or a series' "(1975-1979)", whose first year is taken)
_TITLE_YEAR = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*(?:\d{4})?\s*)?\)\s*$")
MIN_TITLE_YEAR, MAX_TITLE_YEAR = 1800, 2100  # outside: a number in parentheses, not a year
NO_GENRES = "(no genres listed)"  # MovieLens' value for an item without genres: not a genre


def year_from_title(title: str | None) -> int:
    """The year a title ends with in parentheses ("Heat (1995)" -> 1995); 0 when it has none."""
    m = _TITLE_YEAR.search(title or "")
    year = int(m.group(1)) if m else 0
    return year if MIN_TITLE_YEAR <= year <= MAX_TITLE_YEAR else 0


def _load_items(cfg: TableConfig, bad: BadRows):
    """raw item id -> (title, genre names, year) from the items file; the last row wins per id.
    The year is the year column's value; where there is no year column or a row's is blank, the
    year the title ends with ("Heat (1995)"), else 0. Titles are kept as given, suffix included
    (as ML-100k's are: it tells remakes apart)."""
    path = Path(cfg.items_path)
    ic = _resolve(path, "auto", cfg.delimiter, cfg.item_columns, "data.table.item_columns")
    wanted = {k: v for k, v in ic.model_dump().items() if v is not None}
    data, lines, problems = _read(path, "auto", wanted, cfg.delimiter, "data.table.item_columns")
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
        year = year_from_title(str(title) if title is not None else None) if np.isnan(years[r]) else int(years[r])
        genres = [n.strip() for n in names if n and n.strip() and n.strip() != NO_GENRES]
        table[ids[r]] = (str(title) if title is not None else ids[r], genres, year)
    return table


def load_table(cfg: TableConfig, on_bad_row: Literal["error", "skip"] = "error") -> Dataset:
    """Load a Dataset from the configured interaction file (and items file, when given).

    With an items file, a rating of an item it does not list is a bad row (data.on_bad_row):
    under "error" the first is a DataFormatError, under "skip" they are left out, counted in
    `Dataset.skipped_rows` and logged on a line of their own."""
    item_bad = BadRows(cfg.items_path or "", on_bad_row)
    catalog = _load_items(cfg, item_bad) if cfg.items_path else None
    bad, unknown = BadRows(cfg.path, on_bad_row), _UnknownItems(cfg, on_bad_row)
    user, item, rating, ts = _load_interactions(cfg, bad, catalog, unknown)
    catalog = catalog or {}

    user_vocab = Vocab(dict.fromkeys(user.tolist()), kind="user")  # first-appearance order
    item_vocab = Vocab(dict.fromkeys(list(catalog) + item.tolist()), kind="item")
    genre_names = sorted({g for _, gs, _ in catalog.values() for g in gs})
    genre_index = {g: i for i, g in enumerate(genre_names)}
    meta = [catalog.get(raw, (raw, [], 0)) for raw in item_vocab.ids]  # no items file: title = id

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
        skipped_rows=bad.log() + item_bad.log() + unknown.log(),
    )
