"""Run configuration: the shipped YAML files validate, typos and bad types name their dotted key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.config import ConfigError, TrainConfig, flatten, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def test_two_tower_yaml_validates_with_its_values():
    cfg = load_config(CONFIGS / "two_tower.yaml")
    assert isinstance(cfg, TrainConfig)
    assert cfg.data.source == "synthetic"
    assert (cfg.data.synthetic.n_users, cfg.data.synthetic.n_items) == (1000, 800)
    assert cfg.split.protocol == "stratified" and cfg.split.ratio == 0.75 and cfg.split.seed == 42
    assert cfg.model.use_user_id is False and cfg.model.temperature == 0.05
    assert cfg.trainer.checkpoint_dir == "runs/checkpoints/two_tower"
    assert cfg.trainer.num_threads is None
    assert cfg.export.parity_atol == 1e-5
    assert cfg.tracking.alias == "champion"


def test_ml100k_yaml_validates_and_falls_back_to_defaults():
    cfg = load_config(CONFIGS / "two_tower_ml100k.yaml")
    assert cfg.data.source == "movielens" and cfg.data.path is None
    assert cfg.trainer.checkpoint_dir == "runs/checkpoints/two_tower_ml100k"
    assert cfg.store.url == "sqlite:///data/features_ml100k.db"
    assert cfg.trainer.batch_size == TrainConfig().trainer.batch_size  # not in the file: the default


@pytest.mark.parametrize("path", sorted(p.name for pattern in ("two_tower*.yaml", "ease_*.yaml") for p in CONFIGS.glob(pattern)))
def test_every_key_in_the_shipped_files_is_used(path):
    """Each leaf in the YAML reaches the config (no key silently ignored or renamed)."""
    raw = flatten(yaml.safe_load((CONFIGS / path).read_text()))
    flat = load_config(CONFIGS / path).flat()
    for key, value in raw.items():
        assert key in flat, key
        assert flat[key] == value, key


def test_unknown_key_in_yaml_names_dotted_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  epochz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "trainer.epochz: unknown key" in str(e.value)
    assert str(path) in str(e.value)


def test_unknown_nested_key_via_set_names_dotted_key():
    with pytest.raises(ConfigError, match=r"trainer\.epochz: unknown key"):
        load_config(CONFIGS / "two_tower.yaml", ["trainer.epochz=5"])
    with pytest.raises(ConfigError, match=r"data\.synthetic\.n_userz: unknown key"):
        load_config(CONFIGS / "two_tower.yaml", ["data.synthetic.n_userz=5"])
    with pytest.raises(ConfigError, match=r"trainerr: unknown key"):
        load_config(None, ["trainerr.epochs=5"])


@pytest.mark.parametrize(
    "assignment, key",
    [("trainer.epochs=abc", "trainer.epochs"), ("trainer.epochs=0", "trainer.epochs"), ("model.temperature=-1", "model.temperature"),
     ("task.loss=hinge", "task.loss"), ("trainer.device=tpu", "trainer.device"), ("split.ratio=1.5", "split.ratio"),
     ("model.kind=wide_deep", "model.kind"), ("model.item_id_dropout=1", "model.item_id_dropout"), ("model.stated_dropout=1.5", "model.stated_dropout"),
     ("model.demographics_dropout=-0.1", "model.demographics_dropout"), ("model.title_buckets=0", "model.title_buckets"),
     ("model.use_contents=true", "model.use_contents")],
)
def test_bad_value_names_its_key(assignment, key):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "two_tower.yaml", [assignment])
    lines = str(e.value).splitlines()
    assert any(line.strip().startswith(f"{key}:") for line in lines), str(e.value)


def test_set_parses_yaml_scalars():
    cfg = load_config(
        CONFIGS / "two_tower.yaml",
        ["trainer.epochs=7", "trainer.lr=0.01", "trainer.amp=false", "model.use_user_id=true", "trainer.num_threads=2",
         "tracking.run_name=nightly", "data.synthetic.n_users=150", "trainer.epochs=9"],
    )
    assert cfg.trainer.epochs == 9 and isinstance(cfg.trainer.epochs, int)  # last --set wins
    assert cfg.trainer.lr == 0.01
    assert cfg.trainer.amp is False and cfg.model.use_user_id is True
    assert cfg.trainer.num_threads == 2
    assert cfg.tracking.run_name == "nightly"
    assert cfg.data.synthetic.n_users == 150
    assert cfg.data.synthetic.n_items == 800  # sibling keys of the file survive an override
    assert load_config(None, ["tracking.run_name=null"]).tracking.run_name is None


def test_hybrid_switches_default_off_and_parse():
    default = load_config(CONFIGS / "two_tower.yaml").model
    assert default.kind == "two_tower"
    assert (default.use_content, default.use_demographics, default.use_stated, default.rating_weighted) == (False, False, False, False)
    assert default.item_id_dropout == 0.0 and default.title_buckets == 1024
    assert (default.demographics_dropout, default.stated_dropout) == (0.2, 0.5)
    m = load_config(CONFIGS / "two_tower.yaml", [
        "model.kind=hybrid", "model.use_content=true", "model.use_demographics=true", "model.use_stated=true", "model.rating_weighted=true",
        "model.item_id_dropout=0.1", "model.demographics_dropout=0", "model.stated_dropout=1", "model.title_buckets=64",
    ]).model  # fmt: skip
    assert m.kind == "hybrid"
    assert (m.use_content, m.use_demographics, m.use_stated, m.rating_weighted) == (True, True, True, True)
    assert (m.item_id_dropout, m.demographics_dropout, m.stated_dropout, m.title_buckets) == (0.1, 0.0, 1.0, 64)


def test_set_needs_key_value_and_a_section():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["trainer.epochs"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(CONFIGS / "two_tower.yaml", ["trainer.epochs.max=3"])


def test_flat_gives_dotted_leaf_keys():
    cfg = load_config(None, ["trainer.lr=0.02"])
    flat = cfg.flat()
    assert flat["trainer.lr"] == 0.02
    assert flat["data.synthetic.n_users"] == 1000
    assert flat["tracking.run_name"] is None
    assert not any(isinstance(v, dict) for v in flat.values())
    assert all("." in k for k in flat)
    # every section's fields appear: e.g. 11 trainer fields
    assert sorted(k.split(".", 1)[1] for k in flat if k.startswith("trainer.")) == sorted(TrainConfig().trainer.model_fields)
    assert flatten({"a": {"b": {"c": 1}, "d": 2}, "e": 3}) == {"a.b.c": 1, "a.d": 2, "e": 3}


def test_digest_tracks_content():
    a, b = load_config(None), load_config(None)
    assert a.digest() == b.digest()
    assert load_config(None, ["trainer.seed=1"]).digest() != a.digest()


def test_defaults_without_file_and_empty_file(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == TrainConfig() == load_config(None)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)
