"""Serving settings. `configs/serve.yaml` is a Ray Serve config file (so `serve run` takes
it as is); `trustrec serve` reads the same file: http_options + the application's args."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class AppArgs(BaseModel):
    """The `args` of the trustrec application, validated (a typo fails with its name)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model_uri: str = "models:/trustrec@champion"
    tracking_uri: str = "sqlite:///mlflow.db"
    store_url: str | None = "sqlite:///data/features.db"
    force_cpu: bool = False
    diversity_lambda: float = Field(1.0, ge=0, le=1)  # MMR lambda when a request names none; 1 = plain ranking
    max_k: int = Field(100, gt=0)


class HttpOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)


def load_serve_config(path: str | Path) -> tuple[HttpOptions, AppArgs, dict[str, Any]]:
    """(http options, app args, the raw application entry) from a Ray Serve config file."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    apps = raw.get("applications") or [{}]
    app = next((a for a in apps if a.get("name") == "trustrec"), apps[0])
    try:
        return HttpOptions.model_validate(raw.get("http_options") or {}), AppArgs.model_validate(app.get("args") or {}), app
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{path}: {bad}") from None
