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
        "120,bob,m1,2,z\n"
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
    assert ds.item_vocab.ids == ["m1", "m2", "m3"]  # the catalogue's order, unwatched items included
    assert ds.genre_names == ["Comedy", "Drama"]
    assert ds.items.title == ["First, the film", "Second", "Unwatched"]
    assert ds.items.genres == [(0, 1), (0,), ()]
    assert ds.items.year.tolist() == [1990, 0, 2001]
    it = ds.interactions
    assert ds.user_vocab.decode(it.user) == ["amy", "bob", "bob"]
    assert ds.item_vocab.decode(it.item) == ["m1", "m1", "m2"]
    assert it.rating.tolist() == [3.5, 2.0, 1.0] and it.timestamp.tolist() == [50, 120, 130]
    assert ds.users.age.tolist() == [-1, -1] and ds.users.gender == ["", ""] and ds.skipped_rows == 0


def test_without_items_file_every_item_is_its_own_title(tmp_path):
    ds = load_table(TableConfig(path=_write(tmp_path / "e.csv", "user_id,item_id,rating,timestamp\na,x,4,10\nb,y,3,11\n")))
    assert ds.item_vocab.ids == ["x", "y"] and ds.items.title == ["x", "y"] and ds.items.year.tolist() == [0, 0]


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
    with pytest.raises(ValueError, match="data.table.columns.timestamp: column 'when' not found"):
        load_table(TableConfig(path=str(path), columns=MAPPED.model_copy(update={"rating": None})))


def test_every_missing_column_in_one_error_with_its_full_key(tmp_path):
    events = _write(tmp_path / "events.csv", "uid,when,extra\na,1,x\n")
    with pytest.raises(ValueError) as e:
        load_table(TableConfig(path=events, columns=MAPPED))  # wants uid, movie, score, when
    msg = str(e.value)
    lines = msg.splitlines()
    assert lines[0] == f"{events}: 2 configured column(s) not in the file, which has columns ['uid', 'when', 'extra']:"
    item = [ln for ln in lines if "data.table.columns.item:" in ln]
    rating = [ln for ln in lines if "data.table.columns.rating:" in ln]
    assert len(item) == len(rating) == 1 and "'movie'" in item[0] and "'score'" in rating[0]
    assert "required" in item[0] and "null" not in item[0]  # never advise null for a required column
    assert "null" in rating[0] and "implicit" in rating[0]
    assert "columns.user" not in msg and "columns.timestamp" not in msg  # those were found

    good = _write(tmp_path / "good.csv", "user_id,item_id,rating,timestamp\na,x,4,10\n")
    items = _write(tmp_path / "items.csv", "id,name\nx,X\n")
    with pytest.raises(ValueError) as e:
        load_table(TableConfig(path=good, items_path=items,
                               item_columns=ItemColumnMap(item="movie_id", title="name", genres="tags", year="released")))
    msg = str(e.value)
    assert "items.csv: 3 configured column(s)" in msg and "['id', 'name']" in msg
    for key in ("item_columns.item: column 'movie_id'", "item_columns.genres: column 'tags'", "item_columns.year: column 'released'"):
        assert "data.table." + key in msg
    item_line = next(ln for ln in msg.splitlines() if "item_columns.item:" in ln)
    assert "required" in item_line and "null" not in item_line and "item_columns.title" not in msg


def test_omitted_columns_are_detected_from_a_movielens_style_header(tmp_path, caplog):
    events = _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,964982703\n2,20,3.5,964982224\n1,20,5.0,964983815\n")
    movies = _write(
        tmp_path / "movies.csv",
        "movieId,title,genres\n10,Heat (1995),Action|Crime\n20,Made Up Film (2003) ,(no genres listed)\n30,Untitled,Drama\n",
    )
    with caplog.at_level("INFO", logger="features.loaders"):
        ds = load_table(TableConfig(path=events, items_path=movies))
    assert ds.user_vocab.ids == ["1", "2"] and ds.item_vocab.ids == ["10", "20", "30"]
    assert ds.interactions.rating.tolist() == [4.0, 3.5, 5.0] and ds.interactions.timestamp.tolist() == [964982703, 964982224, 964983815]
    assert ds.items.title == ["Heat (1995)", "Made Up Film (2003) ", "Untitled"]  # titles keep their year
    assert ds.items.year.tolist() == [1995, 2003, 0]
    assert ds.genre_names == ["Action", "Crime", "Drama"]  # "(no genres listed)" is no genre
    assert ds.items.genres == [(0, 1), (), (2,)]
    assert "data.table.columns not set; detected from the header: user='userId', item='movieId'" in caplog.text
    assert "data.table.item_columns not set; detected from the header: item='movieId', title='title', genres='genres', year=None" in caplog.text

    implicit = load_table(TableConfig(path=_write(tmp_path / "implicit.csv", "user,item\na,x\n")))
    assert implicit.interactions.rating.tolist() == [1.0] and implicit.interactions.timestamp.tolist() == [0]
    with pytest.raises(ValueError) as e:
        load_table(TableConfig(path=_write(tmp_path / "odd.csv", "who,what\na,x\n")))
    assert "data.table.columns.user" in str(e.value) and "data.table.columns.item" in str(e.value)
    assert "data.table.columns is not set" in str(e.value)


@pytest.mark.parametrize(
    "title, year",
    [
        ("Heat (1995)", 1995),
        ("Heat (1995) ", 1995),  # trailing spaces
        ("Heat (1995)\t", 1995),
        ("City of Lost Children, The (Cit\u00e9 des enfants perdus, La) (1995)", 1995),  # the last parenthesis
        ("2001: A Space Odyssey (1968)", 1968),  # a number elsewhere in the title is no year
        ("Fawlty Towers (1975-1979)", 1975),  # a series' range: its first year
        ("Some Series (2006\u20132007)", 2006),  # en dash
        ("Heat (1995) (director's cut)", 0),  # the year must end the title
        ("Heat", 0),
        ("Room (101)", 0),
        ("Agent (0007)", 0),  # four digits, but no plausible year
        ("", 0),
        (None, 0),
    ],
)
def test_year_from_title(title, year):
    from features.tabular import year_from_title

    assert year_from_title(title) == year


def test_year_column_wins_and_blank_years_come_from_the_title(tmp_path):
    events = _write(tmp_path / "e.csv", "user_id,item_id,rating,timestamp\na,x,4,10\n")
    items = _write(
        tmp_path / "items.csv",
        'item_id,title,genres,year\nx,"Odd, The (1990)",Drama,2001\ny,"Odd, The (1990)",Drama,\nz,Plain,Drama,\n',
    )
    ds = load_table(TableConfig(path=events, items_path=items))
    assert ds.items.year.tolist() == [2001, 1990, 0]
    no_title = load_table(TableConfig(path=events, items_path=items, item_columns=ItemColumnMap(title=None)))
    assert no_title.items.year.tolist() == [2001, 0, 0] and no_title.items.title == ["x", "y", "z"]


UNKNOWN_EVENTS = (
    "user_id,item_id,rating,timestamp\n"
    "a,x,4,10\n"  # line 2
    "a,gone,4,11\n"  # line 3: not in the items file
    "b,y,oops,12\n"  # line 4: malformed
    "b,gone,3,13\n"  # line 5: unknown again (same item)
    "c,lost,bad,14\n"  # line 6: malformed AND unknown: one bad row, reported as malformed
    "c,other,5,15\n"  # line 7: unknown
    "d,y,5,16\n"  # line 8
)


def test_unknown_items_follow_on_bad_row(tmp_path, caplog):
    events = _write(tmp_path / "events.csv", UNKNOWN_EVENTS)
    items = _write(tmp_path / "items.csv", "item_id,title,genres,year\nx,X,Drama,1999\ny,Y,Comedy,2000\n")
    cfg = TableConfig(path=events, items_path=items)
    with pytest.raises(DataFormatError) as e:
        load_table(cfg)
    assert e.value.file == events and e.value.line == 3  # the first bad row in file order
    assert "item 'gone' is not in the items file" in e.value.message and "data.on_bad_row: skip" in e.value.message
    with caplog.at_level("WARNING", logger="features.loaders"):
        ds = load_table(cfg, on_bad_row="skip")
    assert ds.skipped_rows == 5  # lines 3, 5, 7 (unknown items) + 4, 6 (malformed)
    assert ds.user_vocab.ids == ["a", "d"] and ds.item_vocab.ids == ["x", "y"]
    assert ds.item_vocab.decode(ds.interactions.item) == ["x", "y"]
    assert "skipped 2 malformed row(s); first at line 4" in caplog.text
    assert "skipped 3 row(s) whose item is not in the items file" in caplog.text
    assert "2 distinct item(s); first at line 3" in caplog.text
    # a malformed row before any unknown item is the one reported under "error"
    early = _write(tmp_path / "early.csv", "user_id,item_id,rating,timestamp\na,x,nope,10\na,gone,4,11\n")
    with pytest.raises(DataFormatError) as e:
        load_table(TableConfig(path=early, items_path=items))
    assert e.value.line == 2 and "rating" in e.value.message


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
