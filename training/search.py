"""`search.enabled`: the two-tower's data-dependent settings chosen on validation, within a time budget.

A recipe tuned on one dataset (ML-100k) does not transfer by itself: how much history to hide, how
sharp the softmax, whether the towers need a hidden layer all depend on the data's size and density.
So the recipe names a small grid (`search.space`, dotted config keys → candidate values) and training
picks from it by **successive halving** (Jamieson & Talwalkar 2016; one bracket of Hyperband):

    rung 0: every candidate trains `search.min_epochs` epochs on train, scored by its best
            validation NDCG@k (the trainer's own early-stopping metric);
    rung r: the best ⌈n / eta⌉ train again from scratch for min_epochs · eta^r epochs;
    until one candidate is left, the epochs would pass `trainer.epochs`, or `search.budget_s` of
    wall time is spent (a rung cut short ranks the candidates it finished; rung 0 always finishes
    at least one).

The winner's settings replace the config's, and training proceeds as usual: the full fit with early
stopping (the epoch count is still chosen on validation), then the blend's (weight, λ) on the same
validation split. Only train and validation are read; the test split judges the result afterwards.
The rungs, every candidate's score and the choice go to the run (MLflow params `search.chosen.*`, the
`search.json` artifact) and to `RunResult.search`.

Cost: about (number of rungs) x (number of candidates) x min_epochs epochs, e.g. 8 candidates, eta 2,
min 4 epochs: 3 rungs of 32 epochs each.
"""
from __future__ import annotations

import itertools
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import TrainConfig
from training.trainer import Trainer

log = logging.getLogger(__name__)


def candidates(space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the space's values, in the order the space lists them (keys, then values)."""
    keys = list(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]


def effective_space(space: dict[str, list[Any]], train: tuple) -> dict[str, list[Any]]:
    """The space without the values that cannot differ on this data: where every training rating is the
    same (implicit feedback), a rating-weighted history mean is the plain mean, so `model.rating_weighted`
    keeps False only (otherwise its candidates would train the same model twice)."""
    values = space.get("model.rating_weighted")
    ratings = train[2] if len(train) > 2 else np.zeros(0)
    if values is None or len(values) < 2 or (len(ratings) and np.ptp(ratings) > 0):
        return space
    log.info("search: every training rating is the same: model.rating_weighted stays false")
    return {**space, "model.rating_weighted": [False]}


def rung_epochs(min_epochs: int, eta: int, max_epochs: int) -> list[int]:
    """Epochs per rung: min_epochs · eta^r while that stays within max_epochs (at least one rung)."""
    out = [min(min_epochs, max_epochs)]
    while out[-1] * eta <= max_epochs:
        out.append(out[-1] * eta)
    return out


def survivors(scored: list[tuple[float, int]], eta: int) -> list[int]:
    """The indices of the best ⌈n / eta⌉ of (score, candidate index) pairs; ties keep the earlier candidate."""
    ranked = sorted(scored, key=lambda si: (-si[0], si[1]))
    return [i for _, i in ranked[: max(1, math.ceil(len(ranked) / eta))]]


@dataclass
class SearchResult:
    chosen: dict[str, Any]
    score: float  # the winner's validation metric in the last rung it ran
    rungs: list[dict[str, Any]] = field(default_factory=list)  # per rung: epochs, [(candidate, score, seconds)]
    seconds: float = 0.0

    def report(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "score": self.score, "seconds": round(self.seconds, 1), "rungs": self.rungs}


def search(cfg: TrainConfig, data: Any, device: torch.device) -> SearchResult:
    """Successive halving over `cfg.search.space` (module doc); returns the winner's settings."""
    from training.pipeline import build_model, context, item_counts  # the pipeline imports this module
    from training.task import RetrievalTask
    from training.trainer import seed_everything
    from training.tune import trial_config

    s = cfg.search
    grid = candidates(effective_space(s.space, data.train))
    configs = [trial_config(cfg, params) for params in grid]  # a bad key or value fails here, before any training
    started = time.perf_counter()
    alive = list(range(len(grid)))
    result = SearchResult(chosen=grid[0], score=float("nan"))
    schedule = rung_epochs(s.min_epochs, s.eta, cfg.trainer.epochs)
    with tempfile.TemporaryDirectory(prefix="trustrec-search-") as tmp:
        epoch_s = 0.0  # seconds per epoch of the last rung: what the next one is estimated from
        for r, epochs in enumerate(schedule):
            spent = time.perf_counter() - started
            if r > 0 and spent + epoch_s * epochs * len(alive) > s.budget_s:
                log.info("search: rung %d (%d x %d epochs, ~%.0f s) would pass the %.0f s budget: stopping", r, len(alive), epochs, epoch_s * epochs * len(alive), s.budget_s)
                break
            scored: list[tuple[float, int]] = []
            rows = []
            for i in alive:
                if scored and time.perf_counter() - started > s.budget_s:  # rung 0 only (later rungs were estimated to fit)
                    log.info("search: time budget of %.0f s spent in rung %d (%d of %d candidates ran)", s.budget_s, r, len(scored), len(alive))
                    break
                c = configs[i]
                tcfg = c.trainer.model_copy(update={"epochs": epochs, "patience": epochs, "min_delta": 0.0, "max_seconds": None,
                                                    "progress": False, "checkpoint_dir": str(Path(tmp) / f"r{r}c{i}")})  # fmt: skip
                seed_everything(c.trainer.seed)
                ctx = context(c, data.dataset)
                model = build_model(c, data.dataset, ctx, device)
                task = RetrievalTask(c.task, item_counts(data.train, data.dataset.n_items), c.model.item_id_dropout)
                m = c.model
                trainer = Trainer(model, task, tcfg, c.task.history_dropout, m.user_id_dropout, device, m.demographics_dropout, m.stated_dropout)
                fit = trainer.fit(data.train, data.train, data.val, ctx)
                scored.append((fit.best_metric, i))
                rows.append({"candidate": grid[i], "score": round(fit.best_metric, 5), "best_epoch": fit.best_epoch, "seconds": round(fit.seconds, 1)})
                log.info("search rung %d (%d epochs): %s -> %s %.4f", r, epochs, grid[i], trainer.monitor, fit.best_metric)
            result.rungs.append({"epochs": epochs, "candidates": rows})
            epoch_s = sum(row["seconds"] for row in rows) / (epochs * len(rows))
            alive = survivors(scored, s.eta)
            best = max(scored, key=lambda si: (si[0], -si[1]))
            result.chosen, result.score = grid[best[1]], best[0]
            if len(alive) == 1 or time.perf_counter() - started > s.budget_s:
                break
    result.seconds = time.perf_counter() - started
    log.info("search: chose %s (validation %.4f) in %.0f s", result.chosen, result.score, result.seconds)
    return result
