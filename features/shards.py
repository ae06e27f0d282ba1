"""Parquet shards for interaction data that does not fit in memory: a chunked synthetic writer and
a streaming reader in which each rank reads its own files. PyArrow + numpy only (no torch).

A shard directory:
    manifest.json       sizes, genre names, generator settings, and per shard: file, rows, users, user range
    items.parquet       item (int64), genres (list<int32>), year (int32): one row per item, in index order
    item_counts.npy     interactions per item (int64), summed while writing: the sampled-softmax logQ prior
    part-00000.parquet  user, item (int64), rating (float32), timestamp (int64); shard s holds the
                        contiguous user range [user_lo, user_hi), rows sorted by (user, timestamp)

Training examples are users (as in memory): because a shard owns whole users and its rows are sorted
by user, a stream of record batches regroups into complete per-user examples with one pending user
carried across batch boundaries (`ShardSet.iter_user_blocks`), in bounded memory.

The generator scales to millions of users and items (O(interactions), unlike `features.synthetic`,
whose per-user softmax over the catalog is O(users x items)): each interaction draws a genre from
the user's taste (softmax of normal logits x taste_strength), then an item of that genre from a
Zipf-like popularity prior (inverse CDF over the genre's items); repeated (user, item) draws
collapse to one row, so users average slightly fewer rows than drawn.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.config import SYNTHETIC_GENRES

MANIFEST, ITEMS, ITEM_COUNTS = "manifest.json", "items.parquet", "item_counts.npy"
COLUMNS = ("user", "item", "rating", "timestamp")
SCHEMA = pa.schema([("user", pa.int64()), ("item", pa.int64()), ("rating", pa.float32()), ("timestamp", pa.int64())])
FORMAT_VERSION = 1


def _chunk_rows(rng: np.random.Generator, users: np.ndarray, taste_cdf: np.ndarray, present: np.ndarray, mean: float, genre_items: list[np.ndarray],
                genre_cdf: list[np.ndarray], n_items: int, start: int, span: int) -> dict[str, np.ndarray]:  # fmt: skip
    """Interactions of a block of users, sorted by (user, timestamp), duplicates removed."""
    counts = np.minimum(rng.geometric(1.0 / mean, size=len(users)), n_items)
    user = np.repeat(users, counts)
    row = np.repeat(np.arange(len(users)), counts)
    choice = (rng.random(len(user))[:, None] > taste_cdf[row]).sum(1)  # inverse CDF over the <= 18 genres
    genre = present[np.minimum(choice, len(present) - 1)]
    item = np.empty(len(user), np.int64)
    for g in np.unique(genre):
        at = np.flatnonzero(genre == g)
        pick = np.searchsorted(genre_cdf[g], rng.random(len(at)) * genre_cdf[g][-1], side="right")
        item[at] = genre_items[g][np.minimum(pick, len(genre_items[g]) - 1)]
    _, first = np.unique(user * n_items + item, return_index=True)  # one row per (user, item)
    keep = np.sort(first)
    user, item = user[keep], item[keep]
    rating = np.clip(np.rint(3.5 + rng.normal(0.0, 1.0, len(user))), 1, 5).astype(np.float32)
    ts = start + rng.integers(0, span, len(user))
    order = np.lexsort((ts, user))
    return {"user": user[order], "item": item[order], "rating": rating[order], "timestamp": ts[order].astype(np.int64)}


def write_shards(out_dir: str | Path, n_users: int, n_items: int, n_interactions: int, n_shards: int, n_genres: int = 12, seed: int = 0,
                 chunk_users: int = 50_000, popularity_exponent: float = 1.0, taste_strength: float = 2.0, overwrite: bool = False,
                 progress: bool = False) -> dict:  # fmt: skip
    """Write a synthetic shard directory (atomically: a temp dir renamed at the end); returns the manifest.

    Memory stays bounded by `chunk_users` x mean interactions per user plus O(n_items) item arrays.
    The output is a pure function of the arguments other than `progress` and `overwrite`."""
    if n_users < 1 or n_items < 1 or n_shards < 1:
        raise ValueError(f"n_users, n_items and n_shards must be >= 1 (got {n_users}, {n_items}, {n_shards})")
    if n_shards > n_users:
        raise ValueError(f"n_shards: {n_shards} shards for {n_users} users leaves shards empty")
    if n_interactions < n_users:
        raise ValueError(f"n_interactions: {n_interactions} < n_users {n_users} (every user needs at least one)")
    if not 1 <= n_genres <= len(SYNTHETIC_GENRES):
        raise ValueError(f"n_genres: must be 1..{len(SYNTHETIC_GENRES)}, got {n_genres}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        manifest = _write(tmp, n_users, n_items, n_interactions, n_shards, n_genres, seed, chunk_users, popularity_exponent, taste_strength, progress)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(tmp: Path, n_users, n_items, n_interactions, n_shards, n_genres, seed, chunk_users, popularity_exponent, taste_strength, progress) -> dict:
    from tqdm.auto import tqdm

    item_rng = np.random.default_rng([seed, 0])
    genre = item_rng.choice(n_genres, size=n_items, p=item_rng.dirichlet(np.full(n_genres, 2.0)))
    weight = (item_rng.permutation(n_items) + 1.0) ** -popularity_exponent  # Zipf over a random popularity rank
    year = item_rng.integers(1960, 2025, size=n_items).astype(np.int32)
    genre_items = [np.flatnonzero(genre == g) for g in range(n_genres)]
    genre_cdf = [np.cumsum(weight[i]) for i in genre_items]
    present = np.flatnonzero([len(i) > 0 for i in genre_items])  # genres that have items
    pq.write_table(pa.table({"item": np.arange(n_items, dtype=np.int64), "genres": pa.array([[int(g)] for g in genre], pa.list_(pa.int32())), "year": year}), tmp / ITEMS)

    mean = n_interactions / n_users
    start, span = 1_600_000_000, 365 * 86_400
    bounds = [n_users * s // n_shards for s in range(n_shards + 1)]
    counts = np.zeros(n_items, np.int64)
    shards = []
    bar = tqdm(total=n_users, desc="writing shards", unit="user", disable=not progress)
    for s in range(n_shards):
        name = f"part-{s:05d}.parquet"
        rows, users = 0, 0
        with pq.ParquetWriter(tmp / name, SCHEMA) as writer:
            for lo in range(bounds[s], bounds[s + 1], chunk_users):
                hi = min(lo + chunk_users, bounds[s + 1])
                rng = np.random.default_rng([seed, 1, lo])
                logits = taste_strength * rng.normal(size=(hi - lo, len(present)))
                taste = np.exp(logits - logits.max(1, keepdims=True))
                taste_cdf = np.cumsum(taste / taste.sum(1, keepdims=True), axis=1)
                chunk = _chunk_rows(rng, np.arange(lo, hi, dtype=np.int64), taste_cdf, present, mean, genre_items, genre_cdf, n_items, start, span)
                writer.write_table(pa.table(chunk, schema=SCHEMA))  # one row group per chunk
                counts += np.bincount(chunk["item"], minlength=n_items)
                rows += len(chunk["user"])
                users += len(np.unique(chunk["user"]))  # users with rows: what a reader can train on
                bar.update(hi - lo)
        shards.append({"file": name, "rows": rows, "users": users, "user_lo": bounds[s], "user_hi": bounds[s + 1]})
    bar.close()
    np.save(tmp / ITEM_COUNTS, counts)
    manifest = {
        "format_version": FORMAT_VERSION,
        "n_users": n_users, "n_items": n_items, "n_genres": n_genres, "genre_names": list(SYNTHETIC_GENRES[:n_genres]),
        "rows": int(sum(s["rows"] for s in shards)), "shards": shards,
        "generator": {"kind": "synthetic", "seed": seed, "n_interactions": n_interactions, "popularity_exponent": popularity_exponent,
                      "taste_strength": taste_strength, "chunk_users": chunk_users},
        "sorted_by": ["user", "timestamp"],
    }  # fmt: skip
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


@dataclass(frozen=True)
class UserBlock:
    """Complete users of a shard, CSR-style: rows of users[k] are items[indptr[k]:indptr[k+1]]."""

    users: np.ndarray
    indptr: np.ndarray
    items: np.ndarray
    ratings: np.ndarray


def _block(user: np.ndarray, item: np.ndarray, rating: np.ndarray) -> UserBlock:
    if len(user) == 0:
        return UserBlock(user, np.zeros(1, np.int64), item, rating)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    return UserBlock(user[starts], np.r_[starts, len(user)].astype(np.int64), item, rating)


@dataclass(frozen=True)
class ShardSet:
    """An opened shard directory."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "ShardSet":
        root = Path(path)
        file = root / MANIFEST
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no shard manifest (write shards with features.shards.write_shards)")
        try:
            manifest = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        for key in ("n_users", "n_items", "n_genres", "shards"):
            if key not in manifest:
                raise ValueError(f"{file}: missing key {key!r}")
        for i, shard in enumerate(manifest["shards"]):
            for key in ("file", "rows", "users", "user_lo", "user_hi"):
                if key not in shard:
                    raise ValueError(f"{file}: shards[{i}] has no {key!r}")
            if not (root / shard["file"]).is_file():
                raise FileNotFoundError(f"{file}: shards[{i}] names {shard['file']}, which is missing")
        return cls(root, manifest)

    @property
    def n_users(self) -> int:
        return int(self.manifest["n_users"])

    @property
    def n_items(self) -> int:
        return int(self.manifest["n_items"])

    @property
    def n_genres(self) -> int:
        return int(self.manifest["n_genres"])

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    def _mine(self, rank: int, world: int) -> list[dict]:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        if world > len(self.shards):
            raise ValueError(f"{self.root}: {len(self.shards)} shards cannot feed {world} ranks (write at least one shard per rank)")
        return self.shards[rank::world]

    def files_for(self, rank: int, world: int) -> list[Path]:
        """The shard files rank `rank` of `world` reads: every world-th, starting at rank."""
        return [self.root / s["file"] for s in self._mine(rank, world)]

    def users_for(self, rank: int, world: int) -> int:
        return sum(s["users"] for s in self._mine(rank, world))

    def items(self) -> dict[str, object]:
        """{"genres": CSR (indptr, genre indices), "year": int32 array}, indexed by item."""
        table = pq.read_table(self.root / ITEMS)
        if table.num_rows != self.n_items:
            raise ValueError(f"{self.root / ITEMS}: {table.num_rows} rows, manifest says n_items={self.n_items}")
        genres = table.column("genres").combine_chunks()
        return {"genres": (genres.offsets.to_numpy().astype(np.int64), genres.values.to_numpy().astype(np.int64)), "year": table.column("year").to_numpy()}

    def item_counts(self) -> np.ndarray:
        counts = np.load(self.root / ITEM_COUNTS)
        if len(counts) != self.n_items:
            raise ValueError(f"{self.root / ITEM_COUNTS}: {len(counts)} entries, manifest says n_items={self.n_items}")
        return counts

    def iter_batches(self, rank: int, world: int, batch_rows: int = 65_536, order: np.ndarray | None = None) -> Iterator[tuple[Path, pa.RecordBatch]]:
        """(file, record batch) over this rank's files, streamed with ParquetFile.iter_batches."""
        files = self.files_for(rank, world)
        for i in order if order is not None else range(len(files)):
            pf = pq.ParquetFile(files[i])
            missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"{files[i]}: missing column(s) {missing}")
            for batch in pf.iter_batches(batch_size=batch_rows, columns=list(COLUMNS)):
                yield files[i], batch

    def iter_user_blocks(self, rank: int, world: int, users_per_block: int = 8192, batch_rows: int = 65_536, order: np.ndarray | None = None) -> Iterator[UserBlock]:
        """Blocks of exactly `users_per_block` complete users (the last block: the rest), streamed
        over this rank's files; a user is never split across blocks.

        A shard owns whole users and its rows are sorted by user, so the user pending at a record
        batch's end is carried into the next batch and is complete at its file's end."""
        if users_per_block < 1:
            raise ValueError(f"users_per_block: must be >= 1, got {users_per_block}")
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        done: list[tuple[np.ndarray, ...]] = []  # complete users not yet emitted
        count = 0
        pending, current, row = empty, None, 0

        def complete(part: tuple[np.ndarray, ...]) -> int:
            done.append(part)
            return int(len(part[0]) and 1 + np.count_nonzero(part[0][1:] != part[0][:-1]))

        def drain(final: bool) -> Iterator[UserBlock]:
            nonlocal done, count
            block = _block(*(np.concatenate(c) for c in zip(*done)))
            n = len(block.users)
            full = n if final else n - n % users_per_block
            for lo in range(0, full, users_per_block):
                yield _rows(block, lo, min(lo + users_per_block, n))
            rest = _rows(block, full, n)
            done, count = [(np.repeat(rest.users, np.diff(rest.indptr)), rest.items, rest.ratings)], n - full

        for path, batch in self.iter_batches(rank, world, batch_rows, order):
            if path != current:
                count += complete(pending)  # the previous file's last user
                pending, current, row = empty, path, 0
            user = batch.column("user").to_numpy(zero_copy_only=False).astype(np.int64)
            item = batch.column("item").to_numpy(zero_copy_only=False).astype(np.int64)
            rating = batch.column("rating").to_numpy(zero_copy_only=False).astype(np.float32)
            down = np.flatnonzero(np.diff(np.r_[pending[0][-1:], user]) < 0)
            if len(down):
                at = down[0] - len(pending[0][-1:]) + 1
                raise ValueError(f"{path}: rows not sorted by user (row {row + at}: user {user[at]} after a larger one)")
            row += len(user)
            user, item, rating = (np.concatenate([p, x]) for p, x in zip(pending, (user, item, rating)))
            cut = int(np.searchsorted(user, user[-1]))  # the last user may continue in the next batch
            count += complete((user[:cut], item[:cut], rating[:cut]))
            pending = (user[cut:], item[cut:], rating[cut:])
            if count >= users_per_block:
                yield from drain(final=False)
        complete(pending)
        yield from drain(final=True)


def _rows(block: UserBlock, lo: int, hi: int) -> UserBlock:
    a, b = block.indptr[lo], block.indptr[hi]
    return UserBlock(block.users[lo:hi], block.indptr[lo : hi + 1] - a, block.items[a:b], block.ratings[a:b])


def main(argv: list[str] | None = None) -> int:
    """`python -m features.shards OUT --users N --items N --interactions N --shards N`"""
    import argparse

    p = argparse.ArgumentParser(prog="python -m features.shards", description="write synthetic Parquet shards")
    p.add_argument("out")
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--interactions", type=int, default=10_000_000)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--genres", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-users", type=int, default=50_000)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    m = write_shards(a.out, a.users, a.items, a.interactions, a.shards, a.genres, a.seed, a.chunk_users, overwrite=a.overwrite, progress=True)
    print(f"{m['rows']} interactions of {m['n_users']} users over {m['n_items']} items in {len(m['shards'])} shards at {os.path.abspath(a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
