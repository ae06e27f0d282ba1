"""FeatureStore.generation() on a SQLite file: the counter is read again only when the WAL-index
header (the -shm file's first 96 bytes) moved, and a commit from anywhere (this process, another
process, after a WAL checkpoint) still shows on the very next call."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from features.consent import record_consent
from features.store import FeatureStore

REPO = Path(__file__).resolve().parents[2]


def traced(store: FeatureStore) -> list[str]:
    """The SQL the store's counter connection (this thread's) runs from now on."""
    store.generation()  # opens the counter connection
    statements: list[str] = []
    store._counter_local.conn.set_trace_callback(statements.append)
    return statements


def test_an_unchanged_store_reads_no_row_and_every_commit_shows_at_once(tmp_path):
    url = f"sqlite:///{tmp_path}/features.db"
    reader, writer = FeatureStore(url), FeatureStore(url)  # two replicas' stores
    statements = traced(reader)
    base = reader.generation()
    statements.clear()
    for _ in range(50):
        reader.generation()
    assert statements == []  # nothing committed: not one SELECT
    for i in range(1, 41):  # a write between every two reads, back to back
        record_consent(writer, f"u{i % 7}", {"personalization": i % 2 == 0})
        assert reader.generation() == base + i
    assert len(statements) == 40  # one real read per commit, none in between
    reader.close()
    writer.close()


def test_a_commit_from_another_process_and_after_a_wal_checkpoint_shows_at_once(tmp_path):
    url = f"sqlite:///{tmp_path}/features.db"
    reader = FeatureStore(url)
    before = reader.generation()
    reader.generation()  # the header is mapped and seen
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from features.store import FeatureStore\nfrom features.consent import record_consent\n"
            "s = FeatureStore(%r); record_consent(s, 'u1', {'personalization': False}); s.close()") % (str(REPO), url)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert reader.generation() == before + 1
    assert reader.checkpoint() is True  # what erasure does: the WAL copied back and truncated to zero
    after_checkpoint = reader.generation()
    record_consent(reader, "u2", {"personalization": False})  # the first commit into the restarted WAL
    assert reader.generation() == after_checkpoint + 1
    reader.close()


def test_without_a_wal_index_every_call_reads_the_counter(tmp_path):
    url = f"sqlite:///{tmp_path}/features.db"
    store = FeatureStore(url)
    statements = traced(store)
    store._map_wal_index = lambda: None  # no -shm to trust (e.g. another journal mode): the SELECT every time
    store._wal_index, store._seen = None, None
    statements.clear()
    for _ in range(3):
        store.generation()
    assert len(statements) == 3
    store.close()
