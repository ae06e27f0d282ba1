"""Dataset specs (features/sources.py): every form, the data block and overrides each gives, the
labels, the split protocol that fits, and errors naming --data."""
from __future__ import annotations

import pytest

from features.config import DataConfig
from features.datasets import load_dataset
from features.sources import DatasetNotFound, SpecError, parse_spec, slug
from training.config import load_config


def fake(root, files):
    root.mkdir(parents=True, exist_ok=True)
    for f in files:
        (root / f).write_text("0 1\n", encoding="utf-8")
    return root


def applied(spec, base=None) -> DataConfig:
    """The data section load_config builds from the spec's overrides on top of a config file."""
    return load_config(base, spec.overrides()).data


def test_synthetic():
    s = parse_spec("synthetic")
    assert (s.kind, s.label, s.data, s.protocol, s.path) == ("synthetic", "synthetic", {"source": "synthetic"}, "stratified", None)
    assert s.overrides() == ["data.source=synthetic"] and s.overrides(source=False) == []
    with pytest.raises(SpecError, match="--data synthetic:x: synthetic takes no path"):
        parse_spec("synthetic:x")


def test_named_datasets_path_env_var_then_shared_folder(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    ml100k = fake(shared / "ml-100k", ["u.data", "u.item", "u.user"])
    monkeypatch.delenv("TRUSTREC_ML100K", raising=False)
    s = parse_spec("ml100k", shared=shared)
    assert (s.kind, s.label, s.path, s.protocol) == ("ml100k", "ml100k", ml100k, "stratified")
    assert s.overrides() == ["data.source=movielens", f"data.path={ml100k}"]
    env = fake(tmp_path / "env", ["u.data", "u.item", "u.user"])
    monkeypatch.setenv("TRUSTREC_ML100K", str(env))
    assert parse_spec("ml100k", shared=shared).path == env
    arg = fake(tmp_path / "arg", ["u.data", "u.item", "u.user"])
    assert parse_spec(f"ml100k:{arg}", shared=shared).path == arg  # the path beats the env var
    # ML-1M implicit: the lines source on the folder, its own split by default
    ml1m = fake(tmp_path / "ml1m", ["train.txt", "test.txt"])
    monkeypatch.setenv("TRUSTREC_ML1M_IMPLICIT", str(ml1m))
    s = parse_spec("ml1m-implicit", shared=shared)
    assert (s.label, s.data, s.protocol) == ("ml1m-implicit", {"source": "ml1m-implicit", "path": str(ml1m)}, "given")
    ds = load_dataset(applied(s))
    assert (ds.n_users, ds.n_items, ds.interactions.timestamp.tolist()) == (1, 1, [1])  # (0, 1) is in both files: the test row stays


def test_absent_named_dataset_is_dataset_not_found(tmp_path, monkeypatch):
    monkeypatch.delenv("TRUSTREC_ML1M_IMPLICIT", raising=False)
    partial = fake(tmp_path / "shared" / "ml-1m-implicit", ["train.txt"])
    with pytest.raises(DatasetNotFound, match=f"ml1m-implicit not found at {partial} \\(default location; missing test.txt\\); set TRUSTREC_ML1M_IMPLICIT"):
        parse_spec("ml1m-implicit", shared=tmp_path / "shared")
    with pytest.raises(FileNotFoundError, match="argument; missing u.data, u.item, u.user"):
        parse_spec(f"ml100k:{tmp_path / 'nowhere'}")


def test_lines(tmp_path):
    f = tmp_path / "My Data" / "train.txt"
    f.parent.mkdir()
    f.write_text("0 1 2\n1 2\n")
    s = parse_spec(f"lines:{f}")
    assert (s.kind, s.label, s.protocol, s.path) == ("lines", "lines-my-data-train", "stratified", f)
    assert s.data == {"source": "lines", "lines": {"path": str(f)}}
    assert s.overrides() == ["data.source=lines", f"data.lines.path={f}"]
    assert applied(s) == s.config() and load_dataset(s.config()).n_users == 2
    with pytest.raises(SpecError, match="--data lines:.*nope.txt: file not found"):
        parse_spec(f"lines:{tmp_path / 'nope.txt'}")
    with pytest.raises(SpecError, match=r"--data lines: needs a path \(lines:PATH\)"):
        parse_spec("lines")


def test_csv_columns_detected_from_the_header(tmp_path):
    ml = tmp_path / "ml-latest-small" / "ratings.csv"
    ml.parent.mkdir()
    ml.write_text("userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n2,31,4.0,835355493\n")
    s = parse_spec(f"csv:{ml}")
    assert (s.kind, s.label, s.protocol) == ("csv", "csv-ml-latest-small-ratings", "stratified")
    table = s.data["table"]
    assert (s.data["source"], table["path"], table["delimiter"]) == ("table", str(ml), ",")
    assert table["columns"] == {"user": "userId", "item": "movieId", "rating": "rating", "timestamp": "timestamp"}
    assert s.notes == ["columns user=userId, item=movieId, rating=rating, timestamp=timestamp"]
    ds = load_dataset(applied(s))
    assert (ds.n_users, ds.n_items, ds.interactions.rating.tolist()) == (2, 2, [2.5, 3.0, 4.0])
    # implicit, tab-separated: no rating column -> null, every rating 1.0
    tsv = tmp_path / "clicks.tsv"
    tsv.write_text("user_id\titem_id\nu1\ta\nu2\tb\n")
    s = parse_spec(f"csv:{tsv}")
    assert s.data["table"]["delimiter"] == "\t" and s.data["table"]["columns"]["rating"] is None
    assert "data.table.columns.rating=null" in s.overrides() and "data.table.delimiter=\"\\t\"" in s.overrides()
    assert load_dataset(applied(s)).interactions.rating.tolist() == [1.0, 1.0]


def test_csv_without_recognisable_columns_names_data_and_the_way_out(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("who,what\n1,2\n")
    with pytest.raises(SpecError) as e:
        parse_spec(f"csv:{bad}")
    assert str(e.value).startswith(f"--data csv:{bad}: ") and "table:CONFIG.yaml" in str(e.value) and "data.table.columns" in str(e.value)


def test_table_yaml_with_a_table_block_or_a_data_block(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in the YAML are relative to the working directory
    (tmp_path / "events.csv").write_text("u,i\na,x\nb,y\n")
    cfg = tmp_path / "my data.yaml"
    cfg.write_text("table:\n  path: events.csv\n  columns: {user: u, item: i, rating: null, timestamp: null}\n")
    s = parse_spec(f"table:{cfg}")
    assert (s.kind, s.label, s.protocol, s.path) == ("table", "table-my-data", "stratified", cfg)
    assert s.data == {"source": "table", "table": {"path": "events.csv", "columns": {"user": "u", "item": "i", "rating": None, "timestamp": None}}}
    assert load_dataset(applied(s)).user_vocab.ids == ["a", "b"]
    # a data block of any source: lines with a test file -> its own split; a `split:` beside it is honoured
    (tmp_path / "tr.txt").write_text("0 1\n")
    (tmp_path / "te.txt").write_text("0 2\n")
    cfg.write_text("data:\n  source: lines\n  lines: {path: tr.txt, test_path: te.txt}\nmodel: {kind: two_tower}\n")
    assert parse_spec(f"table:{cfg}").protocol == "given"
    cfg.write_text("data:\n  source: lines\n  lines: {path: tr.txt, test_path: te.txt}\nsplit: {protocol: leave_last_n}\n")
    assert parse_spec(f"table:{cfg}").protocol == "leave_last_n"


@pytest.mark.parametrize(
    "text, message",
    [
        ("table: {path: events.csv}\ndata: {source: synthetic}\n", "found both"),
        ("model: {}\n", "found neither"),
        ("- a list\n", "found neither"),
        ("table: [1]\n", "'table:' must be a mapping"),
        ("table: {path: events.csv, columns: {usr: u}}\n", "data.table.columns.usr: unknown key"),
        ("table: {path: nope.csv}\n", "data.table.path: file not found: nope.csv"),
        ("data: {source: lines, lines: {path: events.csv, users_path: nope.dat}}\n", "data.lines.users_path: file not found"),
        ("data: {source: lines}\n", "data.lines section"),
        ("table: {path: events.csv}\nsplit: {protocol: random}\n", "split.protocol: 'random'"),
        ("table: {path: [unclosed\n", "not valid YAML"),
    ],
)
def test_table_yaml_errors_name_data_and_the_key(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "events.csv").write_text("user_id,item_id\na,x\n")
    cfg = tmp_path / "d.yaml"
    cfg.write_text(text)
    with pytest.raises(SpecError) as e:
        parse_spec(f"table:{cfg}")
    assert str(e.value).startswith(f"--data table:{cfg}: ") and message in str(e.value)


def test_unknown_kind_lists_every_form_and_the_flag_is_named():
    with pytest.raises(SpecError, match=r"--data: unknown dataset 'parquet'; expected one of ml100k\[:PATH\], ml1m-implicit\[:PATH\], table:CONFIG.yaml, csv:PATH, lines:PATH, synthetic"):
        parse_spec("parquet:x.pq")
    with pytest.raises(SpecError, match="^--dataset: unknown"):
        parse_spec("nope", flag="--dataset")


def test_overrides_quote_what_yaml_would_misread(tmp_path):
    odd = tmp_path / "a: b #c" / "2020"
    odd.parent.mkdir()
    odd.write_text("0 1\n")
    s = parse_spec(f"lines:{odd}")
    assert s.overrides()[1] == f'data.lines.path="{odd}"'  # unquoted, YAML would read a mapping
    assert applied(s).lines.path == str(odd)
    assert slug("CSV--Ünïcode  data/..x") == "csv-n-code-data-..x" and slug("***") == "data" and len(slug("a" * 100)) == 48
