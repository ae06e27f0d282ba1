"""`trustrec train` stopped by SIGTERM (`kill`, a job scheduler, a container stop), as a user's
process manager does it: the real CLI in its own process, a real MLflow sqlite store. Before, Python
died at once: the MLflow run stayed RUNNING forever and the staged bundle folder stayed on disk."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, tiny_overrides


def _run_status(db: Path) -> list[str]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            return [r[0] for r in c.execute("SELECT status FROM runs")]
    except sqlite3.OperationalError:  # the schema is still being created
        return []


def test_sigterm_marks_the_run_killed_and_leaves_no_staged_bundle(tmp_path):
    sets = [x for o in tiny_overrides(tmp_path) + ["trainer.epochs=400", "trainer.patience=1000"] for x in ("--set", o)]
    argv = [str(Path(sys.executable).parent / "trustrec"), "train", "--config", str(REPO / "configs" / "two_tower.yaml"), *sets]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while _run_status(tmp_path / "mlflow.db") != ["RUNNING"]:  # the run is open: training has begun
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.5)
        time.sleep(2)  # into the epochs
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "trustrec train: stopped by SIGTERM" in err, err[-3000:]
    assert "Traceback" not in err
    assert _run_status(tmp_path / "mlflow.db") == ["KILLED"]
    artifacts = tmp_path / "artifacts"
    assert not artifacts.exists() or [p.name for p in artifacts.iterdir() if p.name.startswith(".")] == []  # no staged bundle
    with sqlite3.connect(tmp_path / "mlflow.db") as c:
        assert c.execute("SELECT COUNT(*) FROM model_versions").fetchone()[0] == 0  # nothing registered
