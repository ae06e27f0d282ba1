"""MLflow tracking: params = flattened config, per-epoch step metrics, final test metrics,
tags, artifacts, and registration with an alias (MLflow 3: aliases, not stages)."""
from __future__ import annotations

import json
import re
import logging
import subprocess
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PYFUNC_CODE = Path(__file__).resolve().parents[1] / "serving" / "mlflow_pyfunc.py"


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mlflow_key(name: str) -> str:
    """MLflow keys allow alphanumerics and `_ - . space / :` only: `ndcg@10` -> `ndcg_at_10`,
    `gender=F` -> `gender_F`, age `<18` -> `lt18`, `56+` -> `56plus`."""
    name = name.replace("@", "_at_").replace("<", "lt").replace("+", "plus")
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", name)


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a sqlite store, keep artifacts beside the database (`<db dir>/mlartifacts`) instead of
    MLflow's default `./mlruns` under whatever the current directory happens to be."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or ":memory:" in tracking_uri:
        return None
    return (Path(tracking_uri[len(prefix) :]).resolve().parent / "mlartifacts").as_uri()


def promote(run_id: str, alias: str, model_name: str, tracking_uri: str) -> str:
    """Point `alias` of `model_name` at the newest version registered from run `run_id`; returns that version."""
    if not re.fullmatch(r"[0-9a-f]{32}", run_id):  # MLflow run ids; also keeps the search filter literal
        raise ValueError(f"run id {run_id!r}: want 32 hex digits, as `trustrec train` prints")
    if "'" in model_name:
        raise ValueError(f"model name {model_name!r}: quotes are not allowed")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    if not versions:
        raise ValueError(f"run {run_id} has no registered version of model {model_name!r} in {tracking_uri}")
    version = str(max(int(v.version) for v in versions))
    client.set_registered_model_alias(model_name, alias, version)
    log.info("%s@%s -> version %s (run %s)", model_name, alias, version, run_id)
    return version


class Tracker:
    """Thin wrapper so the pipeline reads the same with tracking on or off."""

    def __init__(self, enabled: bool, tracking_uri: str, experiment: str):
        self.enabled = enabled
        self.run_id: str | None = None
        if enabled:
            import mlflow

            self.mlflow = mlflow
            mlflow.set_tracking_uri(tracking_uri)
            if mlflow.get_experiment_by_name(experiment) is None:
                mlflow.create_experiment(experiment, artifact_location=default_artifact_location(tracking_uri))
            mlflow.set_experiment(experiment)

    def start(self, run_name: str | None, params: dict[str, Any], tags: dict[str, str]) -> None:
        if not self.enabled:
            return
        run = self.mlflow.start_run(run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self.mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            self.mlflow.log_metrics({mlflow_key(k): float(v) for k, v in metrics.items()}, step=step)

    def log_dict(self, obj: Any, name: str) -> None:
        if self.enabled:
            self.mlflow.log_dict(obj, name)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.mlflow.log_artifacts(str(path), artifact_path)

    def register(self, bundle_dir: str | Path, model_name: str, alias: str) -> str | None:
        """Log the bundle as a pyfunc model, register a new version and point `alias` at it."""
        if not self.enabled:
            return None
        info = self.mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"bundle": str(bundle_dir)},
            pip_requirements=["trustrec"],
            registered_model_name=model_name,
        )
        version = str(info.registered_model_version)
        self.mlflow.MlflowClient().set_registered_model_alias(model_name, alias, version)
        log.info("registered %s version %s as @%s", model_name, version, alias)
        return version

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.mlflow.end_run(status=status)


def versions_holding_user(user_id: str, model_name: str, tracking_uri: str) -> list[dict[str, Any]]:
    """Registered versions of `model_name` whose training data held `user_id` (the id is in the
    bundle's user vocabulary, which lists every user of the run's dataset): what an operator must
    retrain or retire after an erasure. Reads each version's run artifact `bundle/user_vocab.json`."""
    if "'" in model_name:
        raise ValueError(f"model name {model_name!r}: quotes are not allowed")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    aliases: dict[str, list[str]] = {}
    try:
        for alias, version in (client.get_registered_model(model_name).aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
    except mlflow.exceptions.MlflowException:
        return []  # no such registered model: nothing was trained on anyone
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in client.search_model_versions(f"name = '{model_name}'"):
            try:
                path = mlflow.artifacts.download_artifacts(run_id=v.run_id, artifact_path="bundle/user_vocab.json", dst_path=f"{tmp}/{v.version}", tracking_uri=tracking_uri)
            except (mlflow.exceptions.MlflowException, OSError):
                found.append({"version": str(v.version), "run_id": v.run_id, "aliases": aliases.get(str(v.version), []), "held_user": None})
                continue  # vocabulary unreadable: listed as unknown, never silently left out
            if str(user_id) in json.loads(Path(path).read_text()).get("ids", []):
                found.append({"version": str(v.version), "run_id": v.run_id, "aliases": aliases.get(str(v.version), []), "held_user": True})
    return sorted(found, key=lambda r: int(r["version"]))
