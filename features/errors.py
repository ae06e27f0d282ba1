"""Errors and the bad-row policy shared by every file loader (MovieLens, tabular).

A malformed row must be reported with the file and 1-based line so a user can open the
file and fix it; alternatively the caller asks to skip such rows, and we count them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

logger = logging.getLogger("features.loaders")


class DataFormatError(ValueError):
    """A malformed row in a data file. `line` is 1-based; in a CSV with a header the header is line 1.

    For Parquet files, which have no lines, `line` is the 1-based row number.
    """

    def __init__(self, file: str | Path, line: int, message: str):
        super().__init__(f"{file}:{line}: {message}")
        self.file, self.line, self.message = str(file), int(line), message


class BadRows:
    """Applies on_bad_row for one file: raise DataFormatError, or skip and count the row."""

    def __init__(self, file: str | Path, on_bad_row: Literal["error", "skip"] = "error"):
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        self.file, self.on_bad_row = str(file), on_bad_row
        self.count = 0
        self._first: str | None = None

    def bad(self, line: int, message: str) -> None:
        """Report one malformed row: raises under 'error', otherwise records it."""
        if self.on_bad_row == "error":
            raise DataFormatError(self.file, line, message)
        self.count += 1
        if self._first is None:
            self._first = f"line {line}: {message}"

    def log(self) -> int:
        """Log a WARNING summary when rows were skipped; returns the number skipped."""
        if self.count:
            logger.warning("%s: skipped %d malformed row(s); first at %s", self.file, self.count, self._first)
        return self.count
