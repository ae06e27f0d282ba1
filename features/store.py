"""Online feature store: what serving needs per request (history, item metadata, popularity, profile).

SQLAlchemy Core over any URL (SQLite by default, PostgreSQL in production): only portable
constructs and bound parameters, never SQL built from strings, so ids cannot inject SQL.
Bulk loads replace everything in one transaction, so readers never see a half-written store.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
from sqlalchemy import (
    BigInteger, Column, Float, Index, Integer, MetaData, Table, Text, create_engine, delete, event, insert, select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from features.schema import UNKNOWN_AGE, Dataset, Interactions

_CHUNK = 10_000  # rows per executemany batch
_IN_CHUNK = 500  # ids per IN (...) list, below every backend's bound-parameter limit

metadata = MetaData()
items_table = Table(
    "items", metadata,
    Column("item_id", Text, primary_key=True),
    Column("title", Text, nullable=False),
    Column("genres", Text, nullable=False),  # genre names joined with "|"
    Column("year", Integer),  # NULL when unknown
)
users_table = Table(
    "users", metadata,
    Column("user_id", Text, primary_key=True),
    Column("age", Integer),  # NULL when unknown
    Column("gender", Text),
    Column("occupation", Text),
    Column("liked_genres", Text, nullable=False),  # stated preferences, "|"-joined names
    Column("avoided_genres", Text, nullable=False),
)
interactions_table = Table(
    "interactions", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),  # chronological per user; tie-break
    Column("user_id", Text, nullable=False),
    Column("item_id", Text, nullable=False),
    Column("rating", Float, nullable=False),
    Column("ts", BigInteger, nullable=False),
    Index("ix_interactions_user_ts", "user_id", "ts", "seq"),
)
popularity_table = Table(
    "item_popularity", metadata,
    Column("item_id", Text, primary_key=True),
    Column("count", Integer, nullable=False),
)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL lets web-server readers proceed while a bulk load writes."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()


def _split_genres(text: str | None) -> list[str]:
    return [g for g in (text or "").split("|") if g]


def _chunks(rows: Iterator[dict], size: int = _CHUNK) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class FeatureStore:
    """Point-query feature store; one instance may be shared by the threads of a web server."""

    def __init__(self, url: str):
        parsed = make_url(url)
        kwargs: dict[str, Any] = {}
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False}
            if parsed.database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool  # one shared connection, else each sees its own empty db
            else:
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(parsed, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)

    # ---- writes -------------------------------------------------------------------------
    def load_dataset(self, ds: Dataset, interactions: Interactions | None = None) -> None:
        """Replace the whole store with ds (and `interactions`, e.g. the train split) atomically."""
        inter = ds.interactions if interactions is None else interactions
        if len(inter) and (inter.user.min() < 0 or inter.user.max() >= ds.n_users or inter.item.min() < 0 or inter.item.max() >= ds.n_items):
            raise ValueError("interactions reference user/item indices outside the dataset's vocabularies")
        with self.engine.begin() as conn:
            for table in (popularity_table, interactions_table, users_table, items_table):
                conn.execute(delete(table))
            for table, rows in (
                (items_table, self._item_rows(ds)),
                (users_table, self._user_rows(ds)),
                (interactions_table, self._interaction_rows(ds, inter)),
                (popularity_table, self._popularity_rows(ds, inter)),
            ):
                for batch in _chunks(rows):
                    conn.execute(insert(table), batch)

    def upsert_user(
        self,
        user_id: str,
        *,
        age: int | None = None,
        gender: str | None = None,
        occupation: str | None = None,
        liked_genres: list[str] | tuple[str, ...] = (),
        avoided_genres: list[str] | tuple[str, ...] = (),
    ) -> None:
        """Create or replace one user's profile (demographics + stated genre preferences)."""
        row = {
            "user_id": str(user_id), "age": age, "gender": gender or None, "occupation": occupation or None,
            "liked_genres": "|".join(liked_genres), "avoided_genres": "|".join(avoided_genres),
        }  # fmt: skip
        with self.engine.begin() as conn:
            conn.execute(delete(users_table).where(users_table.c.user_id == row["user_id"]))
            conn.execute(insert(users_table), [row])

    @staticmethod
    def _item_rows(ds: Dataset) -> Iterator[dict]:
        for i, item_id in enumerate(ds.item_vocab.ids):
            year = int(ds.items.year[i])
            yield {
                "item_id": item_id,
                "title": ds.items.title[i],
                "genres": "|".join(ds.genre_names[g] for g in ds.items.genres[i]),
                "year": year or None,
            }

    @staticmethod
    def _user_rows(ds: Dataset) -> Iterator[dict]:
        u = ds.users
        for i, user_id in enumerate(ds.user_vocab.ids):
            liked = u.liked_genres[i] if i < len(u.liked_genres) else ()
            avoided = u.avoided_genres[i] if i < len(u.avoided_genres) else ()
            yield {
                "user_id": user_id,
                "age": None if int(u.age[i]) == UNKNOWN_AGE else int(u.age[i]),
                "gender": u.gender[i] or None,
                "occupation": u.occupation[i] or None,
                "liked_genres": "|".join(ds.genre_names[g] for g in liked),
                "avoided_genres": "|".join(ds.genre_names[g] for g in avoided),
            }

    @staticmethod
    def _interaction_rows(ds: Dataset, inter: Interactions) -> Iterator[dict]:
        order = np.lexsort((np.arange(len(inter)), inter.timestamp, inter.user))  # seq = time order
        user_ids, item_ids = ds.user_vocab.ids, ds.item_vocab.ids
        for seq, r in enumerate(order.tolist()):
            yield {
                "seq": seq,
                "user_id": user_ids[inter.user[r]],
                "item_id": item_ids[inter.item[r]],
                "rating": float(inter.rating[r]),
                "ts": int(inter.timestamp[r]),
            }

    @staticmethod
    def _popularity_rows(ds: Dataset, inter: Interactions) -> Iterator[dict]:
        counts = np.bincount(inter.item, minlength=ds.n_items)
        for item_id, c in zip(ds.item_vocab.ids, counts.tolist()):
            yield {"item_id": item_id, "count": c}

    # ---- reads --------------------------------------------------------------------------
    def user_history(self, user_id: str, limit: int | None = None) -> list[str]:
        """Raw item ids the user interacted with, oldest -> newest; `limit` keeps the most recent."""
        return [item for item, _ in self.user_interactions(user_id, limit)]

    def user_interactions(self, user_id: str, limit: int | None = None) -> list[tuple[str, float]]:
        """(raw item id, rating) pairs, oldest -> newest; `limit` keeps the most recent."""
        t = interactions_table
        q = select(t.c.item_id, t.c.rating).where(t.c.user_id == str(user_id))
        if limit is not None and limit <= 0:
            return []
        with self.engine.connect() as conn:
            if limit is None:
                return [(r.item_id, r.rating) for r in conn.execute(q.order_by(t.c.ts, t.c.seq))]
            newest_first = [(r.item_id, r.rating) for r in conn.execute(q.order_by(t.c.ts.desc(), t.c.seq.desc()).limit(limit))]
        return newest_first[::-1]

    def item_metadata(self, item_ids: list[str]) -> dict[str, dict]:
        """{item_id: {"title", "genres": [names], "year": int | None}}; unknown ids are left out."""
        t = items_table
        ids = list(dict.fromkeys(str(i) for i in item_ids))
        out: dict[str, dict] = {}
        with self.engine.connect() as conn:
            for lo in range(0, len(ids), _IN_CHUNK):
                for row in conn.execute(select(t).where(t.c.item_id.in_(ids[lo:lo + _IN_CHUNK]))):
                    out[row.item_id] = {"title": row.title, "genres": _split_genres(row.genres), "year": row.year}
        return out

    def popular_items(self, k: int) -> list[str]:
        """The k most interacted-with items (ties by item id), for cold-start fallbacks."""
        if k <= 0:
            return []
        t = popularity_table
        with self.engine.connect() as conn:
            return list(conn.scalars(select(t.c.item_id).order_by(t.c["count"].desc(), t.c.item_id).limit(k)))

    def user_profile(self, user_id: str) -> dict | None:
        """Demographics and stated preferences (None for unknown fields), or None for an unknown user."""
        t = users_table
        with self.engine.connect() as conn:
            row = conn.execute(select(t).where(t.c.user_id == str(user_id))).first()
        if row is None:
            return None
        return {
            "user_id": row.user_id,
            "age": row.age,
            "gender": row.gender,
            "occupation": row.occupation,
            "liked_genres": _split_genres(row.liked_genres),
            "avoided_genres": _split_genres(row.avoided_genres),
        }

    def has_user(self, user_id: str) -> bool:
        t = users_table
        with self.engine.connect() as conn:
            return conn.execute(select(t.c.user_id).where(t.c.user_id == str(user_id)).limit(1)).first() is not None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
