"""The end-to-end run behind `trustrec train`: data -> split -> fit -> test -> export ->
feature store -> MLflow (params, step metrics, artifacts, registry alias)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from features.datasets import apply_erasures, data_provenance, load_dataset
from features.schema import Dataset, Interactions
from features.splits import Split, split
from training import beyond, blend, evaluation
from training.config import ConfigError, TrainConfig
from features.content import year_edges
from training.data import CSR, Context, rated_csr
from training.export import cold_user_ranking, write_artifacts, write_ease_artifacts
from training.model import TowerSpec, TwoTower
from training.privacy.ledger import check_before_training, record_release
from training.task import RetrievalTask
from training.tracking import Tracker, git_sha, run_name
from training.trainer import FitResult, Trainer, pick_device, seed_everything

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything derived from the data config, shared by train / evaluate / export."""

    dataset: Dataset
    split: Split
    train: CSR  # what the model fits on
    val: CSR  # early-stopping truth (history = train)
    seen: CSR  # train + val: the history at test time, excluded from test rankings
    test: CSR
    erasures: dict[str, int] | None = None  # features.datasets.apply_erasures: what the store's tombstones removed

    def provenance(self) -> dict[str, Any]:
        """The manifest's `provenance.data`: snapshot hash, sizes and erasures applied (no ids)."""
        return {**data_provenance(self.dataset), **(self.erasures or {"erasures_applied": 0, "tombstones": 0})}

    @property
    def seen_interactions(self) -> Interactions:
        return Interactions.concat([self.split.train, self.split.val])


def prepare(cfg: TrainConfig) -> Prepared:
    # erased users never train, validate or test, whatever the source (synthetic and files included)
    dataset, erasures = apply_erasures(load_dataset(cfg.data), cfg.store.url, cfg.data.store.consent)
    parts = split(dataset.interactions, cfg.split)
    if cfg.privacy.audit_holdout > 0:  # the privacy audit's non-members: never trained on, validated or tested
        from training.privacy.holdout import holdout_mask, without_users

        parts = without_users(parts, holdout_mask(dataset.n_users, cfg.privacy.audit_holdout, cfg.privacy.audit_seed))
    if parts.val is None or len(parts.val) == 0:
        raise ConfigError("split.val_fraction: must be > 0 (validation drives early stopping)")
    csr = lambda rows: rated_csr(rows, dataset.n_users)  # noqa: E731
    seen = csr(Interactions.concat([parts.train, parts.val]))
    return Prepared(dataset, parts, csr(parts.train), csr(parts.val), seen, csr(parts.test), erasures)


def context(cfg: TrainConfig, dataset: Dataset) -> Context:
    return Context.from_dataset(dataset, cfg.model.title_buckets, cfg.model.rating_weighted, cfg.model.year_buckets)


def build_model(cfg: TrainConfig, dataset: Dataset, ctx: Context, device: torch.device) -> TwoTower:
    m = cfg.model
    spec = TowerSpec(
        n_users=dataset.n_users,
        n_items=dataset.n_items,
        n_genres=len(dataset.genre_names),
        embedding_dim=m.embedding_dim,
        hidden_dim=m.hidden_dim,
        output_dim=m.output_dim,
        hidden_layers=m.hidden_layers,
        use_user_id=m.use_user_id,
        use_genres=m.use_genres,
        temperature=m.temperature,
        use_content=m.use_content,
        use_title=m.use_title,
        use_demographics=m.use_demographics,
        use_stated=m.use_stated,
        n_gender=len(ctx.users.gender_vocab) + 1,
        n_occupation=len(ctx.users.occupation_vocab) + 1,
        n_year=len(year_edges(m.year_buckets)) + 2,
        n_title=m.title_buckets,
        item_bias=m.item_bias,
    )
    return TwoTower(spec, device=device)


def item_counts(csr: CSR, n_items: int) -> np.ndarray:
    """Training users per item (float64: the task takes logs of it)."""
    return evaluation.popularity_scores(csr[:2], n_items).astype(np.float64)


def popularity_metrics(data: Prepared, k: int) -> dict[str, float]:
    counts = evaluation.popularity_scores(data.seen[:2], data.dataset.n_items)
    users = np.flatnonzero(np.diff(data.test[0]) > 0)
    return evaluation.evaluate_scores(lambda b: np.broadcast_to(counts, (len(b), len(counts))), users, data.seen[:2], data.test[:2], data.dataset.n_items, k=k)


def below_popularity(metrics: dict[str, float], k: int, dp_sgd: bool = False) -> str | None:
    """The warning of a run whose test NDCG@k is below the popularity list's on the same split: a model
    that ranks worse than recommending the most popular items (its training loss does not show it)."""
    ndcg, pop = metrics.get(f"test/ndcg_at_{k}"), metrics.get(f"baseline/popularity/ndcg_at_{k}")
    if ndcg is None or pop is None or not ndcg < pop:
        return None
    hint = (" With DP-SGD, a sample rate (trainer.batch_size / users) far below 0.2 can drift every item vector to one direction "
            "(configs/two_tower_ml1m_dp.yaml measured it)." if dp_sgd else "")  # fmt: skip
    return f"test NDCG@{k} {ndcg:.4f} is below the popularity list's {pop:.4f}: this model ranks worse than the most popular items.{hint}"


def beyond_metrics(topk: np.ndarray, users: np.ndarray, item_vec: np.ndarray, data: Prepared, k: int) -> dict[str, float]:
    """Beyond-accuracy and fairness figures of the test lists (`beyond/*`)."""
    ds = data.dataset
    groups = {"gender": np.array([g or "unknown" for g in ds.users.gender]), "age": beyond.age_bucket(ds.users.age)}
    report = beyond.beyond_accuracy_report(
        topk, users, data.seen[:2], data.test[:2], k, item_counts(data.seen, ds.n_items),
        beyond.genres_multi_hot(ds.items.genres, len(ds.genre_names)), item_vec, groups,
    )  # fmt: skip
    return {f"beyond/{name}": v for name, v in report.items() if np.isfinite(v)}


def fit_model(cfg: TrainConfig, model: TwoTower, task: RetrievalTask, data: Prepared, ctx: Context,
              device: torch.device, tracker: Tracker, resume: bool = False) -> FitResult:
    """Fit `model` in place the way `privacy.mode` asks; every mode returns a FitResult."""
    if cfg.privacy.mode == "dp":
        from training.privacy.dp import fit_dp

        return fit_dp(cfg, model, task, data, ctx, device, tracker)
    if cfg.privacy.mode == "federated":
        from training.federated.fit import fit_federated

        return fit_federated(cfg, model, task, data, ctx, device, tracker)
    m = cfg.model
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = Trainer(
        model, task, cfg.trainer, cfg.task.history_dropout, m.user_id_dropout, device,
        m.demographics_dropout, m.stated_dropout, on_epoch=lambda e, metrics: tracker.log_metrics(metrics, step=e),
    )  # fmt: skip
    fit = trainer.fit(data.train, data.train, data.val, ctx, resume=resume)
    if cfg.blend.ease:  # chosen now, with the model that has not seen validation; its time is training time
        start = time.perf_counter()
        fit.blend = choose_blend(cfg, model, task, data, ctx, device)
        fit.blend["seconds"] = time.perf_counter() - start
        fit.seconds += fit.blend["seconds"]
    if not cfg.trainer.refit:
        return fit
    return refit(cfg, model, task, data, ctx, device, tracker, fit, init, resume)


def refit(cfg: TrainConfig, model: TwoTower, task: RetrievalTask, data: Prepared, ctx: Context, device: torch.device,
          tracker: Tracker, fit: FitResult, init: dict[str, torch.Tensor], resume: bool = False) -> FitResult:
    """Retrain from the same initial weights on train + val for the epoch count validation chose
    (`trainer.refit`): validation picks the epochs, then the model sees all of the 75 % share the
    peers are refitted on too. The returned FitResult keeps the selection run's validation history."""
    m = cfg.model
    model.load_state_dict(init)
    task.set_item_counts(item_counts(data.seen, data.dataset.n_items))
    tcfg = cfg.trainer.model_copy(update={"checkpoint_dir": str(Path(cfg.trainer.checkpoint_dir) / "refit")})
    trainer = Trainer(
        model, task, tcfg, cfg.task.history_dropout, m.user_id_dropout, device, m.demographics_dropout, m.stated_dropout,
        on_epoch=lambda e, metrics: tracker.log_metrics({f"refit/{k}": v for k, v in metrics.items()}, step=e),
    )  # fmt: skip
    again = trainer.fit(data.seen, None, None, ctx, resume=resume, epochs=max(fit.best_epoch, 1))
    log.info("refit on train+val for %d epochs (%.1fs)", again.epochs_run, again.seconds)
    return FitResult(fit.best_epoch, fit.best_metric, fit.epochs_run, fit.history, fit.seconds + again.seconds, fit.privacy, fit.blend)


def choose_blend(cfg: TrainConfig, model: TwoTower, task: RetrievalTask, data: Prepared, ctx: Context, device: torch.device) -> dict[str, float]:
    """blend.ease's (two-tower weight, EASE lambda) with the best validation NDCG (training/blend.py)."""
    users = np.flatnonzero(np.diff(data.val[0]) > 0)
    user_vec = task.user_embeddings(model, ctx, users, data.train, device).float().cpu().numpy()
    item_vec = task.item_embeddings(model, ctx, device).float().cpu().numpy()
    a, lam, alpha, ndcg = blend.choose(cfg.blend.lambdas, cfg.blend.weights, task.k, user_vec, item_vec, data.train, data.val, users, cfg.blend.head_items,
                                       cfg.blend.rank, genres=blend_genres(cfg, data), genre_weights=cfg.blend.genre_weights)  # fmt: skip
    return {"weight": a, "lambda": lam, "genre_weight": alpha, f"val_ndcg@{task.k}": ndcg}


def blend_genres(cfg: TrainConfig, data: Prepared) -> sp.csr_matrix | None:
    """The item x genre matrix for the blend's collective EASE, None where blend.genre_weights is [0]
    or the data has no genres."""
    if not any(cfg.blend.genre_weights):
        return None
    return blend.genre_matrix(data.dataset.items.genres, len(data.dataset.genre_names))


def blended_topk(fitted: blend.EaseBlend, task: RetrievalTask, model: TwoTower, ctx: Context, data: Prepared, item_vec: np.ndarray,
                 users: np.ndarray, device: torch.device, batch_size: int | None = None) -> np.ndarray:
    """Test lists of the blend, scored exactly as served: blended user vectors · blended item vectors,
    in blocks of ~blend.SCORE_BLOCK scores."""
    items = fitted.item_vectors(item_vec)
    batch_size = batch_size or blend.block_rows(len(item_vec))
    out = [np.zeros((0, task.k), np.int64)]
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        tower = task.user_embeddings(model, ctx, batch, data.seen, device).float().cpu().numpy()
        scores = fitted.user_vectors(tower, blend.binary_matrix(data.seen, batch, len(item_vec))) @ items.T
        out.append(evaluation.topk_from_scores(scores, task.k, exclude=data.seen[:2], exclude_rows=batch))
    return np.concatenate(out)


@dataclass
class RunResult:
    run_id: str | None
    model_version: str | None
    artifact_dir: Path
    metrics: dict[str, float]
    fit: FitResult
    manifest: dict[str, Any]
    warnings: list[str] = field(default_factory=list)  # what the CLI repeats under its metrics table (e.g. below popularity)


def train(cfg: TrainConfig, resume: bool = False, tracker: Tracker | None = None) -> RunResult:
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    device = pick_device(cfg.trainer.device)
    if tracker is None:  # `trustrec tune` passes its own, so that each trial logs as a child run; made first: a
        # tracking store that cannot take the run (tracking.artifact_location) fails before any data or search work
        tracker = Tracker(cfg.tracking.enabled, cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
    data = prepare(cfg)
    ds = data.dataset
    log.info("dataset %s: %d users, %d items, %d interactions; device %s", ds.name, ds.n_users, ds.n_items, len(ds.interactions), device)
    check_before_training(cfg, data)  # a private run past privacy.total_epsilon stops here, before any MLflow run
    searched = None
    if cfg.search.enabled:  # the winner's settings become the run's config: its MLflow params show what trained
        from training.search import search
        from training.tune import trial_config

        searched = search(cfg, data, device)
        cfg = trial_config(cfg, searched.chosen)

    data_prov = data.provenance()  # snapshot hash + sizes of the training data + erasures applied, no ids
    tags = {"model": cfg.model.kind, "dataset": ds.name, "split": cfg.split.protocol, "git_sha": git_sha(), "device": device.type, "data_snapshot": data_prov["snapshot"],
            "erasures_applied": str(data_prov["erasures_applied"])}  # fmt: skip
    # seen (train + val): what the model learned from and was selected on; test: what it is judged on
    tracker.start_training(cfg, ds, tags, data.seen_interactions, data.split.test, data_prov["snapshot"])
    try:
        seed_everything(cfg.trainer.seed)  # the initial weights draw from torch's RNG: same seed, same run
        if cfg.privacy.mode == "dp" and cfg.privacy.mechanism == "gram":  # DP-EASE: a Gram release, no torch tower
            from training.privacy.gram import fit_gram

            gram_model, fit = fit_gram(cfg, data, tracker)
            result = finish(cfg, gram_model, None, data, None, fit, tracker, device, {"data": data_prov})
        elif cfg.privacy.mode == "federated" and cfg.federated.strategy == "gram":  # federated EASE: summed Gram parts, no tower
            from training.federated.gram import fit_federated_gram

            gram_model, fit = fit_federated_gram(cfg, data, context(cfg, ds), tracker)
            result = finish(cfg, gram_model, None, data, None, fit, tracker, device, {"data": data_prov})
        else:
            ctx = context(cfg, ds)
            model = build_model(cfg, ds, ctx, device)
            task = RetrievalTask(cfg.task, item_counts(data.train, ds.n_items), cfg.model.item_id_dropout)
            fit = fit_model(cfg, model, task, data, ctx, device, tracker, resume)
            artifacts = None
            if searched is not None:  # its time is training time, as the blend's
                fit.seconds += searched.seconds
                fit.search = searched.report()
                tracker.log_params({f"search.chosen.{k}": v for k, v in searched.chosen.items()} | {"search.seconds": round(searched.seconds, 1)})
                artifacts = {"search.json": fit.search}
            result = finish(cfg, model, task, data, ctx, fit, tracker, device, {"data": data_prov}, artifacts)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the CLI: MLflow's status for a run its user stopped
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return result


def finish(cfg: TrainConfig, model: TwoTower, task: RetrievalTask, data: Prepared, ctx: Context, fit: FitResult, tracker: Tracker,
           device: torch.device, provenance: dict[str, Any] | None = None, artifacts: dict[str, Any] | None = None) -> RunResult:
    """After any fit (central, private, federated, distributed rank 0): test -> export -> feature
    store -> MLflow. `provenance` adds to the manifest's provenance, `artifacts` are extra JSON files for the run.
    A Gram model (training.privacy.gram.GramEase: DP-EASE, privacy.mechanism gram, or federated EASE,
    federated.strategy gram) comes as `model` with task and ctx None."""
    ds = data.dataset
    users = np.flatnonzero(np.diff(data.test[0]) > 0)
    gram = model if getattr(model, "kind", None) in ("ease_dp", "ease_federated") else None
    k = cfg.task.eval_k if task is None else task.k
    item_vec = gram.item_vectors() if gram is not None else task.item_embeddings(model, ctx, device).float().cpu().numpy()
    fitted = None
    if gram is not None:  # scored as served: x_u P · Q over the train + val history
        topk = gram.topk(data.seen, users, k)
    elif fit.blend is not None:  # EASE refitted on train + val with the chosen (weight, lambda): training time too
        start = time.perf_counter()
        fitted = blend.fit(fit.blend["weight"], fit.blend["lambda"], cfg.blend.rank, data.seen, item_vec, cfg.blend.head_items,
                           blend_genres(cfg, data), fit.blend.get("genre_weight", 0.0))  # fmt: skip
        spent = time.perf_counter() - start
        fit.blend["seconds"] = fit.blend.get("seconds", 0.0) + spent  # blend/seconds: choosing + refitting
        fit.seconds += spent  # train/seconds and RunResult.fit.seconds count the blend
        topk = blended_topk(fitted, task, model, ctx, data, item_vec, users, device)
    else:
        topk = task.topk(model, ctx, data.seen, users, device)  # the test lists, scored once
    # published names (evaluation.metric_name: `test/ndcg_at_10`) for the CLI, manifest, MLflow and /v1/model alike
    metrics = evaluation.Metrics({f"test/{name}": v for name, v in evaluation.ranking_metrics(topk, data.test[:2], users, k, ds.n_items).items()})
    metrics.update(beyond_metrics(topk, users, item_vec if gram is not None else item_vec[:, : model.spec.output_dim], data, k))  # likeness: no bias coordinate
    metrics.update({f"baseline/popularity/{name}": v for name, v in popularity_metrics(data, k).items()})
    metrics.update({"train/best_epoch": float(fit.best_epoch), "train/epochs_run": float(fit.epochs_run), "train/seconds": fit.seconds})
    metrics.update({f"blend/{name}": float(v) for name, v in (fit.blend or {}).items()})
    log.info("test %s", " ".join(f"{name}={v:.4f}" for name, v in metrics.items() if not name.startswith("beyond/")))
    warnings = []
    if warning := below_popularity(metrics, k, dp_sgd=cfg.privacy.mode == "dp" and gram is None):
        warnings.append(warning)
        log.warning(warning)
        tracker.set_tags({"quality.warning": warning})  # where people compare runs in the MLflow UI
    if fit.privacy and "epsilon" in fit.privacy and not cfg.tracking.run_name:
        if gram is not None:
            from training.privacy.gram import gram_run_name

            tracker.rename(gram_run_name(cfg, ds.name, fit.privacy))
        else:
            tracker.rename(run_name(cfg, ds.name, fit.privacy))  # the ε this run reached, where the config gave none

    if cfg.privacy.mode == "none":
        popular = ds.item_vocab.decode(np.argsort(-item_counts(data.seen, ds.n_items), kind="stable")[: cfg.export.popularity_top_n])
    elif gram is not None:  # the released Gram's row sums (noisy item user counts): post-processing of the release
        popular = ds.item_vocab.decode(gram.popularity(cfg.export.popularity_top_n))
    else:  # raw counts would leave the privacy guarantee: the private model's own cold-user ranking instead
        popular = ds.item_vocab.decode(cold_user_ranking(model, item_vec, cfg.export.popularity_top_n))
    # the ledger records a private release before anything is published (refusing past the budget)
    snapshot = (provenance or {}).get("data", {}).get("snapshot") or data.provenance()["snapshot"]
    ledger = record_release(cfg, data, fit.privacy, snapshot, tracker.run_id)
    privacy = {**fit.privacy, "ledger": ledger} if ledger else fit.privacy
    if ledger:
        metrics.update({"privacy/cumulative_epsilon": ledger["cumulative_epsilon"], "privacy/cumulative_delta": ledger["cumulative_delta"]})
    prov = {"privacy": privacy or {"mode": "none"}, "run_id": tracker.run_id, "git_sha": git_sha(), "dataset": ds.name,
            "split": cfg.split.protocol, "config_digest": cfg.digest(), **(provenance or {})}  # fmt: skip
    if gram is not None:
        manifest = write_ease_artifacts(gram, ds, data.seen, cfg.export.output_dir, metrics, prov, popular, cfg.export.parity_atol)
    else:
        manifest = write_artifacts(model, ctx, item_vec, ds, data.seen, cfg.export.output_dir, metrics, prov, popular, cfg.export.parity_atol, fitted)
    metrics.update(manifest["parity"])

    if cfg.store.load:
        from features.store import FeatureStore

        store = FeatureStore(cfg.store.url)
        store.load_dataset(ds, data.seen_interactions)
        store.close()

    tracker.log_metrics(metrics)
    tracker.log_dict(cfg.model_dump(mode="json"), "config.yaml")
    tracker.log_dict(metrics, "metrics.json")
    tracker.log_dict([evaluation.Metrics(row) for row in fit.history], "history.json")
    for name, content in (artifacts or {}).items():
        tracker.log_dict(content, name)
    tracker.log_artifacts(cfg.export.output_dir, "bundle")
    version = tracker.register(cfg.export.output_dir, cfg.tracking.registered_model, cfg.tracking.alias) if cfg.tracking.register_model else None
    return RunResult(tracker.run_id, version, Path(cfg.export.output_dir), metrics, fit, manifest, warnings)
