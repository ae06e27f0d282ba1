"""Parquet shards: the streaming reader on hand-written files (expected blocks worked out by hand),
and the chunked synthetic writer's invariants."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.shards import SCHEMA, ShardSet, write_shards


def write_by_hand(root, parts: list[list[tuple[int, int]]], n_users: int = 6, n_items: int = 5):
    """Shard files from (user, item) rows; rating = item + 1, timestamp = row number."""
    root.mkdir()
    shards = []
    for s, rows in enumerate(parts):
        user = np.array([u for u, _ in rows], np.int64)
        item = np.array([i for _, i in rows], np.int64)
        table = pa.table({"user": user, "item": item, "rating": (item + 1).astype(np.float32), "timestamp": np.arange(len(rows), dtype=np.int64)}, schema=SCHEMA)
        pq.write_table(table, root / f"part-{s}.parquet")
        shards.append({"file": f"part-{s}.parquet", "rows": len(rows), "users": len(set(user.tolist())), "user_lo": int(user.min()), "user_hi": int(user.max()) + 1})
    pq.write_table(pa.table({"item": np.arange(n_items), "genres": pa.array([[i % 2] for i in range(n_items)], pa.list_(pa.int32())), "year": np.full(n_items, 1990, np.int32)}), root / "items.parquet")
    np.save(root / "item_counts.npy", np.bincount([i for p in parts for _, i in p], minlength=n_items))
    (root / "manifest.json").write_text(json.dumps({"n_users": n_users, "n_items": n_items, "n_genres": 2, "shards": shards}))
    return ShardSet.open(root)


PARTS = [
    [(0, 1), (0, 2), (0, 4), (1, 3)],  # shard 0: users 0, 1
    [(2, 0), (3, 1), (3, 2)],  # shard 1: users 2, 3
    [(4, 4), (5, 0), (5, 1), (5, 3)],  # shard 2: users 4, 5
]


def test_each_rank_reads_every_world_th_shard(tmp_path):
    shards = write_by_hand(tmp_path / "s", PARTS)
    assert [p.name for p in shards.files_for(0, 2)] == ["part-0.parquet", "part-2.parquet"]
    assert [p.name for p in shards.files_for(1, 2)] == ["part-1.parquet"]
    assert shards.users_for(0, 2) == 4 and shards.users_for(1, 2) == 2
    with pytest.raises(ValueError, match="3 shards cannot feed 4 ranks"):
        shards.files_for(0, 4)


def test_user_blocks_regroup_users_across_record_batches(tmp_path):
    shards = write_by_hand(tmp_path / "s", PARTS)
    # rank 0 reads shards 0 and 2 in record batches of 3 rows: user 0 spans no batch edge, user 5
    # (rows 2-4 of shard 2) does; blocks of 3 users: [0, 1, 4] then [5]
    blocks = list(shards.iter_user_blocks(0, 2, users_per_block=3, batch_rows=3))
    assert [b.users.tolist() for b in blocks] == [[0, 1, 4], [5]]
    assert blocks[0].indptr.tolist() == [0, 3, 4, 5]
    assert blocks[0].items.tolist() == [1, 2, 4, 3, 4]
    assert blocks[0].ratings.tolist() == [2.0, 3.0, 5.0, 4.0, 5.0]
    assert blocks[1].indptr.tolist() == [0, 3] and blocks[1].items.tolist() == [0, 1, 3]
    # batch_rows 1: every user spans record batches; same users, same rows
    again = list(shards.iter_user_blocks(0, 2, users_per_block=3, batch_rows=1))
    assert [b.items.tolist() for b in again] == [b.items.tolist() for b in blocks]
    # the file order can be shuffled per epoch
    flipped = list(shards.iter_user_blocks(0, 2, users_per_block=2, batch_rows=2, order=np.array([1, 0])))
    assert [b.users.tolist() for b in flipped] == [[4, 5], [0, 1]]


def test_side_tables(tmp_path):
    shards = write_by_hand(tmp_path / "s", PARTS)
    items = shards.items()
    assert items["genres"][0].tolist() == [0, 1, 2, 3, 4, 5] and items["genres"][1].tolist() == [0, 1, 0, 1, 0]
    assert shards.item_counts().tolist() == [2, 3, 2, 2, 2]


def test_unsorted_rows_fail_naming_file_and_row(tmp_path):
    shards = write_by_hand(tmp_path / "s", [[(1, 0), (1, 2), (0, 3)]], n_users=2)
    with pytest.raises(ValueError, match=r"part-0.parquet: rows not sorted by user \(row 2: user 0"):
        list(shards.iter_user_blocks(0, 1, batch_rows=2))


def test_bad_directories_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        ShardSet.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"n_users": 1, "n_items": 1, "shards": []}))
    with pytest.raises(ValueError, match="missing key 'n_genres'"):
        ShardSet.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"n_users": 1, "n_items": 1, "n_genres": 1, "shards": [{"file": "gone.parquet", "rows": 1, "users": 1, "user_lo": 0, "user_hi": 1}]}))
    with pytest.raises(FileNotFoundError, match=r"shards\[0\] names gone.parquet"):
        ShardSet.open(tmp_path)


def test_writer_output_is_consistent_and_deterministic(tmp_path):
    m = write_shards(tmp_path / "a", n_users=300, n_items=200, n_interactions=3000, n_shards=3, n_genres=5, chunk_users=40)
    shards = ShardSet.open(tmp_path / "a")
    assert [(s["user_lo"], s["user_hi"]) for s in m["shards"]] == [(0, 100), (100, 200), (200, 300)]
    rows = []
    for s in m["shards"]:
        f = pq.ParquetFile(tmp_path / "a" / s["file"])
        assert f.metadata.num_row_groups == 3  # 100 users in chunks of 40: 40, 40, 20 (bounded memory)
        t = f.read().to_pandas()
        assert len(t) == s["rows"] and t.user.nunique() == s["users"] == 100  # every user has rows
        assert t.user.between(s["user_lo"], s["user_hi"] - 1).all()
        assert (t.sort_values(["user", "timestamp"], kind="stable").index == t.index).all()  # sorted by (user, time)
        assert not t.duplicated(["user", "item"]).any()
        rows.append(t)
    every = np.concatenate([t.item.to_numpy() for t in rows])
    assert m["rows"] == len(every) <= 3000  # duplicates of a draw collapse
    assert shards.item_counts().tolist() == np.bincount(every, minlength=200).tolist()
    # every item's genre is the one items.parquet records, and users lean to their favourite genre
    genre = shards.items()["genres"][1]
    share = [np.bincount(genre[t.item.to_numpy()], minlength=5).max() / len(t) for t in rows]
    assert min(share) > 1 / 5
    write_shards(tmp_path / "b", n_users=300, n_items=200, n_interactions=3000, n_shards=3, n_genres=5, chunk_users=40)
    for s in m["shards"]:
        assert pq.read_table(tmp_path / "a" / s["file"]).equals(pq.read_table(tmp_path / "b" / s["file"]))


def test_writer_refuses_bad_sizes_and_existing_output(tmp_path):
    with pytest.raises(ValueError, match="n_shards: 5 shards for 3 users"):
        write_shards(tmp_path / "x", n_users=3, n_items=10, n_interactions=30, n_shards=5)
    with pytest.raises(ValueError, match="n_interactions"):
        write_shards(tmp_path / "x", n_users=10, n_items=10, n_interactions=5, n_shards=1)
    write_shards(tmp_path / "x", n_users=10, n_items=10, n_interactions=30, n_shards=1)
    with pytest.raises(FileExistsError, match="exists"):
        write_shards(tmp_path / "x", n_users=10, n_items=10, n_interactions=30, n_shards=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temp dirs left behind
