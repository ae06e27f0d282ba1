"""Typed configuration for data sources and split protocols.

Every model forbids unknown keys: a mistyped key in a YAML config fails loudly,
naming the key, instead of silently falling back to a default.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Fixed vocabulary the synthetic generator draws genre names from (n_genres takes a prefix).
SYNTHETIC_GENRES: tuple[str, ...] = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
    "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticConfig(_Strict):
    """Knobs of the synthetic generator; the output is a pure function of these values."""

    n_users: int = Field(1000, ge=1)
    n_items: int = Field(800, ge=5)  # every user gets >= 5 distinct items
    n_genres: int = Field(12, ge=3, le=len(SYNTHETIC_GENRES))  # 2 liked + 1 avoided must differ
    n_factors: int = Field(8, ge=1)  # latent taste dimensions beyond genres
    mean_interactions_per_user: float = Field(40.0, ge=5)
    popularity_exponent: float = Field(1.0, ge=0)  # Zipf exponent of the item popularity prior
    taste_strength: float = Field(2.0, ge=0)  # weight of genre taste in the choice logit
    factor_strength: float = Field(1.5, ge=0)  # weight of the latent-factor dot product
    seed: int = 0
    start_timestamp: int = 1_600_000_000  # 2020-09-13 UTC
    span_days: float = Field(365.0, gt=0)


class ColumnMap(_Strict):
    """Source column names of the interaction table; None means the source has no such column."""

    user: str = "user_id"
    item: str = "item_id"
    rating: str | None = "rating"  # None -> implicit feedback, every rating is 1.0
    timestamp: str | None = "timestamp"  # None -> every timestamp is 0


class ItemColumnMap(_Strict):
    """Source column names of the optional items table; None means the column is absent."""

    item: str = "item_id"
    title: str | None = "title"
    genres: str | None = "genres"
    year: str | None = "year"


class TableConfig(_Strict):
    """A generic interaction file (CSV or Parquet, with a header) plus an optional items file."""

    path: str
    format: Literal["auto", "csv", "parquet"] = "auto"  # auto: decided by the file suffix
    delimiter: str = ","  # CSV only
    columns: ColumnMap = ColumnMap()
    items_path: str | None = None
    item_columns: ItemColumnMap = ItemColumnMap()
    genre_sep: str = "|"


class LinesConfig(_Strict):
    """`data.source: lines`: one line per user, `user item item ...` (whitespace-separated, no header,
    no ratings or timestamps: every listed item is a positive), read by features/lines.py."""

    path: str
    # A fixed test part in the same format (a dataset published with its split, e.g. ML-1M implicit's
    # test.txt); `split.protocol: given` then uses it as the test split. null: the split protocols apply.
    test_path: str | None = None
    # An ML-1M `users.dat` (UserID::Gender::Age::Occupation::Zip-code): gender, age and occupation of
    # the user whose id in `path` is UserID - 1 (ML-1M implicit's ids are 0-based). null: no demographics.
    users_path: str | None = None


class ConsentConfig(_Strict):
    """How the feature store reads consent; shared by serving (AppArgs.consent) and store exports."""

    # What a user who never answered counts as, for every purpose (personalization, training,
    # demographics). opt_out keeps what users were already promised when their data was imported
    # (served personalized, used to train) until they say no, and it is what existing stores were
    # loaded under. Use opt_in where the law asks for a prior yes (GDPR Art. 6(1)(a) for profiling
    # and training in most EU deployments): then nobody is personalized or trained on until they agree.
    regime: Literal["opt_in", "opt_out"] = "opt_out"
    # Env var holding the salt of erasure tombstones (hash of the user id; the id is never kept).
    # A salt outside the database means a copy of the store alone cannot test guessed ids against
    # the tombstones. Unset: a random salt is generated once and kept in the store (logged warning).
    salt_env: str = "TRUSTREC_ERASURE_SALT"


class StoreSourceConfig(_Strict):
    """`data.source: store`: train on what the feature store holds, as consent and erasure allow."""

    url: str = "sqlite:///data/features.db"  # the serving store, where consent, events and tombstones live
    consent: ConsentConfig = ConsentConfig()


class DataConfig(_Strict):
    # store: the feature store's consented users (features.consent.export_training_data)
    # lines: `user item item ...` files (data.lines); ml1m-implicit: the lines source on the ML-1M
    # implicit folder (train.txt, test.txt and users.dat, features/lines.py)
    source: Literal["synthetic", "movielens", "ml1m-implicit", "table", "lines", "store"] = "synthetic"
    # The dataset folder of the named sources, None -> their env var, else <repo>/../shared/data/<folder>:
    # movielens: MovieLens-100k ($TRUSTREC_ML100K, ml-100k); ml1m-implicit: ($TRUSTREC_ML1M_IMPLICIT, ml-1m-implicit).
    path: str | None = None
    synthetic: SyntheticConfig = SyntheticConfig()
    table: TableConfig | None = None
    lines: LinesConfig | None = None
    store: StoreSourceConfig = StoreSourceConfig()
    on_bad_row: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _table_needs_table_config(self) -> "DataConfig":
        if self.source == "table" and self.table is None:
            raise ValueError("source='table' needs a 'table' section (at least table.path)")
        if self.source == "lines" and self.lines is None:
            raise ValueError("data.source 'lines' needs a data.lines section (at least data.lines.path)")
        return self


class SplitConfig(_Strict):
    # given: the test part the data ships with (data.lines.test_path, data.source ml1m-implicit);
    # validation is carved from its train part as stratified does (by, val_fraction, seed + 1)
    protocol: Literal["stratified", "leave_last_n", "given"] = "stratified"
    ratio: float = Field(0.75, gt=0, le=1)  # stratified: train share of each group
    by: Literal["item", "user"] = "item"  # stratified: grouping column
    seed: int = 42
    n: int = Field(1, ge=1)  # leave_last_n: most recent rows per user held out
    # stratified, given: share of each group's TRAIN rows carved out as validation (seed + 1);
    # leave_last_n: the next-to-last n per user. 0 -> no validation set.
    val_fraction: float = Field(0.1, ge=0, lt=1)
