"""MLflow tracking, laid out for comparing runs: a descriptive run name, a few grouped params
(`data.* model.* train.* privacy.*`; the whole config is the run's config.yaml / config_flat.json),
the training and test data as dataset inputs, per-epoch step metrics and final metrics under one
naming (training.evaluation.metric_name), tags, artifacts, and registration with an alias (MLflow 3:
aliases, not stages) that every run shows in its `alias` tag."""
from __future__ import annotations

import hashlib
import json
import re
import logging
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.evaluation import metric_name

if TYPE_CHECKING:
    from features.schema import Dataset, Interactions
    from training.config import TrainConfig

log = logging.getLogger(__name__)

ALIAS_TAG = "alias"  # run tag: the registry aliases its model version holds, comma-separated, or NO_ALIAS
NO_ALIAS = "none"
ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"

PYFUNC_CODE = Path(__file__).resolve().parents[1] / "serving" / "mlflow_pyfunc.py"


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


mlflow_key = metric_name  # the one metric naming (training/evaluation.py); the old name stays importable


# --------------------------------------------------------------------------- what a run page shows
def dataset_label(source: str, dataset_name: str) -> str:
    """The dataset part of a run name: `synthetic`, `ml100k`, `store`, or a table's name."""
    if source in ("synthetic", "store"):
        return source
    return re.sub(r"[^A-Za-z0-9]+", "", dataset_name.rsplit("/", 1)[-1].rsplit(".", 1)[0]).lower() or source


def _eps(value: float) -> str:
    return f"eps{round(float(value), 2):g}"


def privacy_label(cfg: "TrainConfig", privacy: dict[str, Any] | None = None) -> str:
    """`nonprivate`, `dp-eps8` (the target, else the ε the run reached, else its σ), `federated`,
    `federated-dp-eps3.1` (client-level DP: ε is known once the rounds ran, else σ)."""
    p, fed, got = cfg.privacy, cfg.federated, (privacy or {}).get("epsilon")
    if p.mode == "dp":
        if p.target_epsilon is not None:
            return f"dp-{_eps(p.target_epsilon)}"
        return f"dp-{_eps(got)}" if got is not None else f"dp-sigma{p.noise_multiplier:g}"
    if p.mode == "federated":
        if not fed.dp:
            return "federated"
        return f"federated-dp-{_eps(got)}" if got is not None else f"federated-dp-sigma{fed.noise_multiplier:g}"
    return "nonprivate"


def model_kind(cfg: "TrainConfig") -> str:
    """The manifest's model.kind this config trains: `ease_dp` (privacy.mechanism gram), `ease_federated`
    (federated.strategy gram), else model.kind."""
    if cfg.privacy.mode == "dp" and cfg.privacy.mechanism == "gram":
        return "ease_dp"
    if cfg.privacy.mode == "federated" and cfg.federated.strategy == "gram":
        return "ease_federated"
    return cfg.model.kind


def run_name(cfg: "TrainConfig", dataset_name: str, privacy: dict[str, Any] | None = None) -> str:
    """`tracking.run_name` when set, else model-dataset-privacy-seed: `two_tower-ml100k-dp-eps8-s0`."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    parts = (model_kind(cfg), dataset_label(cfg.data.source, dataset_name), privacy_label(cfg, privacy), f"s{cfg.trainer.seed}")
    return "-".join(parts)


def run_params(cfg: "TrainConfig", dataset_name: str) -> dict[str, Any]:
    """The params a run page lists: what tells runs apart, in four groups. Everything else is in
    the run's config.yaml and config_flat.json artifacts (the flattened config is ~120 keys)."""
    d, s, m, t, tr, p, fed = cfg.data, cfg.split, cfg.model, cfg.task, cfg.trainer, cfg.privacy, cfg.federated
    if model_kind(cfg).startswith("ease_"):  # DP-EASE / federated EASE: no towers, no epochs, no optimizer
        gram = {"data.source": d.source, "data.dataset": dataset_name,
                "data.split": s.protocol if s.protocol == "leave_last_n" else f"{s.protocol} by {s.by}, ratio {s.ratio:g}",
                "data.split_seed": s.seed, "model.kind": model_kind(cfg), "model.features": "history",
                "train.seed": tr.seed,  # the release's noise seed
                "train.eval_k": t.eval_k, "privacy.mode": p.mode, "privacy.audit_holdout": p.audit_holdout,
                "privacy.target_epsilon": p.target_epsilon, "privacy.noise_multiplier": p.noise_multiplier, "privacy.delta": p.delta}  # fmt: skip
        if p.mode == "federated":  # the privacy.* keys above are DP-EASE's; a federated Gram reads federated.*
            gram.update({"privacy.target_epsilon": fed.target_epsilon if fed.dp else None, "privacy.noise_multiplier": fed.noise_multiplier if fed.dp else None,
                         "privacy.delta": fed.dp_delta, "privacy.fl_strategy": fed.strategy, "privacy.fl_client_dp": fed.dp,
                         "privacy.fl_partition": fed.partition if fed.partition == "user" else f"silos x{fed.n_silos}", "privacy.fl_fraction_fit": fed.fraction_fit})  # fmt: skip
        return {k: ("" if v is None else v) for k, v in gram.items()}  # fit_gram adds privacy.mechanism and the EASE settings
    switches = {"user_id": m.use_user_id, "genres": m.use_genres, "content": m.use_content, "title": m.use_content and m.use_title,
                "demographics": m.use_demographics, "stated": m.use_stated, "rating_weighted": m.rating_weighted, "item_bias": m.item_bias}  # fmt: skip
    params: dict[str, Any] = {
        "data.source": d.source,
        "data.dataset": dataset_name,
        "data.split": s.protocol if s.protocol == "leave_last_n" else f"{s.protocol} by {s.by}, ratio {s.ratio:g}",
        "data.split_seed": s.seed,
        "model.kind": m.kind,
        "model.features": ",".join(k for k, on in switches.items() if on) or "history",
        "model.embedding_dim": m.embedding_dim,
        "model.hidden_dim": m.hidden_dim,
        "model.hidden_layers": m.hidden_layers,
        "model.output_dim": m.output_dim,
        "model.temperature": m.temperature,
        "model.blend": "ease" if cfg.blend.ease else "none",
        "train.loss": t.loss,
        # a wall budget (trainer.max_seconds) bounds the epochs as the cap does: shown with it, not as a 31st param
        "train.epochs": tr.epochs if tr.max_seconds is None else f"{tr.epochs} (max {tr.max_seconds:g} s)",
        "train.batch_size": tr.batch_size,
        "train.lr": tr.lr,
        "train.lr_schedule": tr.lr_schedule,
        "train.weight_decay": tr.weight_decay,
        "train.patience": tr.patience,
        "train.refit": tr.refit,
        "train.seed": tr.seed,
        "train.eval_k": t.eval_k,
        "privacy.mode": p.mode,
        "privacy.audit_holdout": p.audit_holdout,
    }
    if p.mode == "none":  # the only mode whose fit stops on trainer.patience (DP runs every epoch, federated has its own)
        params["train.min_delta"] = tr.min_delta
    if p.mode == "dp":
        params.update({"privacy.target_epsilon": p.target_epsilon, "privacy.noise_multiplier": p.noise_multiplier,
                       "privacy.delta": p.delta, "privacy.max_grad_norm": p.max_grad_norm, "privacy.accountant": p.accountant})  # fmt: skip
    if p.mode == "federated":
        params.update({"privacy.fl_strategy": fed.strategy, "privacy.fl_partition": fed.partition if fed.partition == "user" else f"silos x{fed.n_silos}",
                       "privacy.fl_rounds": fed.rounds, "privacy.fl_local_epochs": fed.local_epochs, "privacy.fl_secagg": fed.secagg,
                       "privacy.fl_client_dp": f"sigma {fed.noise_multiplier:g}, clip {fed.clipping_norm:g}" if fed.dp else "off"})  # fmt: skip
    return {k: ("" if v is None else v) for k, v in params.items()}


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        blob = part.encode() if isinstance(part, str) else part
        h.update(f"{len(blob)}:".encode())
        h.update(blob)
    return h.hexdigest()[:10]  # MLflow shows ~8-10 characters of a digest


def interactions_digest(snapshot: str, rows: "Interactions") -> str:
    """A digest of exactly these rows of the dataset whose snapshot hash is `snapshot`: a changed,
    added or removed row, or other data behind the same indices, changes it. Hashes only, no ids."""
    order = np.lexsort((rows.rating, rows.timestamp, rows.item, rows.user))
    cols = [np.ascontiguousarray(getattr(rows, c)[order], dtype=dt).tobytes() for c, dt in
            (("user", "<i8"), ("item", "<i8"), ("rating", "<f4"), ("timestamp", "<i8"))]  # fmt: skip
    return _digest(snapshot, *cols)


def dataset_source(cfg: "TrainConfig", dataset_name: str):
    """Where the data came from, naming the dataset and never a store URL (it may carry a password)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    d = cfg.data
    if d.source == "movielens":
        return HTTPDatasetSource(ML100K_URL)
    tags: dict[str, Any] = {"dataset": dataset_name, "source": d.source}
    if d.source == "synthetic":
        tags["generator"] = "features.synthetic.generate"
        tags.update({k: v for k, v in d.synthetic.model_dump().items() if k in ("seed", "n_users", "n_items", "n_genres")})
    elif d.source == "table" and d.table is not None:
        tags["file"] = Path(d.table.path).name
    return CodeDatasetSource(tags)


def dataset_input(cfg: "TrainConfig", dataset: "Dataset", rows: "Interactions", snapshot: str, part: str):
    """An MLflow dataset (metadata only: name, digest, source, schema, profile) for `rows`, the
    `part` of `dataset` a run trained or was tested on. The schema names the columns and the
    profile counts them: no row, no id is logged."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema

    class _Dataset(MetaDataset):
        def __init__(self, profile: dict[str, Any], **kw: Any):
            self._profile = profile
            super().__init__(**kw)

        @property
        def profile(self) -> dict[str, Any]:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    schema = Schema([ColSpec(DataType.string, "user_id"), ColSpec(DataType.string, "item_id"),
                     ColSpec(DataType.float, "rating"), ColSpec(DataType.long, "timestamp")])  # fmt: skip
    profile = {"part": part, "rows": int(len(rows)), "users": int(len(np.unique(rows.user))), "items": int(len(np.unique(rows.item))),
               "dataset_users": dataset.n_users, "dataset_items": dataset.n_items, "split": cfg.split.protocol, "snapshot": snapshot}  # fmt: skip
    return _Dataset(profile, source=dataset_source(cfg, dataset.name), name=dataset.name,
                    digest=interactions_digest(snapshot, rows), schema=schema)  # fmt: skip


def default_artifact_location(tracking_uri: str, configured: str | None = None) -> str | None:
    """Where a new experiment keeps its run artifacts (`tracking.artifact_location`):
    - `configured` (a directory, made absolute, or a URI such as s3://...) when given;
    - a sqlite store: beside the database (`<db dir>/mlartifacts`), not MLflow's default `./mlruns`
      under whatever the current directory happens to be;
    - a tracking server (http, https, databricks): None, the server decides;
    - another database (PostgreSQL, MySQL, ...): a ValueError naming the key. There is no "beside"
      a networked database, and MLflow's ./mlruns of the current directory would scatter artifacts
      over every machine and directory that trains, out of reach of the servers that load them."""
    if configured:
        return configured if re.match(r"^[a-z][a-z0-9+.-]*://", configured) else Path(configured).expanduser().resolve().as_uri()
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix) and ":memory:" not in tracking_uri:
        return (Path(tracking_uri[len(prefix) :]).resolve().parent / "mlartifacts").as_uri()
    scheme = tracking_uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in tracking_uri else ""
    if scheme in ("postgresql", "postgres", "mysql", "mssql"):
        raise ValueError(f"tracking.artifact_location: a {scheme} tracking store has no place for run artifacts; set it to a directory "
                         "or URI every trainer and server can reach (MLflow's default would be ./mlruns of the current directory)")  # fmt: skip
    return None


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
    sync_alias_tags(client, model_name)
    return version


def sync_alias_tags(client, model_name: str) -> dict[str, str]:
    """Rewrite the `alias` tag of every run that registered a version of `model_name` to the
    aliases its versions hold now (`champion`, `candidate,champion`, or `none`), so the runs table
    follows the registry: a promoted run says `champion`, the run it replaced says `none`.
    Returns {run_id: tag} of the runs whose tag changed. Deleted runs are left alone."""
    from mlflow.exceptions import MlflowException

    if "'" in model_name:
        raise ValueError(f"model name {model_name!r}: quotes are not allowed")
    held: dict[str, set[str]] = {}
    for alias, version in (client.get_registered_model(model_name).aliases or {}).items():
        held.setdefault(str(version), set()).add(alias)
    by_run: dict[str, set[str]] = {}
    for v in client.search_model_versions(f"name = '{model_name}'"):
        if v.run_id:  # a version registered from outside a run has no run to tag
            by_run.setdefault(v.run_id, set()).update(held.get(str(v.version), set()))
    changed = {}
    for run_id, aliases in by_run.items():
        value = ",".join(sorted(aliases)) or NO_ALIAS
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "deleted" or run.data.tags.get(ALIAS_TAG) == value:
                continue
            client.set_tag(run_id, ALIAS_TAG, value)
        except MlflowException as e:  # a run of another store, or gone: the registry still moved
            log.warning("run %s: alias tag not updated (%s)", run_id, type(e).__name__)
            continue
        changed[run_id] = value
    return changed


class Tracker:
    """Thin wrapper so the pipeline reads the same with tracking on or off."""

    full_params = False  # True: a run's params are the whole flattened config (tune trials compare by sampled keys)

    def __init__(self, enabled: bool, tracking_uri: str, experiment: str, artifact_location: str | None = None):
        self.enabled = enabled
        self.run_id: str | None = None
        if enabled:
            import mlflow

            self.mlflow = mlflow
            mlflow.set_tracking_uri(tracking_uri)
            if mlflow.get_experiment_by_name(experiment) is None:
                mlflow.create_experiment(experiment, artifact_location=default_artifact_location(tracking_uri, artifact_location))
            mlflow.set_experiment(experiment)

    def start(self, run_name: str | None, params: dict[str, Any], tags: dict[str, str]) -> None:
        if not self.enabled:
            return
        run = self.mlflow.start_run(run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self.mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})

    def start_training(self, cfg: "TrainConfig", dataset: "Dataset", tags: dict[str, str],
                       train_rows: "Interactions | None" = None, test_rows: "Interactions | None" = None,
                       snapshot: str | None = None) -> None:  # fmt: skip
        """Start a training run as the runs table reads it: its name, the grouped params, the
        config as artifacts, and the data it trains on (context `training`) and is tested on
        (`evaluation`) as dataset inputs."""
        if not self.enabled:
            return
        params = cfg.flat() if self.full_params else run_params(cfg, dataset.name)
        self.start(run_name(cfg, dataset.name), params, tags)
        self.log_dict(cfg.flat(), "config_flat.json")
        if train_rows is None:
            return
        if snapshot is None:
            from features.datasets import snapshot_hash

            snapshot = snapshot_hash(dataset)
        try:
            parts = [(train_rows, "training")] + ([(test_rows, "evaluation")] if test_rows is not None and len(test_rows) else [])
            self.mlflow.log_inputs(datasets=[dataset_input(cfg, dataset, rows, snapshot, ctx) for rows, ctx in parts],
                                   contexts=[ctx for _, ctx in parts], tags_list=[None] * len(parts))  # fmt: skip
        except self.mlflow.exceptions.MlflowException as e:  # a store without dataset support: the run goes on
            log.warning("dataset inputs not logged: %s", e)

    def rename(self, name: str) -> None:
        """Set the run's name (a DP / federated run's ε is known once it trained)."""
        if self.enabled and self.run_id:
            self.mlflow.MlflowClient().update_run(self.run_id, name=name)

    def log_params(self, params: dict[str, Any]) -> None:
        """Params known only after the run started (e.g. what `search` chose)."""
        if self.enabled:
            self.mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            self.mlflow.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            self.mlflow.log_metrics({metric_name(k): float(v) for k, v in metrics.items()}, step=step)

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
        client = self.mlflow.MlflowClient()
        client.set_registered_model_alias(model_name, alias, version)
        client.set_tag(self.run_id, "model_version", f"{model_name}/{version}")
        sync_alias_tags(client, model_name)  # this run says `alias=<alias>`; the run that held it before, not any more
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
