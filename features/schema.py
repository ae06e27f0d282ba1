"""Typed, columnar tables every loader returns and every consumer reads.

Ids are stored as contiguous int64 indices into a `Vocab` (raw id <-> index);
the raw ids only reappear at the edges (serving responses, exports).
Numpy only: this package never imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from features.vocab import Vocab

UNKNOWN_AGE = -1  # users.age value when the source gives none


@dataclass(frozen=True)
class Interactions:
    """One row per (user, item) event. Parallel arrays of equal length."""

    user: np.ndarray  # int64 index into Dataset.user_vocab
    item: np.ndarray  # int64 index into Dataset.item_vocab
    rating: np.ndarray  # float32; 1.0 for implicit feedback
    timestamp: np.ndarray  # int64 unix seconds

    def __post_init__(self) -> None:
        n = len(self.user)
        for name in ("item", "rating", "timestamp"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Interactions.{name} has {len(getattr(self, name))} rows, user has {n}")

    def __len__(self) -> int:
        return len(self.user)

    def take(self, index: np.ndarray) -> "Interactions":
        """Rows selected by an integer index array or a boolean mask."""
        return Interactions(self.user[index], self.item[index], self.rating[index], self.timestamp[index])

    @staticmethod
    def concat(parts: list["Interactions"]) -> "Interactions":
        return Interactions(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("user", "item", "rating", "timestamp")))

    def drop_duplicate_pairs(self) -> "Interactions":
        """Keep only the last row of each (user, item) pair, preserving row order.

        Loaders use it so a re-rated item counts once, with its latest rating.
        """
        if len(self) == 0:
            return self
        key = self.user.astype(np.int64) * (int(self.item.max()) + 1) + self.item.astype(np.int64)
        _, first_in_reversed = np.unique(key[::-1], return_index=True)
        if len(first_in_reversed) == len(self):
            return self
        return self.take(np.sort(len(self) - 1 - first_in_reversed))


@dataclass(frozen=True)
class Items:
    """Item side table, row i describes item index i."""

    title: list[str]
    genres: list[tuple[int, ...]]  # indices into Dataset.genre_names
    year: np.ndarray  # int32 release year, 0 when unknown

    def __len__(self) -> int:
        return len(self.title)


@dataclass(frozen=True)
class Users:
    """User side table, row u describes user index u. Demographics are optional per source."""

    age: np.ndarray  # int32, UNKNOWN_AGE when unknown
    gender: list[str]  # "" when unknown
    occupation: list[str]  # "" when unknown
    liked_genres: list[tuple[int, ...]] = field(default_factory=list)  # stated (zero-party) preferences
    avoided_genres: list[tuple[int, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.age)


@dataclass(frozen=True)
class Dataset:
    name: str
    interactions: Interactions
    items: Items
    users: Users
    genre_names: list[str]
    user_vocab: Vocab
    item_vocab: Vocab
    skipped_rows: int = 0  # malformed rows skipped by the loader under on_bad_row="skip"

    @property
    def n_users(self) -> int:
        return len(self.user_vocab)

    @property
    def n_items(self) -> int:
        return len(self.item_vocab)
