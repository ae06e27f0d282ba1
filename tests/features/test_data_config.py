"""Config models reject typos and dispatch to the right loader."""
import pytest
from pydantic import ValidationError

from features.config import DataConfig, SplitConfig, SyntheticConfig, TableConfig
from features.datasets import load_dataset


def test_unknown_keys_fail_naming_the_key():
    with pytest.raises(ValidationError, match="n_user"):
        DataConfig.model_validate({"synthetic": {"n_user": 10}})
    with pytest.raises(ValidationError, match="ratoi"):
        SplitConfig.model_validate({"ratoi": 0.5})
    with pytest.raises(ValidationError, match="usr"):
        TableConfig.model_validate({"path": "x.csv", "columns": {"usr": "a"}})


def test_defaults_and_bounds():
    cfg = DataConfig()
    assert cfg.source == "synthetic" and cfg.path is None and cfg.on_bad_row == "error"
    assert cfg.synthetic.n_users == 1000 and cfg.synthetic.n_items == 800 and cfg.synthetic.n_genres == 12
    s = SplitConfig()
    assert (s.protocol, s.ratio, s.by, s.seed, s.n, s.val_fraction) == ("stratified", 0.75, "item", 42, 1, 0.1)
    with pytest.raises(ValidationError):
        SyntheticConfig(n_genres=19)  # more than the fixed genre-name list
    with pytest.raises(ValidationError):
        SplitConfig(ratio=1.5)


def test_table_source_needs_table_section():
    with pytest.raises(ValidationError, match="table"):
        DataConfig(source="table")


def test_load_dataset_dispatches(tmp_path):
    ds = load_dataset(DataConfig(synthetic=SyntheticConfig(n_users=20, n_items=30, seed=3)))
    assert ds.n_users == 20 and ds.n_items == 30
    csv = tmp_path / "events.csv"
    csv.write_text("user_id,item_id,rating,timestamp\na,x,4,100\nb,y,5,200\n")
    ds = load_dataset(DataConfig(source="table", table=TableConfig(path=str(csv))))
    assert ds.user_vocab.ids == ["a", "b"] and len(ds.interactions) == 2
