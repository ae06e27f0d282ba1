"""One entry point from a DataConfig to a Dataset, so training and serving never branch on the source."""
from __future__ import annotations

from features.config import DataConfig
from features.schema import Dataset


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the configured source (synthetic, MovieLens-100k or a generic table)."""
    # Imports are local so a source's dependencies are only touched when it is used.
    if cfg.source == "synthetic":
        from features.synthetic import generate

        return generate(cfg.synthetic)
    if cfg.source == "movielens":
        from features.movielens import load_ml100k

        return load_ml100k(cfg.path, on_bad_row=cfg.on_bad_row)
    if cfg.source == "table":
        from features.tabular import load_table

        assert cfg.table is not None  # enforced by DataConfig's validator
        return load_table(cfg.table, on_bad_row=cfg.on_bad_row)
    raise ValueError(f"unknown data source {cfg.source!r}")
