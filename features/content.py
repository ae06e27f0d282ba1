"""Side features as small integer ids, shared by training (KJT inputs) and serving (ONNX feed).

Index 0 of every categorical vocabulary means "missing" (unknown, not given, or not allowed by
consent), so the model always has a defined input. Numpy only: no torch here.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from features.schema import UNKNOWN_AGE, Dataset

CSR = tuple[np.ndarray, np.ndarray]
MISSING = 0
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M buckets: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+
AGE_LABELS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
YEAR_EDGES = tuple(range(1930, 2030, 10))  # decades; older titles share the first bucket
# one bucket per year (model.year_buckets="year"): 80 % of ML-100k's films are from the 1990s,
# where decades put them in one bucket; older titles share the first bucket here too
YEARLY_EDGES = tuple(range(1930, 2030))


def year_edges(resolution: str = "decade") -> tuple[int, ...]:
    """The bucket edges of `model.year_buckets`: "decade" (YEAR_EDGES) or "year" (YEARLY_EDGES)."""
    if resolution not in ("decade", "year"):
        raise ValueError(f"year bucket resolution must be 'decade' or 'year', got {resolution!r}")
    return YEAR_EDGES if resolution == "decade" else YEARLY_EDGES


_TOKEN = re.compile(r"[a-z0-9]+")


def age_bucket(age: np.ndarray | int) -> np.ndarray:
    """1 + MovieLens-1M age bucket; 0 for unknown ages."""
    age = np.asarray(age)
    return np.where(age == UNKNOWN_AGE, MISSING, 1 + np.searchsorted(AGE_EDGES, age, side="right")).astype(np.int64)


def year_bucket(year: np.ndarray | int, edges: tuple[int, ...] = YEAR_EDGES) -> np.ndarray:
    """1 + bucket between `edges` (default decades); 0 for unknown (year 0). len(edges) + 2 rows."""
    year = np.asarray(year)
    return np.where(year <= 0, MISSING, 1 + np.searchsorted(edges, year, side="right")).astype(np.int64)


def title_tokens(title: str, n_buckets: int) -> list[int]:
    """Lower-cased word tokens of a title, hashed (crc32, stable across processes) into buckets."""
    tokens = dict.fromkeys(t for t in _TOKEN.findall(title.lower()) if not t.isdigit())
    return [zlib.crc32(t.encode()) % n_buckets for t in tokens]


def lookup(vocab: list[str], values: list[str]) -> np.ndarray:
    """1 + position in `vocab`; 0 for empty or unknown values."""
    index = {v: i + 1 for i, v in enumerate(vocab)}
    return np.fromiter((index.get(v, MISSING) if v else MISSING for v in values), dtype=np.int64, count=len(values))


def to_csr(rows: list[list[int]] | list[tuple[int, ...]]) -> CSR:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return indptr, np.fromiter((v for r in rows for v in r), dtype=np.int64, count=int(indptr[-1]))


@dataclass(frozen=True)
class UserSide:
    """Per-user demographics (0 = missing) and stated genre preferences."""

    age: np.ndarray
    gender: np.ndarray
    occupation: np.ndarray
    liked: CSR
    avoided: CSR
    gender_vocab: list[str]
    occupation_vocab: list[str]

    @property
    def has_stated(self) -> bool:
        return bool(self.liked[0][-1] > 0)


@dataclass(frozen=True)
class ItemSide:
    """Per-item content: genres, release-decade bucket (0 = missing), hashed title tokens."""

    genres: CSR
    year: np.ndarray
    title: CSR


def user_side(ds: Dataset) -> UserSide:
    u = ds.users
    genders = sorted({g for g in u.gender if g})
    occupations = sorted({o for o in u.occupation if o})
    n = ds.n_users
    return UserSide(
        age=age_bucket(u.age),
        gender=lookup(genders, list(u.gender)),
        occupation=lookup(occupations, list(u.occupation)),
        liked=to_csr(u.liked_genres if len(u.liked_genres) == n else [()] * n),
        avoided=to_csr(u.avoided_genres if len(u.avoided_genres) == n else [()] * n),
        gender_vocab=genders,
        occupation_vocab=occupations,
    )


def item_side(ds: Dataset, title_buckets: int, year_edges: tuple[int, ...] = YEAR_EDGES) -> ItemSide:
    return ItemSide(
        genres=to_csr(ds.items.genres),
        year=year_bucket(ds.items.year, year_edges),
        title=to_csr([title_tokens(t, title_buckets) for t in ds.items.title]),
    )


# -- the user-tower input contract (ONNX feed), built identically by training and serving ------
USER_INPUTS = (
    "history", "history_weights", "history_offsets", "user", "age", "gender", "occupation",
    "liked", "liked_offsets", "avoided", "avoided_offsets",
)  # fmt: skip


def _flat(parts: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    values = np.concatenate(parts).astype(dtype) if parts and lengths.sum() else np.zeros(0, dtype)
    return values, np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def user_inputs(
    histories: list[np.ndarray],
    ratings: list[np.ndarray] | None,
    user_rows: np.ndarray,
    age: np.ndarray,
    gender: np.ndarray,
    occupation: np.ndarray,
    liked: list[np.ndarray],
    avoided: list[np.ndarray],
) -> dict[str, np.ndarray]:
    """The user-tower feed for a batch (keys = USER_INPUTS).

    History weights are normalized to sum to 1 per user, so the SUM-pooled bag is a mean
    (plain, or rating-weighted when `ratings` is given).
    """
    weights = [np.ones(len(h), np.float32) if ratings is None else np.asarray(r, np.float32) for h, r in zip(histories, ratings or histories)]
    # a history whose ratings sum to <= 0 (possible in tabular data) falls back to a plain mean
    weights = [w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / max(len(w), 1), np.float32) for w in weights]
    history, history_offsets = _flat(histories, np.int64)
    history_weights, _ = _flat(weights, np.float32)
    liked_v, liked_o = _flat(liked, np.int64)
    avoided_v, avoided_o = _flat(avoided, np.int64)
    return {
        "history": history, "history_weights": history_weights, "history_offsets": history_offsets,
        "user": np.asarray(user_rows, np.int64), "age": np.asarray(age, np.int64), "gender": np.asarray(gender, np.int64),
        "occupation": np.asarray(occupation, np.int64), "liked": liked_v, "liked_offsets": liked_o,
        "avoided": avoided_v, "avoided_offsets": avoided_o,
    }  # fmt: skip
