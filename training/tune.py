"""`trustrec tune`: random hyper-parameter search with Ray Tune on the local machine.

Each trial is one `training.pipeline.train` run on a sampled config, logged as an MLflow
*child* run of one parent run per search (tag `mlflow.parentRunId`), so the MLflow UI lists
the trials under the search and compares them side by side. Trials never register a model,
never load the feature store and export only into a temporary directory that is deleted
afterwards; their MLflow runs carry params, per-epoch step metrics and the small JSON
artifacts, not the ONNX bundle.

The objective is a validation metric (default `val/ndcg@10`) taken at the epoch the trainer
keeps (its early-stopping best), never a test metric: the test split is what the tuned config
is judged on afterwards. The best trial's test metrics are reported for information only.

Search space: a mapping of dotted config keys to one sampler each, the same shape in
`DEFAULT_SPACE` and in the optional `--search-space` YAML file:

    model.temperature: {loguniform: [0.03, 0.3]}
    model.embedding_dim: {choice: [32, 64, 128]}
    trainer.batch_size: {randint: [64, 257]}     # upper bound excluded, as in Ray Tune
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from training.config import ConfigError, TrainConfig, load_config
from training.tracking import Tracker, git_sha, mlflow_key

log = logging.getLogger(__name__)

DEFAULT_METRIC = "val/ndcg@10"
DEFAULT_SEED = 0
DEFAULT_STORAGE = "runs/tune"  # Ray Tune's own per-trial results (gitignored)
OBJECTIVE = "objective"  # the key trials report the objective under (metric names hold '/' and '@')

DEFAULT_SPACE: dict[str, dict[str, list[Any]]] = {
    "model.temperature": {"loguniform": [0.03, 0.3]},
    "model.embedding_dim": {"choice": [32, 64, 128]},
    "task.history_dropout": {"uniform": [0.1, 0.5]},
    "trainer.lr": {"loguniform": [1e-3, 1e-2]},
    "model.use_user_id": {"choice": [False, True]},
}

_RANGES = ("uniform", "loguniform", "randint")
SAMPLERS = (*_RANGES, "choice")


# -- search space ----------------------------------------------------------------------------
def load_space(path: str | Path | None) -> dict[str, dict[str, list[Any]]]:
    """The search space from a YAML file (the DEFAULT_SPACE shape), or DEFAULT_SPACE for None."""
    if path is None:
        return {k: {kind: list(args) for kind, args in v.items()} for k, v in DEFAULT_SPACE.items()}
    try:
        space = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"search space file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    check_space(space, str(path))
    return space


def check_space(space: Any, source: str = "search space") -> None:
    """Shape checks: `{dotted.key: {sampler: [args]}}` with sane bounds."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{source}: must be a non-empty mapping of dotted config keys to samplers")
    for key, spec in space.items():
        where = f"{source}: {key}"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: expected one sampler, e.g. {{loguniform: [0.001, 0.01]}} (one of {', '.join(SAMPLERS)})")
        (kind, args), = spec.items()
        if kind not in SAMPLERS:
            raise ConfigError(f"{where}: unknown sampler {kind!r} (one of {', '.join(SAMPLERS)})")
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} needs a list of values")
        if kind in _RANGES:
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise ConfigError(f"{where}: {kind} needs [low, high] numbers")
            low, high = args
            if not low < high:
                raise ConfigError(f"{where}: {kind} needs low < high, got {args}")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise ConfigError(f"{where}: randint needs integers [low, high) (high excluded)")


def validate_space(base: TrainConfig, space: dict[str, dict[str, list[Any]]], source: str = "search space") -> None:
    """Every key must be a config key and every value it can take must make a valid config,
    so a typo or an out-of-range bound fails before Ray starts, naming the key."""
    check_space(space, source)
    known = base.flat()
    for key, spec in space.items():
        if key not in known:
            raise ConfigError(f"{source}: {key}: not a config key (e.g. model.temperature, trainer.lr)")
        (kind, args), = spec.items()
        candidates = args if kind == "choice" else [args[0], args[1] - 1 if kind == "randint" else args[1]]
        for value in candidates:
            try:
                trial_config(base, {key: value})
            except ConfigError as e:
                raise ConfigError(f"{source}: {key}: {kind} value {value!r} is not a valid config value:\n{e}") from None


def ray_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    from ray import tune

    samplers = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    out: dict[str, Any] = {}
    for key, spec in space.items():
        (kind, args), = spec.items()
        out[key] = tune.choice(list(args)) if kind == "choice" else samplers[kind](*args)
    return out


def describe_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, str]:
    """`{key: "loguniform[0.03, 0.3]"}`: how the parent run shows a tuned key in MLflow."""
    return {key: f"{kind}{json.dumps(args)}" for key, spec in space.items() for kind, args in spec.items()}


# -- configs ---------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """numpy scalars (what some Ray samplers return) to Python scalars, for pydantic and YAML."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


def trial_config(base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The config a trial stands for: `base` with the sampled dotted keys set. This, not the
    trial's runtime plumbing (temp dirs, no registry), is what `--out` receives."""
    tree = base.model_dump(mode="json")
    for dotted, value in params.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: {key} is not a section")
        node[leaf] = _plain(value)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid trial config:\n" + "\n".join(lines)) from None


def runtime_config(cfg: TrainConfig, workdir: Path, run_name: str, num_threads: int) -> TrainConfig:
    """What a trial actually runs: no registry, no feature store, bundle and checkpoints in the
    trial's temporary `workdir`, quiet, and `num_threads` torch threads."""
    tree = cfg.model_dump(mode="json")
    tree["tracking"].update(register_model=False, run_name=run_name)
    tree["store"]["load"] = False
    # a trial's bundle is deleted, never released: nothing for the privacy ledger (the search itself is
    # not accounted: tuning a private model on its own users' data spends budget no ledger entry shows)
    tree["privacy"].update(ledger=False, total_epsilon=None)
    tree["export"]["output_dir"] = str(workdir / "bundle")
    tree["trainer"].update(checkpoint_dir=str(workdir / "checkpoints"), progress=False, num_threads=num_threads)
    return TrainConfig.model_validate(tree)


# -- trials ----------------------------------------------------------------------------------
class TrialTracker(Tracker):
    """A trial's MLflow run, nested under the search's parent run. Directory uploads (the
    exported bundle) are skipped: trials are compared, never served. Its params are the whole
    flattened config, so trials compare by the keys the search sampled."""

    full_params = True

    def __init__(self, tracking_uri: str, experiment: str, parent_run_id: str, tags: dict[str, str]):
        super().__init__(True, tracking_uri, experiment)
        self.parent_run_id, self.extra_tags = parent_run_id, tags

    def start(self, run_name: str | None, params: dict[str, Any], tags: dict[str, str]) -> None:
        run = self.mlflow.start_run(run_name=run_name, tags={**tags, **self.extra_tags}, parent_run_id=self.parent_run_id)
        self.run_id = run.info.run_id
        self.mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        log.debug("tune trial: not uploading %s", path)

    def log_final(self, metrics: dict[str, float]) -> None:
        """Metrics known only once `train` has returned (its run is ended by then)."""
        client = self.mlflow.MlflowClient()
        for key, value in metrics.items():
            client.log_metric(self.run_id, mlflow_key(key), float(value))


@dataclass(frozen=True)
class TrialJob:
    """What every trial needs besides its sampled params (shipped once via tune.with_parameters)."""

    base: dict[str, Any]  # the base TrainConfig, model_dump(mode="json")
    cwd: str  # the driver's working directory: relative paths in the config resolve against it
    metric: str
    parent_run_id: str | None
    num_threads: int


def best_epoch_metrics(history: list[dict[str, float]], best_epoch: int) -> dict[str, float]:
    """The validation metrics of the epoch whose weights the trainer kept."""
    for row in history:
        if row["epoch"] == best_epoch:
            return {mlflow_key(k): v for k, v in row.items() if k.startswith("val/")}  # published names, as result.metrics
    raise RuntimeError(f"best epoch {best_epoch} is not in the fit history")


def run_trial(params: dict[str, Any], job: TrialJob) -> None:
    """Ray Tune function trainable: one pipeline.train run, one report at the end."""
    from ray import tune

    from training.pipeline import train

    os.chdir(job.cwd)  # Ray starts trials in their own result dir; the config's paths are relative to ours
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    cfg = trial_config(TrainConfig.model_validate(job.base), params)
    with tempfile.TemporaryDirectory(prefix=f"trustrec-trial-{trial_id}-") as tmp:
        run_cfg = runtime_config(cfg, Path(tmp), f"trial-{trial_id}", job.num_threads)
        t = run_cfg.tracking
        if t.enabled and job.parent_run_id:
            tracker: Tracker = TrialTracker(t.tracking_uri, t.experiment, job.parent_run_id, {"kind": "tune-trial", "tune.trial_id": trial_id})
        else:
            tracker = Tracker(False, t.tracking_uri, t.experiment)
        result = train(run_cfg, tracker=tracker)
    val = best_epoch_metrics(result.fit.history, result.fit.best_epoch)
    if job.metric not in val:
        raise KeyError(f"--metric {job.metric}: not a validation metric of this run (have {', '.join(sorted(val))})")
    best = {f"best/{k}": v for k, v in val.items()}
    if isinstance(tracker, TrialTracker):
        tracker.log_final(best)
    test = {k: v for k, v in result.metrics.items() if k.startswith("test/")}
    tune.report({
        OBJECTIVE: val[job.metric],
        **best,
        **test,  # information only: never used to rank trials
        "best_epoch": result.fit.best_epoch,
        "epochs_run": result.fit.epochs_run,
        "mlflow_run_id": result.run_id or "",
    })


# -- the search ------------------------------------------------------------------------------
@dataclass
class Trial:
    trial_id: str
    params: dict[str, Any]
    objective: float | None
    metrics: dict[str, Any]
    run_id: str | None
    error: str | None = None


@dataclass
class TuneOutcome:
    metric: str
    trials: list[Trial]  # successful ones first, best first; failed ones last
    best: Trial
    best_config: TrainConfig
    out: Path
    parent_run_id: str | None
    space: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    @property
    def failed(self) -> list[Trial]:
        return [t for t in self.trials if t.error is not None]


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_out(config: str | Path | None) -> Path:
    stem = Path(config).stem if config else "train"
    return Path("configs") / f"{stem}_tuned.yaml"


def _header(outcome_metric: str, best: Trial, n_trials: int, n_failed: int, seed: int, command: str, parent_run_id: str | None) -> str:
    m = best.metrics
    test_key = "test/" + outcome_metric.split("/", 1)[1]
    test = m.get(test_key)
    lines = [
        f"# Tuned by `trustrec tune` on {dt.date.today().isoformat()}: best of {n_trials} trials"
        + (f" ({n_failed} failed)" if n_failed else "") + f", random search, seed {seed}.",
        f"# Objective {outcome_metric} (validation, at the early-stopping epoch {m.get('best_epoch')}): {best.objective:.4f}",
        f"# {test_key} of that trial (test split, for information; not used to choose): " + (f"{test:.4f}" if test is not None else "n/a"),
        "# Tuned keys: " + ", ".join(f"{k}={json.dumps(_plain(v))}" for k, v in best.params.items()),
        f"# Command: {command}",
    ]
    if parent_run_id:
        lines.append(f"# MLflow: parent run {parent_run_id}, best trial run {best.run_id}")
    return "\n".join(lines) + "\n"


def tune_base(config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The config every trial starts from: the file with its overrides, and its own in-training
    search (`search.enabled`, configs/two_tower_ease.yaml) off. Left on, each trial would run that
    search and overwrite the keys this one sampled (so a trial's params would not be what it
    trained), inside a search of its own; the tuned config written at the end keeps it off, so
    training it fits exactly the tuned values."""
    base = load_config(config, overrides)
    if base.search.enabled:
        log.warning("%s: search.enabled is turned off in every trial and in the tuned config: `trustrec tune` samples the space itself", config or "the default config")
        base = base.model_copy(update={"search": base.search.model_copy(update={"enabled": False})})
    return base


def run_tune(
    config: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    trials: int = 10,
    space_file: str | Path | None = None,
    out: str | Path | None = None,
    metric: str = DEFAULT_METRIC,
    seed: int = DEFAULT_SEED,
    concurrency: int | None = None,
    storage: str | Path = DEFAULT_STORAGE,
    verbose: int = 1,
    command: str | None = None,
) -> TuneOutcome:
    if trials < 1:
        raise ConfigError("--trials: must be >= 1")
    if not metric.startswith("val/"):
        raise ConfigError(f"--metric {metric}: tune on a validation metric (val/...); choosing on the test split would overfit it")
    metric = mlflow_key(metric)  # the one metric naming: val/ndcg@10 is shown and looked up as val/ndcg_at_10
    base = tune_base(config, overrides)
    space = load_space(space_file)
    validate_space(base, space, str(space_file or "default search space"))
    out_path = Path(out) if out else default_out(config)
    command = command or shlex.join(["trustrec", *sys.argv[1:]])

    from features.datasets import load_dataset

    dataset_name = load_dataset(base.data).name  # also fails fast on a bad data config, before Ray starts

    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    t = base.tracking
    parent = Tracker(t.enabled, t.tracking_uri, t.experiment, t.artifact_location)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{Path(config).stem if config else 'train'}-{stamp}"
    params = {**{k: v for k, v in base.flat().items() if k not in space}, **describe_space(space),
              "tune.trials": trials, "tune.metric": metric, "tune.search": "random", "tune.seed": seed}
    tags = {"kind": "tune", "dataset": dataset_name, "model": base.model.kind, "split": base.split.protocol, "git_sha": git_sha(), "tune.metric": metric}
    parent.start(t.run_name or f"tune-{name}", params, tags)

    started_ray = False
    try:
        parent.log_dict(space, "search_space.json")
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry from a local search
            ray.init(num_cpus=_cpus(), include_dashboard=False, log_to_driver=verbose >= 2, logging_level=logging.WARNING)
            started_ray = True
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        concurrency = max(1, min(concurrency or min(2, cpus), cpus, trials))
        per_trial = max(1, cpus // concurrency)
        gpus = ray.cluster_resources().get("GPU", 0)
        resources = {"cpu": per_trial, "gpu": 1 / concurrency} if gpus and base.trainer.device != "cpu" else {"cpu": per_trial}
        job = TrialJob(base.model_dump(mode="json"), os.getcwd(), metric, parent.run_id, per_trial)
        log.info("tune %s: %d trials, %d at a time, %s per trial; parent run %s", name, trials, concurrency, resources, parent.run_id)

        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(run_trial, job=job), resources),
            param_space=ray_space(space),
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE,
                mode="max",
                num_samples=trials,
                # BasicVariantGenerator is random search; concurrency goes on it, since
                # TuneConfig.max_concurrent_trials is ignored for a SearchAlgorithm like it
                search_alg=BasicVariantGenerator(max_concurrent=concurrency, random_state=seed),
            ),
            run_config=tune.RunConfig(name=name, storage_path=str(Path(storage).resolve()), verbose=verbose),
        )
        grid = tuner.fit()

        done: list[Trial] = []
        failed: list[Trial] = []
        for r in grid:
            m = dict(r.metrics or {})
            trial_id = str(m.get("trial_id") or Path(r.path).name)
            params_ = {k: _plain(v) for k, v in (r.config or {}).items()}
            if r.error is not None or OBJECTIVE not in m:
                failed.append(Trial(trial_id, params_, None, m, m.get("mlflow_run_id") or None, str(r.error or "no result reported")))
            else:
                done.append(Trial(trial_id, params_, float(m[OBJECTIVE]), m, m.get("mlflow_run_id") or None))
        if not done:
            raise RuntimeError(f"all {trials} trials failed; first error:\n{failed[0].error if failed else 'none reported'}")
        done.sort(key=lambda tr: (-tr.objective, tr.trial_id))  # type: ignore[operator]
        best = done[0]
        best_cfg = trial_config(base, best.params)

        out_path.parent.mkdir(parents=True, exist_ok=True)
        header = _header(metric, best, trials, len(failed), seed, command, parent.run_id)
        out_path.write_text(header + yaml.safe_dump(best_cfg.model_dump(mode="json"), sort_keys=False))

        info = {f"best/{k}" if k.startswith("test/") else k: v for k, v in best.metrics.items() if k.startswith(("best/val/", "test/"))}
        parent.log_metrics({**info, "tune/trials_ok": len(done), "tune/trials_failed": len(failed)})
        parent.log_dict(best_cfg.model_dump(mode="json"), "best_config.yaml")
        parent.log_dict([_row(tr, metric) for tr in done + failed], "trials.json")
        if parent.enabled and best.run_id:
            parent.mlflow.set_tag("tune.best_run_id", best.run_id)
    except BaseException:
        parent.end("FAILED")
        raise
    finally:
        if started_ray:
            ray.shutdown()
    parent.end()
    return TuneOutcome(metric, done + failed, best, best_cfg, out_path, parent.run_id, space)


# -- report ----------------------------------------------------------------------------------
def _row(tr: Trial, metric: str) -> dict[str, Any]:
    test_key = "test/" + metric.split("/", 1)[1]
    return {
        "trial": tr.trial_id,
        metric: tr.objective,
        test_key: tr.metrics.get(test_key),
        "best_epoch": tr.metrics.get("best_epoch"),
        **tr.params,
        "mlflow_run_id": tr.run_id,
        "error": tr.error.splitlines()[0] if tr.error else None,
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if not math.isnan(value) else "nan"
    return str(value)


def format_table(outcome: TuneOutcome) -> str:
    """Trials sorted by the objective (best first), failed ones last."""
    rows = [_row(tr, outcome.metric) for tr in outcome.trials]
    cols = ["trial", outcome.metric, "test/" + outcome.metric.split("/", 1)[1], "best_epoch", *outcome.space, "mlflow_run_id"]
    if outcome.failed:
        cols.append("error")
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(row) for row in cells)])
