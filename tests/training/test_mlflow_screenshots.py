"""scripts/mlflow_screenshots.py end to end: two real trainings, `mlflow server` on 127.0.0.1,
headless Chromium screenshots of the runs table, both run pages and the registered model. The
run names, dataset inputs and alias tags themselves are asserted through the MLflow client in
test_mlflow_compare.py and test_pipeline_mlflow.py; here: the UI renders them into real pages."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PAGES = ("experiment_runs.png", "run_1.png", "run_2.png", "registered_model.png")


def ink(path) -> tuple[float, int]:
    """(share of pixels that differ from the page's most common colour, distinct grey levels)."""
    from PIL import Image

    grey = np.asarray(Image.open(path).convert("L"))
    values, counts = np.unique(grey, return_counts=True)
    background = values[np.argmax(counts)]
    return float((grey != background).mean()), len(values)


@pytest.mark.chromium
def test_screenshots_show_rendered_pages(tmp_path):
    if not any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("chromium is not installed (Debian: apt-get update && apt-get install -y chromium)")
    out = subprocess.run([sys.executable, "scripts/mlflow_screenshots.py", "--out", str(tmp_path), "--epochs", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    pages = json.loads((tmp_path / "pages.json").read_text())
    assert len(pages["run_ids"]) == 2 and set(pages["pages"]) == set(PAGES)
    for name in PAGES:
        png = tmp_path / name
        assert png.read_bytes()[:8] == PNG_SIGNATURE, name
        share, levels = ink(png)
        # a page the React app rendered: text and tables over a good part of the window, not a
        # blank or single-colour canvas (a blank 1600x1000 screenshot has share 0 and 1 level)
        assert share > 0.02 and levels > 30, (name, share, levels)
