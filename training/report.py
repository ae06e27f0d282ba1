"""`trustrec report RUN_ID`: an HTML report of a finished training run.

Fetches the run from MLflow (params, tags, metric histories, its config.yaml and its bundle/),
recomputes on the run's test split with the *exported* model (ONNX Runtime user tower + item
matrix, as `training.offline.evaluate_bundle` and serving score), and writes under the output
dir (default reports/<run_id>/):

- index.html: run summary, key params, metrics (test, popularity baseline, beyond-accuracy,
  MMR lambda curve), the plots, and a "how to read" line per plot;
- training_curves.png, ndcg_by_group.png, popularity_bias.png, lambda_tradeoff.png;
- report.json: every number in the page.

The files are logged back to the same run under `report/`, and so are the recomputed
beyond-accuracy metrics (`beyond/<key>`) and the accuracy-diversity curve
(`mmr/lambda_<lam>/{ndcg_at_10,ild_genre,coverage}`). Logging to a FINISHED run leaves it FINISHED.
"""
from __future__ import annotations

import html
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from training import beyond, evaluation
from training.tracking import mlflow_key

log = logging.getLogger(__name__)

DEFAULT_LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_CANDIDATES = 100  # MMR re-ranks the top-100 retrieved items per user
PLOTS = {
    "training": "training_curves.png",
    "groups": "ndcg_by_group.png",
    "popularity": "popularity_bias.png",
    "tradeoff": "lambda_tradeoff.png",
}
KEY_PARAMS = (  # training.tracking.run_params
    "data.source", "data.dataset", "data.split", "data.split_seed", "model.kind", "model.features", "model.embedding_dim",
    "model.hidden_dim", "model.hidden_layers", "model.output_dim", "model.temperature", "model.blend", "train.loss",
    "train.eval_k", "train.epochs", "train.batch_size", "train.lr", "train.weight_decay", "train.patience", "train.seed",
    "privacy.mode", "privacy.target_epsilon",
)  # fmt: skip
OLD_KEY_PARAMS = (  # runs logged before the grouped params: the flattened config
    "data.source", "model.kind", "model.embedding_dim", "model.hidden_dim", "model.output_dim", "model.temperature",
    "model.use_user_id", "model.use_genres", "model.use_content", "model.use_demographics", "model.use_stated",
    "model.rating_weighted", "task.loss", "task.eval_k", "trainer.epochs", "trainer.batch_size", "trainer.lr",
    "trainer.weight_decay", "trainer.patience", "trainer.seed", "split.protocol", "split.ratio", "split.seed",
)  # fmt: skip
RANKING = ("ndcg", "precision", "recall", "map")


def metric_key(name: str) -> str:
    """The published metric name (training.evaluation.metric_name), as MLflow, the CLI and
    `/v1/model` show it: ndcg@10/age=<18 -> ndcg_at_10/age_lt18, age=56+ -> age_56plus."""
    return evaluation.metric_name(name)


def lambda_label(lam: float) -> str:
    return f"{lam:g}"


def parse_lambdas(text: str | Sequence[float]) -> list[float]:
    """'0,0.25,1' -> [0.0, 0.25, 1.0]: distinct, sorted, each in [0, 1]."""
    raw = [p.strip() for p in text.split(",") if p.strip()] if isinstance(text, str) else list(text)
    try:
        values = sorted({float(v) for v in raw})
    except ValueError:
        raise ValueError(f"--lambdas: expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"--lambdas: expected comma-separated numbers in [0, 1], got {text!r}")
    return values


@dataclass
class Report:
    run_id: str
    out_dir: Path
    html: Path
    plots: dict[str, Path]
    ranking: dict[str, float]  # recomputed from the exported model, published names ("ndcg_at_10"; evaluation.Metrics)
    beyond: dict[str, float]  # training.beyond.beyond_accuracy_report, published names
    mmr: dict[float, dict[str, float]]  # lambda -> {"ndcg_at_10", "ild_genre", "coverage"}
    catalog_deciles: np.ndarray  # share of (train + val) interactions per item-popularity decile
    logged: dict[str, float] = field(default_factory=dict)  # what went to MLflow as metrics


# --------------------------------------------------------------------------- fetch


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def fetch_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"run {run_id!r} not found in {client.tracking_uri}: {e.message}") from None


def load_run_config(client, run_id: str, tmp: Path):
    import yaml

    from training.config import TrainConfig

    try:
        path = Path(client.download_artifacts(run_id, "config.yaml", str(tmp)))
    except Exception as e:  # MlflowException / OSError, depending on the artifact store
        raise FileNotFoundError(f"run {run_id} has no config.yaml artifact ({e})") from None
    try:
        return TrainConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValueError as e:  # pydantic.ValidationError is a ValueError
        raise ValueError(f"run {run_id}: its config.yaml does not validate against the current TrainConfig: {e}") from None


def load_run_bundle(client, run_id: str, tmp: Path) -> Path:
    from bundle.locate import find_bundle

    try:
        local = Path(client.download_artifacts(run_id, "bundle", str(tmp)))
        return find_bundle(local)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise FileNotFoundError(f"run {run_id} has no bundle/ artifact ({e})") from None


def metric_history(client, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a step metric, sorted by step; the last value logged for a step wins
    (a resumed run logs some epochs twice)."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s][1] for s in steps], dtype=np.float64)


# --------------------------------------------------------------------------- recompute


def retrieve_candidates(score_fn, users: np.ndarray, exclude, n_items: int, n_candidates: int, batch_size: int = 1024):
    """(candidates (U, C) int64 best first, -1 padded; their scores (U, C), -inf on padding)."""
    c = min(n_candidates, n_items)
    cand, cand_scores = [], []
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        scores = np.asarray(score_fn(batch), dtype=np.float64)
        top = evaluation.topk_from_scores(scores, c, exclude=exclude, exclude_rows=batch)
        picked = np.take_along_axis(scores, np.where(top >= 0, top, 0), axis=1)
        cand.append(top)
        cand_scores.append(np.where(top >= 0, picked, -np.inf))
    if not cand:
        raise ValueError("no test user has a held-out item; nothing to report")
    return np.concatenate(cand), np.concatenate(cand_scores)


def mmr_lists(cand: np.ndarray, cand_scores: np.ndarray, item_vectors: np.ndarray, k: int, lam: float) -> np.ndarray:
    """(U, k) lists re-ranked by bundle.rerank.mmr (serving's MMR) from each user's candidates, -1 padded."""
    from bundle.rerank import mmr

    out = np.full((len(cand), k), -1, dtype=np.int64)
    for row, (items, scores) in enumerate(zip(cand, cand_scores)):
        valid = items >= 0
        if not valid.any():
            continue
        items, scores = items[valid], scores[valid]
        picked = items[mmr(scores, item_vectors[items], k, lam)]
        out[row, : len(picked)] = picked
    return out


def mmr_curve(cand, cand_scores, item_vectors, lambdas, users, truth, k, n_items, multi_hot) -> dict[float, dict[str, float]]:
    curve = {}
    for lam in lambdas:
        lists = mmr_lists(cand, cand_scores, item_vectors, k, lam)
        curve[lam] = evaluation.Metrics({
            f"ndcg@{k}": evaluation.ranking_metrics(lists, truth, users, k, n_items)[f"ndcg@{k}"],
            "ild_genre": beyond.intra_list_diversity_genres(lists, multi_hot),
            "coverage": beyond.coverage(lists, n_items),
        })
    return curve


def catalog_decile_shares(item_pop: np.ndarray) -> np.ndarray:
    """Share of all interactions held by each item-popularity decile, with exactly the decile
    assignment of beyond.exposure_by_popularity_decile (one 'slot' per interaction)."""
    counts = np.asarray(item_pop).astype(np.int64)
    return beyond.exposure_by_popularity_decile(np.repeat(np.arange(len(counts)), counts)[None, :], counts)


def user_groups(users_table) -> dict[str, np.ndarray]:
    gender = np.array([g if g else "unknown" for g in users_table.gender], dtype=object).astype(str)
    return {"gender": gender, "age": beyond.age_bucket(np.asarray(users_table.age))}


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg: no display, no pyplot global state
    return fig


def plot_training(path: Path, loss: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], val_name: str, best_epoch: float | None) -> None:
    from matplotlib.ticker import MaxNLocator

    fig = _figure(10, 3.8)
    for ax, (steps, values), title, color in zip(fig.subplots(1, 2), (loss, val), ("train/loss", val_name), ("tab:blue", "tab:green")):
        if len(steps):
            ax.plot(steps, values, marker="o", markersize=3, color=color)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best_epoch:g}")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.savefig(path)


def plot_groups(path: Path, panels: list[tuple[str, list[str], list[float], list[int], float]], overall: float, k: int) -> None:
    """One bar panel per group: (name, labels, mean NDCG, users, max gap)."""
    fig = _figure(5 * len(panels), 4)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (name, labels, values, counts, gap) in zip(axes, panels):
        x = np.arange(len(labels))
        bars = ax.bar(x, values, color="tab:purple", alpha=0.8)
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(overall, color="black", linestyle="--", linewidth=1, label=f"all users {overall:.3f}")
        ax.set_xticks(x, [f"{label}\n(n={n})" for label, n in zip(labels, counts)], fontsize=8)
        if len(values) >= 2:
            hi, lo = max(values), min(values)
            xg = len(labels) - 0.35
            ax.annotate("", xy=(xg, hi), xytext=(xg, lo), arrowprops={"arrowstyle": "<->", "color": "tab:red"})
            ax.text(xg + 0.08, (hi + lo) / 2, f"max gap\n{gap:.3f}", color="tab:red", va="center", fontsize=8)
            ax.set_xlim(-0.6, len(labels) + 0.4)
        ax.set_ylim(0, max(values + [overall]) * 1.18 if values else 1)
        ax.set_ylabel(f"NDCG@{k}")
        ax.set_title(f"NDCG@{k} by {name} (max gap {gap:.3f})")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def plot_popularity(path: Path, exposure: np.ndarray, catalog: np.ndarray) -> None:
    fig = _figure(8, 4)
    ax = fig.subplots()
    x = np.arange(len(exposure))
    ax.bar(x - 0.2, exposure, width=0.4, label="share of recommendation slots (model top-k)", color="tab:orange")
    ax.bar(x + 0.2, catalog, width=0.4, label="share of interactions (train + val)", color="tab:grey")
    ax.axhline(1 / len(exposure), color="black", linestyle=":", linewidth=1, label="uniform (1/10)")
    ax.set_xticks(x, [str(d) for d in x])
    ax.set_xlabel("item-popularity decile (0 = least popular items, 9 = most popular)")
    ax.set_ylabel("share")
    ax.set_title("Popularity bias: exposure by item-popularity decile")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def plot_tradeoff(path: Path, curve: dict[float, dict[str, float]], k: int, n_candidates: int = DEFAULT_CANDIDATES) -> None:
    from matplotlib import colormaps

    fig = _figure(7, 4.5)
    ax = fig.subplots()
    lams = sorted(curve)
    ild = [curve[lam]["ild_genre"] for lam in lams]
    ndcg = [curve[lam][f"ndcg@{k}"] for lam in lams]
    ax.plot(ild, ndcg, color="lightgrey", zorder=1)
    colors = colormaps["viridis"](np.linspace(0, 0.9, len(lams)))
    offsets = ((7, 7), (7, -13), (-44, 7), (-44, -13))  # alternate, so close points stay legible
    for i, (lam, xv, yv) in enumerate(zip(lams, ild, ndcg)):
        ax.scatter([xv], [yv], color=colors[i], s=40, zorder=2, label=f"λ={lambda_label(lam)}: NDCG {yv:.3f}, ILD {xv:.3f}")
        ax.annotate(f"λ={lambda_label(lam)}", (xv, yv), textcoords="offset points", xytext=offsets[i % len(offsets)], fontsize=8, color=colors[i])
    ax.set_xlabel("intra-list diversity (genres, 1 - Jaccard)")
    ax.set_ylabel(f"NDCG@{k}")
    ax.set_title(f"Accuracy vs diversity: MMR re-ranking of the top-{n_candidates} candidates")
    ax.legend(fontsize=8, loc="best")
    ax.margins(0.15)
    ax.grid(alpha=0.3)
    fig.savefig(path)


# --------------------------------------------------------------------------- html


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "nan" if np.isnan(value) else f"{value:.4f}"
    return "" if value is None else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


HOW_TO_READ = {
    "training": "Left: the training loss per epoch (should fall and flatten). Right: validation NDCG@{k}, which drives "
    "early stopping; the dashed line marks the epoch whose weights were kept. A widening gap between a falling loss "
    "and a flat or falling validation NDCG means over-fitting.",
    "groups": "Mean test NDCG@{k} per user group (n = users with a held-out item); the dashed line is all users. "
    "The red arrow spans the max gap between the best- and worst-served group: the smaller, the fairer.",
    "popularity": "Orange: where the model's top-{k} slots go, by item-popularity decile; grey: where the observed "
    "interactions are. Orange above grey in decile 9 means the model amplifies popularity; bars in the low "
    "deciles mean it surfaces the long tail.",
    "tradeoff": "Each point re-ranks every test user's top-{c} candidates with MMR at one λ (λ=1: plain ranking by score, "
    "λ=0: diversity only after the first pick). Moving left to right buys diversity; the drop in height is its cost in accuracy.",
}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
th { background: #f3f3f3; } td:not(:first-child) { font-variant-numeric: tabular-nums; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; max-width: 900px; } code { background: #f3f3f3; padding: 0 0.2em; }
.grid { display: flex; gap: 2em; flex-wrap: wrap; }
"""


def render_html(
    run, cfg, k: int, n_candidates: int, ranking: dict[str, float], beyond_metrics: dict[str, float],
    curve: dict[float, dict[str, float]], n_users: int, tracking_uri: str,
) -> str:  # fmt: skip
    esc = html.escape
    info, data = run.info, run.data
    tags, metrics, params = data.tags, data.metrics, data.params
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.start_time / 1000)) if info.start_time else ""
    summary = [
        ("run id", info.run_id),
        ("run name", info.run_name or ""),
        ("status", info.status),
        ("started", started),
        ("model kind", tags.get("model", cfg.model.kind)),
        ("dataset", tags.get("dataset", cfg.data.source)),
        ("split", tags.get("split", cfg.split.protocol)),
        ("git sha", tags.get("git_sha", "")),
        ("device", tags.get("device", "")),
        ("tracking URI", tracking_uri),
        ("test users evaluated", n_users),
    ]
    key_params = [(name, params[name]) for name in KEY_PARAMS if name in params] or [(name, params[name]) for name in OLD_KEY_PARAMS if name in params]
    for name in ("train/best_epoch", "train/epochs_run"):
        if name in metrics:
            key_params.append((name, int(metrics[name])))
    if "train/seconds" in metrics:
        key_params.append(("train/seconds", f"{metrics['train/seconds']:.1f}"))

    names = [metric_key(f"{m}@{k}") for m in RANKING] + ["coverage"]  # the names MLflow and the CLI show
    accuracy = [
        (f"test/{name}", metrics.get(f"test/{name}", float("nan")), ranking.get(name, float("nan")),
         metrics.get(f"baseline/popularity/{name}", float("nan")))
        for name in names
    ]  # fmt: skip
    ba = [(name, value) for name, value in beyond_metrics.items() if not name.startswith("exposure_decile_")]
    deciles = [(name, value) for name, value in beyond_metrics.items() if name.startswith("exposure_decile_")]
    mmr_rows = [(lambda_label(lam), v[f"ndcg@{k}"], v["ild_genre"], v["coverage"]) for lam, v in sorted(curve.items())]
    ndcg_name = metric_key(f"ndcg@{k}")

    fmt = {"k": k, "c": n_candidates}
    figures = "".join(
        f'<figure><img src="{esc(PLOTS[key])}" alt="{esc(alt)}"><figcaption><b>How to read:</b> {esc(HOW_TO_READ[key].format(**fmt))}</figcaption></figure>'
        for key, alt in (
            ("training", "training curves"),
            ("groups", f"NDCG@{k} by user group"),
            ("popularity", "exposure by item-popularity decile"),
            ("tradeoff", "MMR accuracy-diversity trade-off"),
        )
    )
    title = f"trustrec report: run {info.run_name or info.run_id}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{CSS}</style></head>
<body>
<h1>{esc(title)}</h1>
<div class="grid"><div><h2>Run</h2>{_table(("field", "value"), summary)}</div>
<div><h2>Key parameters</h2>{_table(("parameter", "value"), key_params)}</div></div>
<h2>Test metrics</h2>
<p>Full ranking of all items (train + validation items excluded), top {k}, binary relevance, over the users of the test split.
"Recomputed" scores the exported bundle (ONNX Runtime user tower + item matrix), as serving does.</p>
{_table(("metric", "model (logged at training)", "model (recomputed, exported bundle)", "popularity baseline"), accuracy)}
<h2>Beyond accuracy</h2>
<p>Recomputed on the exported model's top-{k} lists; logged to the run as <code>beyond/&lt;metric&gt;</code>.</p>
<div class="grid"><div>{_table(("metric", "value"), ba)}</div><div>{_table(("metric", "value"), deciles)}</div></div>
<h2>Accuracy vs diversity (MMR)</h2>
<p>Top-{n_candidates} candidates per user re-ranked with <code>bundle.rerank.mmr</code> (serving's MMR); logged as
<code>mmr/lambda_&lt;λ&gt;/&lt;metric&gt;</code>.</p>
{_table(("λ", ndcg_name, "ild_genre", "coverage"), mmr_rows)}
<h2>Plots</h2>
{figures}
</body></html>
"""


# --------------------------------------------------------------------------- the command


def build_report(
    run_id: str,
    tracking_uri: str = "sqlite:///mlflow.db",
    out: str | Path | None = None,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    n_candidates: int = DEFAULT_CANDIDATES,
    log_to_mlflow: bool = True,
) -> Report:
    """Recompute, plot, write the HTML under `out` (default reports/<run_id>/) and log it all to the run."""
    from mlflow.entities import Metric

    from bundle.load import open_bundle
    from training.data import user_feed
    from training.model import TowerSpec
    from training.pipeline import context, item_counts, prepare

    lambdas = parse_lambdas(lambdas)
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    client = _client(tracking_uri)
    run = fetch_run(client, run_id)
    run_id = run.info.run_id
    out_dir = Path(out) if out is not None else Path("reports") / run_id
    out_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="trustrec-report-") as tmp:
        cfg = load_run_config(client, run_id, Path(tmp))
        bundle = load_run_bundle(client, run_id, Path(tmp))
        opened = open_bundle(bundle, force_cpu=True)  # manifest schema checked, ONNX session, item matrix
        manifest = opened.manifest
        spec = TowerSpec(**manifest["model"]["spec"])
        data = prepare(cfg)
        ds = data.dataset
        if (spec.n_users, spec.n_items) != (ds.n_users, ds.n_items):
            raise ValueError(f"run {run_id}: model has {spec.n_users} users / {spec.n_items} items, its config's data has {ds.n_users} / {ds.n_items}")
        digest = manifest.get("provenance", {}).get("config_digest")
        if digest and digest != cfg.digest():
            log.warning("run %s: config.yaml digest %s differs from the bundle's %s", run_id, cfg.digest(), digest)
        item_vec = opened.item_vectors.astype(np.float64)
        ctx = context(cfg, ds)

        def score(users: np.ndarray) -> np.ndarray:
            return opened.user_vectors(user_feed(spec, ctx, users, data.seen)).astype(np.float64) @ item_vec.T

        k = cfg.task.eval_k
        n_items = ds.n_items
        truth, history = data.test[:2], data.seen[:2]
        users = np.flatnonzero(np.diff(data.test[0]) > 0)
        cand, cand_scores = retrieve_candidates(score, users, history, n_items, max(n_candidates, k))
        topk = cand[:, :k]

    ranking = evaluation.Metrics(evaluation.ranking_metrics(topk, truth, users, k, n_items))  # published names, as MLflow shows them
    item_pop = item_counts(data.seen, n_items)
    multi_hot = beyond.genres_multi_hot(ds.items.genres, len(ds.genre_names))
    groups = user_groups(ds.users)
    likeness = item_vec[:, : spec.output_dim]  # a model.item_bias coordinate is no likeness (as in pipeline.finish)
    beyond_metrics = evaluation.Metrics(beyond.beyond_accuracy_report(topk, users, history, truth, k, item_pop, multi_hot, likeness, groups))
    curve = mmr_curve(cand[:, :n_candidates], cand_scores[:, :n_candidates], likeness, lambdas, users, truth, k, n_items, multi_hot)
    catalog = catalog_decile_shares(item_pop)

    # ---- plots
    plots = {name: out_dir / fname for name, fname in PLOTS.items()}
    val_name = mlflow_key(f"val/ndcg@{k}")
    best = run.data.metrics.get("train/best_epoch")
    plot_training(plots["training"], metric_history(client, run_id, "train/loss"), metric_history(client, run_id, val_name), val_name, best)
    per_user = beyond.per_user_ndcg(topk, truth, users, k)
    panels = []
    for name, labels in groups.items():
        by_group, gap = beyond.group_ndcg(per_user, labels[users])
        order = [a for a in beyond.AGE_LABELS + (beyond.UNKNOWN_AGE_LABEL,) if a in by_group] if name == "age" else sorted(by_group)
        present, counts = np.unique(labels[users][~np.isnan(per_user)], return_counts=True)
        n = dict(zip(present.tolist(), counts.tolist()))
        panels.append((name, order, [by_group[g] for g in order], [n[g] for g in order], gap))
    plot_groups(plots["groups"], panels, ranking[f"ndcg@{k}"], k)
    exposure = np.array([beyond_metrics[f"exposure_decile_{d}"] for d in range(beyond.N_DECILES)])
    plot_popularity(plots["popularity"], exposure, catalog)
    plot_tradeoff(plots["tradeoff"], curve, k, n_candidates)

    # ---- html + json
    page = render_html(run, cfg, k, n_candidates, ranking, beyond_metrics, curve, len(users), tracking_uri)
    html_path = out_dir / "index.html"
    html_path.write_text(page, encoding="utf-8")
    numbers = {
        "run_id": run_id,
        "k": k,
        "n_candidates": n_candidates,
        "n_users": int(len(users)),
        "recomputed": ranking,
        "beyond": beyond_metrics,
        "mmr": {lambda_label(lam): v for lam, v in curve.items()},
        "catalog_interaction_share_by_decile": catalog.tolist(),
    }
    (out_dir / "report.json").write_text(json.dumps(numbers, indent=2, allow_nan=True))

    # ---- MLflow
    logged = {f"beyond/{metric_key(name)}": float(v) for name, v in beyond_metrics.items()}
    for lam, values in curve.items():
        for name, v in values.items():
            logged[f"mmr/lambda_{lambda_label(lam)}/{metric_key(name)}"] = float(v)
    if log_to_mlflow:
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, 0) for key, value in logged.items()]
        for start in range(0, len(metrics), 500):  # log_batch takes at most 1000 metrics
            client.log_batch(run_id, metrics=metrics[start : start + 500])
        for path in [html_path, out_dir / "report.json", *plots.values()]:
            client.log_artifact(run_id, str(path), "report")
    return Report(run_id, out_dir, html_path, plots, ranking, beyond_metrics, curve, catalog, logged)
