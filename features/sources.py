"""Dataset specs: one string naming a dataset (`--data` of the benchmarks, later the CLI).

    ml100k[:PATH]           MovieLens-100k: PATH, else $TRUSTREC_ML100K, else ../shared/data/ml-100k
    ml1m-implicit[:PATH]    ML-1M implicit (train.txt, test.txt, users.dat): PATH, else
                            $TRUSTREC_ML1M_IMPLICIT, else ../shared/data/ml-1m-implicit; its own split
    table:CONFIG.yaml       a YAML file holding a `data:` block (any source, the keys of `data` in a
                            training config) or a `table:` block (the keys of `data.table`); relative
                            paths in it are relative to the working directory, as in `trustrec train`
    csv:PATH                an interaction CSV with a header (.tsv: tab-separated); the user, item,
                            rating and timestamp columns are detected from it (userId/movieId/rating/
                            timestamp or user_id/item_id/...: features.tabular.detect_columns)
    lines:PATH              `user item item ...` per line (features/lines.py)
    synthetic               the synthetic generator with its defaults

`parse_spec` gives a DataSpec: the `data` block selecting the dataset (DataConfig's keys), the
split protocol that fits it (`given` where the dataset ships its test part, else `stratified`),
and a label safe for file names (`ml100k`, `csv-ml-latest-small-ratings`, `lines-ml-1m-implicit-train`,
`table-mydata`; a file's folder is part of it, so two `ratings.csv` of different datasets do not
share a result file). Bad specs raise SpecError (a ValueError) naming the flag; a named dataset
whose folder is absent raises DatasetNotFound (a FileNotFoundError), which benchmarks report as
skipped. Numpy/pyyaml only.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from features.config import DataConfig

KINDS = ("ml100k", "ml1m-implicit", "table", "csv", "lines", "synthetic")
FORMS = {"ml100k": "ml100k[:PATH]", "ml1m-implicit": "ml1m-implicit[:PATH]", "table": "table:CONFIG.yaml", "csv": "csv:PATH", "lines": "lines:PATH", "synthetic": "synthetic"}
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# name -> (folder under the shared data folder, env var overriding it, files that must be there, data.source)
NAMED = {
    "ml100k": ("ml-100k", "TRUSTREC_ML100K", ("u.data", "u.item", "u.user"), "movielens"),
    "ml1m-implicit": ("ml-1m-implicit", "TRUSTREC_ML1M_IMPLICIT", ("train.txt", "test.txt"), "ml1m-implicit"),
}


class SpecError(ValueError):
    """A dataset spec that cannot be used; the message names the flag and the spec."""


class DatasetNotFound(FileNotFoundError):
    """A named dataset (ml100k, ml1m-implicit) whose folder or files are absent."""


@dataclass(frozen=True)
class DataSpec:
    spec: str  # as given
    kind: str  # one of KINDS
    label: str  # safe in a file name: [a-z0-9._-]
    data: dict[str, Any]  # the `data` block (DataConfig's keys) selecting the dataset
    protocol: str = "stratified"  # the split protocol that fits: "given" when the data ships its test part
    path: Path | None = None  # the folder or file named (None for synthetic)
    notes: list[str] = field(default_factory=list)  # what was detected (csv columns), for reports

    def config(self) -> DataConfig:
        return DataConfig.model_validate(self.data)

    def overrides(self, source: bool = True) -> list[str]:
        """`data.<key>=<value>` assignments for training.config.load_config (`--set` syntax), data.source
        first (left out with source=False: for a config whose own source is already this one). Values
        that YAML would read as something else than the string (a path like `a: b`, `2020`) are quoted."""
        flat = _flatten(self.data, "data.")
        keys = sorted(flat, key=lambda k: k != "data.source")
        return [f"{k}={_yaml_value(flat[k])}" for k in keys if source or k != "data.source"]


def _flatten(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _yaml_value(value: Any) -> str:
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value and "\n" not in value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)  # JSON is YAML: quoted strings, null, true, numbers, lists


def slug(text: str) -> str:
    """Lower-case, only [a-z0-9._-] (runs of anything else and of '-' become one '-'), no leading or
    trailing punctuation, at most 48 characters; "data" when nothing is left."""
    return re.sub(r"(?:[^a-z0-9._]|-)+", "-", text.lower()).strip("-._")[:48].strip("-._") or "data"


def _file_label(kind: str, path: Path) -> str:
    parent = path.resolve().parent.name
    return slug(f"{kind}-{parent}-{path.stem}" if parent else f"{kind}-{path.stem}")


def named_path(name: str, path: str | Path | None = None, shared: str | Path | None = None) -> Path:
    """The folder of named dataset `name`: `path`, else its env var, else <shared>/<folder>.
    DatasetNotFound naming the folder, where it came from and what is missing."""
    folder, env, required, _ = NAMED[name]
    source = "argument" if path else env if os.environ.get(env) else "default location"
    root = Path(path or os.environ.get(env) or Path(shared or SHARED) / folder).expanduser()
    missing = [f for f in required if not (root / f).is_file()]
    if missing:
        raise DatasetNotFound(f"{name} not found at {root} ({source}; missing {', '.join(missing)}); set {env}=/path/to/{folder} or pass --data {name}:PATH")
    return root


def _validate(data: dict[str, Any], where: str) -> DataConfig:
    try:
        return DataConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(['data', *map(str, err['loc'])])}: {'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}" for err in e.errors())
        raise SpecError(f"{where}: {problems}") from None


def _check_files(cfg: DataConfig, where: str) -> None:
    """Every file the data block names exists, else SpecError naming the key."""
    files: dict[str, str | None] = {}
    if cfg.source == "table" and cfg.table is not None:
        files = {"data.table.path": cfg.table.path, "data.table.items_path": cfg.table.items_path}
    elif cfg.source == "lines" and cfg.lines is not None:
        files = {"data.lines.path": cfg.lines.path, "data.lines.test_path": cfg.lines.test_path, "data.lines.users_path": cfg.lines.users_path}
    for key, value in files.items():
        if value and not Path(value).expanduser().is_file():
            raise SpecError(f"{where}: {key}: file not found: {value}")


def _protocol(cfg: DataConfig) -> str:
    fixed = cfg.source == "ml1m-implicit" or (cfg.source == "lines" and cfg.lines is not None and cfg.lines.test_path)
    return "given" if fixed else "stratified"


def _table_spec(spec: str, rest: str, flag: str) -> DataSpec:
    where = f"{flag} {spec}"
    path = Path(rest).expanduser()
    if not path.is_file():
        raise SpecError(f"{where}: file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SpecError(f"{where}: not valid YAML: {e}") from None
    blocks = [b for b in ("data", "table") if isinstance(tree, dict) and b in tree]
    if len(blocks) != 1:
        raise SpecError(f"{where}: expected a mapping with one 'data:' block (a training config's data keys) or one 'table:' block (data.table's keys), found {'both' if blocks else 'neither'}")
    block = tree[blocks[0]]
    if not isinstance(block, dict):
        raise SpecError(f"{where}: '{blocks[0]}:' must be a mapping")
    data = block if blocks[0] == "data" else {"source": "table", "table": block}
    cfg = _validate(data, where)
    _check_files(cfg, where)
    split = tree.get("split") if isinstance(tree.get("split"), dict) else {}
    protocol = split.get("protocol") or _protocol(cfg)
    if protocol not in ("stratified", "leave_last_n", "given"):
        raise SpecError(f"{where}: split.protocol: {protocol!r} is not stratified, leave_last_n or given")
    return DataSpec(spec, "table", slug(f"table-{path.stem}"), data, protocol, path)


def _csv_spec(spec: str, rest: str, flag: str) -> DataSpec:
    from features.tabular import detect_columns  # pyarrow / pandas only when a CSV is named

    where = f"{flag} {spec}"
    path = Path(rest).expanduser()
    if not path.is_file():
        raise SpecError(f"{where}: file not found: {path}")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        columns = detect_columns(str(path), delimiter=delimiter)
    except ValueError as e:
        raise SpecError(f"{where}: {e}; name the columns with table:CONFIG.yaml instead (data.table.columns)") from None
    cols = columns.model_dump()
    data = {"source": "table", "table": {"path": str(path.resolve()), "format": "csv", "delimiter": delimiter, "columns": cols}}
    _validate(data, where)
    note = "columns " + ", ".join(f"{k}={v}" for k, v in cols.items())
    return DataSpec(spec, "csv", _file_label("csv", path), data, "stratified", path, [note])


def parse_spec(spec: str, *, flag: str = "--data", shared: str | Path | None = None) -> DataSpec:
    """A DataSpec from `ml100k[:PATH] | ml1m-implicit[:PATH] | table:CONFIG.yaml | csv:PATH | lines:PATH |
    synthetic` (see the module doc). `shared`: the folder holding ml-100k/ and ml-1m-implicit/
    (default ../shared/data). SpecError naming `flag` for a bad spec; DatasetNotFound for an absent
    named dataset."""
    kind, colon, rest = spec.strip().partition(":")
    if kind not in KINDS:
        raise SpecError(f"{flag}: unknown dataset {kind!r}; expected one of {', '.join(FORMS.values())}")
    if kind == "synthetic":
        if colon:
            raise SpecError(f"{flag} {spec}: synthetic takes no path (change it with --set data.synthetic.<key>=...)")
        return DataSpec(spec, kind, "synthetic", {"source": "synthetic"})
    if kind in NAMED:
        root = named_path(kind, rest or None, shared)
        return DataSpec(spec, kind, kind, {"source": NAMED[kind][3], "path": str(root)}, "given" if kind == "ml1m-implicit" else "stratified", root)
    if not rest:
        raise SpecError(f"{flag} {spec}: needs a path ({FORMS[kind]})")
    if kind == "table":
        return _table_spec(spec, rest, flag)
    if kind == "csv":
        return _csv_spec(spec, rest, flag)
    path = Path(rest).expanduser()
    if not path.is_file():
        raise SpecError(f"{flag} {spec}: file not found: {path}")
    return DataSpec(spec, "lines", _file_label("lines", path), {"source": "lines", "lines": {"path": str(path.resolve())}}, "stratified", path)
