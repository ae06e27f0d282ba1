"""Run configuration: one pydantic tree, loaded from YAML with `--set a.b=value` overrides.

Every section forbids unknown keys, so a typo fails loudly with its dotted name instead of
silently training with a default.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from features.config import DataConfig, SplitConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    kind: Literal["two_tower", "hybrid"] = "two_tower"  # a label: the switches below make the difference
    embedding_dim: int = Field(64, gt=0)
    hidden_dim: int = Field(128, gt=0)
    output_dim: int = Field(64, gt=0)
    use_user_id: bool = False
    user_id_dropout: float = Field(0.1, ge=0, le=1)
    use_genres: bool = True
    temperature: float = Field(0.05, gt=0)
    # hybrid switches
    use_content: bool = False
    use_demographics: bool = False
    use_stated: bool = False
    rating_weighted: bool = False
    item_id_dropout: float = Field(0.0, ge=0, lt=1)
    demographics_dropout: float = Field(0.2, ge=0, le=1)
    stated_dropout: float = Field(0.5, ge=0, le=1)
    title_buckets: int = Field(1024, gt=0)


class TaskConfig(_Section):
    loss: Literal["auto", "full_softmax", "sampled_softmax"] = "auto"
    full_softmax_max_items: int = Field(50_000, gt=0)
    history_dropout: float = Field(0.3, gt=0, lt=1)
    eval_k: int = Field(10, gt=0)


class TrainerConfig(_Section):
    epochs: int = Field(100, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(10, gt=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    checkpoint_dir: str = "runs/checkpoints"
    num_threads: int | None = Field(None, gt=0)
    progress: bool = True


class TrackingConfig(_Section):
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "trustrec"
    run_name: str | None = None
    register_model: bool = True
    registered_model: str = "trustrec"
    alias: str = "champion"


class ExportConfig(_Section):
    output_dir: str = "artifacts/two_tower"
    parity_atol: float = Field(1e-5, gt=0)
    popularity_top_n: int = Field(100, gt=0)


class StoreConfig(_Section):
    url: str = "sqlite:///data/features.db"
    load: bool = True


class PrivacyConfig(_Section):
    """How the customers behind the training data are protected (issue 4 fills in the knobs)."""

    # none: central training; dp: user-level DP-SGD (Opacus, training/privacy/);
    # federated: Flower simulation, data stays with its client (training/federated/)
    mode: Literal["none", "dp", "federated"] = "none"


class FederatedConfig(_Section):
    """Flower settings, read when privacy.mode is federated."""


class DistributedConfig(_Section):
    """TorchRec sharding across processes, read by `trustrec train --distributed N`."""


class TrainConfig(_Section):
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    trainer: TrainerConfig = TrainerConfig()
    tracking: TrackingConfig = TrackingConfig()
    export: ExportConfig = ExportConfig()
    store: StoreConfig = StoreConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    federated: FederatedConfig = FederatedConfig()
    distributed: DistributedConfig = DistributedConfig()

    def flat(self) -> dict[str, Any]:
        """Dotted-key view for MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A config problem, always naming the dotted key (and the file) at fault."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` in place; the value is parsed as YAML (so 3, 0.1, true, [1,2] work)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in error.errors():
        dotted = ".".join(str(p) for p in e["loc"])
        what = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {dotted}: {what}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None
