"""Data side of trustrec: loaders (synthetic, MovieLens-100k, CSV/Parquet), splits, and the
online feature store. Numpy/pyarrow/pandas/SQLAlchemy/pydantic only; never imports torch."""
