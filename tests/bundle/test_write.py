"""Atomic publication of a bundle directory (bundle.write): a reader finds the old bundle or the new
one, whole, and a failed write leaves the old one and no temporary directory behind."""
from __future__ import annotations

import json
import threading

import pytest

from bundle import write
from bundle.write import publish, staging


def files(d):
    return {p.name: p.read_text() for p in d.iterdir()}


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}-"))


def fill(d, generation: int) -> None:
    (d / "data.txt").write_text(f"data {generation}")
    (d / "manifest.json").write_text(json.dumps({"generation": generation}))


def test_a_new_bundle_appears_whole_under_a_missing_parent(tmp_path):
    out = tmp_path / "models" / "b"
    with staging(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".b-")  # a sibling: same filesystem
        fill(tmp, 1)
        assert not out.exists()  # nothing is visible before the block ends
    assert files(out) == {"data.txt": "data 1", "manifest.json": '{"generation": 1}'}
    assert leftovers(out.parent, "b") == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_a_bundle_is_replaced_as_a_whole(tmp_path, monkeypatch, exchange):
    if not exchange:  # the fallback where renameat2(RENAME_EXCHANGE) is missing
        monkeypatch.setattr(write, "_exchange", lambda a, b: False)
    out = tmp_path / "b"
    with staging(out) as tmp:
        fill(tmp, 1)
        (tmp / "only-in-1.txt").write_text("x")
    with staging(out) as tmp:
        fill(tmp, 2)
        assert files(out)["data.txt"] == "data 1"  # while the new one is written, readers see the old one
    assert files(out) == {"data.txt": "data 2", "manifest.json": '{"generation": 2}'}  # nothing of 1 left
    assert leftovers(tmp_path, "b") == []


def test_a_failed_write_keeps_the_old_bundle_and_no_temporary_dir(tmp_path):
    out = tmp_path / "b"
    with staging(out) as tmp:
        fill(tmp, 1)
    before = files(out)
    with pytest.raises(RuntimeError, match="parity"):
        with staging(out) as tmp:
            fill(tmp, 2)
            raise RuntimeError("parity check failed")
    assert files(out) == before
    assert leftovers(tmp_path, "b") == []
    with pytest.raises(KeyboardInterrupt):  # BaseException too: an interrupted export cleans up
        with staging(tmp_path / "c") as tmp:
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_exchange_swaps_two_directories_in_one_step(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("from a")
    (tmp_path / "b" / "y").write_text("from b")
    assert write._exchange(tmp_path / "a", tmp_path / "b") is True  # Linux (glibc >= 2.28) on ext4 / tmpfs
    assert files(tmp_path / "a") == {"y": "from b"} and files(tmp_path / "b") == {"x": "from a"}
    with pytest.raises(FileNotFoundError):
        write._exchange(tmp_path / "a", tmp_path / "missing")  # both must exist: an error, not a silent False


def test_publish_refuses_what_it_cannot_do_atomically(tmp_path):
    (tmp_path / "p").mkdir()
    staged = tmp_path / "p" / ".b-1"
    staged.mkdir()
    with pytest.raises(ValueError, match="sibling"):
        publish(staged, tmp_path / "b")  # another directory: maybe another filesystem
    (tmp_path / "p" / "b").write_text("a file, not a bundle")
    with pytest.raises(FileExistsError, match="not a bundle directory"):
        publish(staged, tmp_path / "p" / "b")
    assert (tmp_path / "p" / "b").read_text() == "a file, not a bundle" and staged.is_dir()


def test_a_concurrent_reader_never_misses_or_tears_the_manifest(tmp_path):
    """A reader polling manifest.json while the bundle is republished 150 times always finds it,
    complete (with the old rmtree-then-rename it could find no directory or a half-deleted one)."""
    out = tmp_path / "b"
    with staging(out) as tmp:
        fill(tmp, 0)
    stop, seen, errors = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                seen.add(json.loads((out / "manifest.json").read_text())["generation"])
            except Exception as e:  # noqa: BLE001 - every failure is the finding
                errors.append(repr(e))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for generation in range(1, 151):
            with staging(out) as tmp:
                fill(tmp, generation)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert len(seen) > 1 and max(seen) <= 150  # the reader did see the bundle change
    assert json.loads((out / "manifest.json").read_text())["generation"] == 150
    assert leftovers(tmp_path, "b") == []
