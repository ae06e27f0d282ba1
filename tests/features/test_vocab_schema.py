"""Vocab round trips and the schema's own invariants."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from features.schema import Interactions
from features.vocab import UnknownIdError, Vocab


def test_vocab_round_trip_and_save_load(tmp_path):
    v = Vocab(["u7", "u3", 42], kind="user")
    assert v.ids == ["u7", "u3", "42"]
    idx = v.encode(["u3", "42", "u7"])
    assert idx.dtype == np.int64 and idx.tolist() == [1, 2, 0]
    assert v.decode(idx) == ["u3", "42", "u7"]
    v.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json") == v


def test_vocab_unknown_ids():
    v = Vocab(["a", "b"], kind="item")
    with pytest.raises(UnknownIdError) as e:
        v.index("zzz")
    assert isinstance(e.value, KeyError) and e.value.kind == "item" and e.value.raw_id == "zzz"
    with pytest.raises(UnknownIdError):
        v.encode(["a", "zzz"])
    assert v.encode(["a", "zzz"], unknown=-1).tolist() == [0, -1]
    assert v.get("zzz") is None and "zzz" not in v and "b" in v


def test_vocab_rejects_duplicates():
    with pytest.raises(ValueError, match="duplicate"):
        Vocab(["a", "b", "a"])


def test_interactions_length_validation():
    with pytest.raises(ValueError, match="rating"):
        Interactions(np.zeros(3, np.int64), np.zeros(3, np.int64), np.zeros(2, np.float32), np.zeros(3, np.int64))


def test_drop_duplicate_pairs_keeps_last_in_row_order():
    inter = Interactions(
        np.array([0, 0, 1, 0]), np.array([5, 6, 5, 5]), np.array([1.0, 2.0, 3.0, 4.0], np.float32), np.array([10, 11, 12, 13])
    )
    out = inter.drop_duplicate_pairs()
    assert out.user.tolist() == [0, 1, 0]
    assert out.item.tolist() == [6, 5, 5]
    assert out.rating.tolist() == [2.0, 3.0, 4.0]


def test_features_package_never_imports_torch():
    root = Path(__file__).resolve().parents[2] / "features"
    offenders = [p.name for p in root.glob("*.py") if "import torch" in p.read_text() or "from torch" in p.read_text()]
    assert offenders == []
    modules = ["config", "errors", "schema", "vocab", "synthetic", "movielens", "tabular", "datasets", "splits", "store"]
    code = "import sys\n" + "".join(f"import features.{m}\n" for m in modules) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=root.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
