"""Generic CSV / Parquet loader: column mapping, validation with line numbers, skip mode."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.config import ColumnMap, ItemColumnMap, TableConfig
from features.errors import DataFormatError
from features.tabular import load_table

MAPPED = ColumnMap(user="uid", item="movie", rating="score", timestamp="when")


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_csv_with_column_mapping_and_items_file(tmp_path):
    events = _write(
        tmp_path / "events.csv",
        "when,uid,movie,score,extra\n"
        "100,bob,m2,4,x\n"
        "50,amy,m1,3.5,y\n"
        "\n"  # blank lines are ignored
        "120,bob,m9,2,z\n"
        "130,bob,m2,1,w\n",  # duplicate (bob, m2): the last row wins
    )
    items = _write(
        tmp_path / "items.csv",
        'id,name,tags,released\nm1,"First, the film",Drama|Comedy,1990\nm2,Second,Comedy,\nm3,Unwatched,,2001\n',
    )
    cfg = TableConfig(
        path=events, columns=MAPPED, items_path=items,
        item_columns=ItemColumnMap(item="id", title="name", genres="tags", year="released"),
    )
    ds = load_table(cfg)
    assert ds.user_vocab.ids == ["bob", "amy"]
    assert ds.item_vocab.ids == ["m1", "m2", "m3", "m9"]  # catalogue first, then unknown items
    assert ds.genre_names == ["Comedy", "Drama"]
    assert ds.items.title == ["First, the film", "Second", "Unwatched", "m9"]
    assert ds.items.genres == [(0, 1), (0,), (), ()]
    assert ds.items.year.tolist() == [1990, 0, 2001, 0]
    it = ds.interactions
    assert ds.user_vocab.decode(it.user) == ["amy", "bob", "bob"]
    assert ds.item_vocab.decode(it.item) == ["m1", "m9", "m2"]
    assert it.rating.tolist() == [3.5, 2.0, 1.0] and it.timestamp.tolist() == [50, 120, 130]
    assert ds.users.age.tolist() == [-1, -1] and ds.users.gender == ["", ""] and ds.skipped_rows == 0


def test_parquet_with_mapping_timestamps_and_implicit_feedback(tmp_path):
    path = tmp_path / "events.parquet"
    pq.write_table(
        pa.table({
            "uid": pa.array([7, 8, 7], pa.int64()),
            "movie": ["a", "b", "c"],
            "when": pa.array([1_000_000, 2_000_000, 3_500_000], pa.timestamp("ms")),
        }),
        path,
    )
    ds = load_table(TableConfig(path=str(path), columns=ColumnMap(user="uid", item="movie", rating=None, timestamp="when")))
    assert ds.user_vocab.ids == ["7", "8"]
    assert ds.interactions.rating.tolist() == [1.0, 1.0, 1.0]
    assert ds.interactions.timestamp.tolist() == [1000, 2000, 3500]
    ds = load_table(TableConfig(path=str(path), columns=ColumnMap(user="uid", item="movie", rating=None, timestamp=None)))
    assert ds.interactions.timestamp.tolist() == [0, 0, 0]


def test_missing_mapped_column_names_column_and_file(tmp_path):
    events = _write(tmp_path / "events.csv", "uid,movie,when\na,b,1\n")
    with pytest.raises(ValueError) as e:
        load_table(TableConfig(path=events, columns=MAPPED))
    assert "'score'" in str(e.value) and "events.csv" in str(e.value)
    path = tmp_path / "events.parquet"
    pq.write_table(pa.table({"uid": ["a"], "movie": ["b"]}), path)
    with pytest.raises(ValueError, match="'when'"):
        load_table(TableConfig(path=str(path), columns=MAPPED.model_copy(update={"rating": None})))


@pytest.mark.parametrize(
    "body, line, fragment",
    [
        ("a,x,4,10\nb,y,oops,11\n", 3, "rating"),
        ("a,x,4,10\nb,y,4,11\nc,z,4\n", 4, "fields"),
        ("a,x,4,10\n,y,4,11\n", 3, "user id"),
        ("a,x,4,10\nb,y,4,yesterday\n", 3, "timestamp"),
        ("a,x,4,10\nb,y,4,11,extra\nc,z,bad,12\n", 3, "fields"),  # the first bad line is reported
        ("a,x,bad,10\nb,y,4,11,extra\n", 2, "rating"),
    ],
)
def test_malformed_csv_row_reports_file_and_line(tmp_path, body, line, fragment):
    events = _write(tmp_path / "events.csv", "user_id,item_id,rating,timestamp\n" + body)
    with pytest.raises(DataFormatError) as e:
        load_table(TableConfig(path=events))
    assert e.value.file == events and e.value.line == line and fragment in e.value.message
    assert f"events.csv:{line}:" in str(e.value)


def test_line_numbers_count_multiline_quoted_fields(tmp_path):
    events = _write(tmp_path / "e.csv", 'user_id,item_id,rating,timestamp\n"a\nb",x,4,10\nc,y,nope,11\n')
    with pytest.raises(DataFormatError) as e:
        load_table(TableConfig(path=events))
    assert e.value.line == 4


def test_malformed_parquet_row_reports_row_number(tmp_path):
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"user_id": ["a", None, "c"], "item_id": ["x", "y", "z"]}), path)
    with pytest.raises(DataFormatError) as e:
        load_table(TableConfig(path=str(path), columns=ColumnMap(rating=None, timestamp=None)))
    assert e.value.line == 2 and "user id" in e.value.message


def test_skip_mode_skips_counts_and_logs(tmp_path, caplog):
    events = _write(
        tmp_path / "events.csv",
        "user_id,item_id,rating,timestamp\na,x,4,10\nb,y,oops,11\nc,z,4\n,w,1,1\nd,v,5,13\n",
    )
    with caplog.at_level("WARNING", logger="features.loaders"):
        ds = load_table(TableConfig(path=events), on_bad_row="skip")
    assert ds.skipped_rows == 3
    assert ds.user_vocab.ids == ["a", "d"] and ds.item_vocab.decode(ds.interactions.item) == ["x", "v"]
    assert "skipped 3" in caplog.text and "events.csv" in caplog.text and "line 3" in caplog.text


def test_malformed_items_file_year(tmp_path):
    events = _write(tmp_path / "events.csv", "user_id,item_id,rating,timestamp\na,x,4,10\n")
    items = _write(tmp_path / "items.csv", "item_id,title,genres,year\nx,X,Drama,1999\ny,Y,Drama,nineteen\n")
    with pytest.raises(DataFormatError) as e:
        load_table(TableConfig(path=events, items_path=items))
    assert e.value.file == items and e.value.line == 3
    ds = load_table(TableConfig(path=events, items_path=items), on_bad_row="skip")
    assert ds.skipped_rows == 1 and ds.item_vocab.ids == ["x"]


def test_unknown_suffix_needs_explicit_format(tmp_path):
    events = _write(tmp_path / "events.dat", "user_id,item_id,rating,timestamp\na,x,4,10\n")
    with pytest.raises(ValueError, match="format"):
        load_table(TableConfig(path=events))
    assert len(load_table(TableConfig(path=events, format="csv")).interactions) == 1
    tsv = _write(tmp_path / "events.tsv", "user_id\titem_id\trating\ttimestamp\na\tx\t4\t10\n")
    assert np.array_equal(load_table(TableConfig(path=tsv, delimiter="\t")).interactions.rating, [4.0])


# --- header detection (detect_columns / detect_item_columns) ---------------------------------


@pytest.mark.parametrize(
    "header, want",
    [
        ("userId,movieId,rating,timestamp", ("userId", "movieId", "rating", "timestamp")),  # MovieLens ratings.csv
        ("user_id,item_id,rating,timestamp", ("user_id", "item_id", "rating", "timestamp")),
        ("user_id,item_id,score", ("user_id", "item_id", "score", None)),
        ("user,item", ("user", "item", None, None)),  # implicit feedback, no time
        ("ITEM,When,USER", ("USER", "ITEM", None, None)),  # any case, any order; 'When' is no timestamp name
        ('"User-ID";"ISBN";"Book-Rating"', ("User-ID", "ISBN", "Book-Rating", None)),  # other delimiter, quoted, dashes
    ],
)
def test_detect_columns_maps_common_headers(tmp_path, header, want):
    from features.tabular import detect_columns

    path = _write(tmp_path / "ratings.csv", header + "\n1,2,3,4\n")
    cols = detect_columns(path, delimiter=";" if ";" in header else ",")
    assert (cols.user, cols.item, cols.rating, cols.timestamp) == want


def test_detect_columns_on_parquet_and_with_a_bom(tmp_path):
    from features.tabular import detect_columns

    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"customer_id": ["a"], "product_id": ["b"], "stars": [5]}), path)
    assert detect_columns(path) == ColumnMap(user="customer_id", item="product_id", rating="stars", timestamp=None)
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffuserId,movieId\n1,2\n".encode())
    assert detect_columns(bom).user == "userId"


def test_detect_columns_names_every_field_it_cannot_map(tmp_path):
    from features.tabular import detect_columns

    with pytest.raises(ValueError) as e:
        detect_columns(_write(tmp_path / "odd.csv", "who,what,how_much\na,b,1\n"))
    msg = str(e.value)
    assert "odd.csv" in msg and "['who', 'what', 'how_much']" in msg
    assert "data.table.columns.user" in msg and "data.table.columns.item" in msg  # both, in one error
    assert "userid" in msg and "movieid" in msg  # what it looked for
    with pytest.raises(ValueError, match=r"data.table.columns.user: several columns could be it \('user', 'uid'\)"):
        detect_columns(_write(tmp_path / "two.csv", "user,uid,item\n"))
    with pytest.raises(ValueError, match="empty file"):
        detect_columns(_write(tmp_path / "empty.csv", ""))


def test_detect_item_columns_on_a_movielens_style_items_file(tmp_path):
    from features.tabular import detect_item_columns

    cols = detect_item_columns(_write(tmp_path / "movies.csv", "movieId,title,genres\n1,A (1995),Drama\n"))
    assert cols == ItemColumnMap(item="movieId", title="title", genres="genres", year=None)
