"""One entry point from a DataConfig to a Dataset, so training and serving never branch on the source."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from features.config import ConsentConfig, DataConfig
from features.schema import Dataset, Users
from features.vocab import Vocab


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the configured source (synthetic, MovieLens-100k, ML-1M implicit, a generic table, a
    `user item item ...` lines file, or the feature store)."""
    # Imports are local so a source's dependencies are only touched when it is used.
    if cfg.source == "synthetic":
        from features.synthetic import generate

        return generate(cfg.synthetic)
    if cfg.source == "movielens":
        from features.movielens import load_ml100k

        return load_ml100k(cfg.path, on_bad_row=cfg.on_bad_row)
    if cfg.source == "table":
        from features.tabular import load_table

        assert cfg.table is not None  # enforced by DataConfig's validator
        return load_table(cfg.table, on_bad_row=cfg.on_bad_row)
    if cfg.source in ("lines", "ml1m-implicit"):
        from features.lines import load_lines, ml1m_implicit_config

        if cfg.source == "lines":
            assert cfg.lines is not None  # enforced by DataConfig's validator
            return load_lines(cfg.lines, on_bad_row=cfg.on_bad_row)
        return load_lines(ml1m_implicit_config(cfg.path), on_bad_row=cfg.on_bad_row, name="ml-1m-implicit")
    if cfg.source == "store":
        from features.consent import export_training_data
        from features.store import FeatureStore

        with FeatureStore(cfg.store.url, consent=cfg.store.consent) as store:
            ds, _ = export_training_data(store)
        if len(ds.interactions) == 0:
            raise ValueError(f"data.store.url: no user in {cfg.store.url} has training consent and data")
        return ds
    raise ValueError(f"unknown data source {cfg.source!r}")


def snapshot_hash(ds: Dataset) -> str:
    """sha256 over a dataset's content: which users, their rows, profiles and the catalog.

    Recorded in the manifest and MLflow so a model says exactly which data trained it without
    listing anyone: equal content gives an equal hash whatever the row order, and any added,
    removed or changed user or row changes it. The dataset's name is not part of it."""
    h = hashlib.sha256()

    def part(label: str, payload: object) -> None:
        blob = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        h.update(f"{label}:{len(blob)}:".encode())
        h.update(blob)

    inter = ds.interactions
    order = np.lexsort((inter.rating, inter.timestamp, inter.item, inter.user))  # canonical row order
    part("users", ds.user_vocab.ids)
    part("items", ds.item_vocab.ids)
    part("genres", ds.genre_names)
    for name, dtype in (("user", "<i8"), ("item", "<i8"), ("rating", "<f4"), ("timestamp", "<i8")):
        part(name, np.ascontiguousarray(getattr(inter, name)[order], dtype=dtype).tobytes())
    u = ds.users
    part("profiles", [np.asarray(u.age, dtype=np.int64).tolist(), list(u.gender), list(u.occupation),
                      [list(g) for g in u.liked_genres], [list(g) for g in u.avoided_genres]])  # fmt: skip
    part("catalog", [list(ds.items.title), [list(g) for g in ds.items.genres], np.asarray(ds.items.year, dtype=np.int64).tolist()])
    return "sha256:" + h.hexdigest()


def data_provenance(ds: Dataset) -> dict:
    """What the manifest and MLflow record about the training data: no ids, only the snapshot
    hash and sizes."""
    return {"snapshot": snapshot_hash(ds), "users": ds.n_users, "items": ds.n_items, "interactions": len(ds.interactions)}


def drop_users(ds: Dataset, user_ids: set[str]) -> Dataset:
    """The dataset without these users: their rows, their profiles and their vocabulary entries
    (indices of the others are renumbered, so the ids leave no trace in a model trained on it)."""
    keep = np.array([u not in user_ids for u in ds.user_vocab.ids], dtype=bool)
    if keep.all():
        return ds
    new_index = np.cumsum(keep) - 1
    rows = keep[ds.interactions.user]
    inter = ds.interactions.take(rows)
    inter = type(inter)(new_index[inter.user].astype(np.int64), inter.item, inter.rating, inter.timestamp)
    u, idx = ds.users, np.flatnonzero(keep)
    pick = lambda seq: [seq[i] for i in idx] if len(seq) else []  # noqa: E731  (stated lists may be absent)
    users = Users(np.asarray(u.age)[idx], pick(u.gender), pick(u.occupation), pick(u.liked_genres), pick(u.avoided_genres))
    vocab = Vocab([ds.user_vocab.ids[i] for i in idx], kind=ds.user_vocab.kind)
    return Dataset(ds.name, inter, ds.items, users, ds.genre_names, vocab, ds.item_vocab, ds.skipped_rows)


def apply_erasures(ds: Dataset, store_url: str | None, consent: ConsentConfig | None = None) -> tuple[Dataset, dict]:
    """Every data source, not only the store, leaves out users erased from the feature store at
    `store_url` (matched through its tombstones). Returns the dataset and what was applied, for the
    manifest and model card: {"erasures_applied": users left out, "tombstones": erasures the store holds}.

    Raises ErasureSaltError (a ValueError) when the store holds tombstones and the salt at hand
    cannot match them: training on would bring erased users back. A store file that does not exist
    holds no erasures and is not created."""
    from sqlalchemy.engine import make_url

    from features.store import FeatureStore

    if not store_url:
        return ds, {"erasures_applied": 0, "tombstones": 0}
    parsed = make_url(store_url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).expanduser().exists():
            return ds, {"erasures_applied": 0, "tombstones": 0}
    with FeatureStore(store_url, consent=consent) as store:
        store.check_erasure_salt()
        erased = store.tombstoned(ds.user_vocab.ids)
        total = store.tombstone_count()
    return drop_users(ds, erased), {"erasures_applied": len(erased), "tombstones": total}
